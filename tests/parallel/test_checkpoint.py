"""Sharded checkpoints: resume exactly on another number of processes, consolidate, survive crashes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_moe.checkpoint import consolidate_checkpoint, resolve, write_atomically
from tests.parallel.launch import run_on_ranks
from tests.parallel.scenarios import RunConfig, TwoLayerMoE, train
from tests.parallel.test_parallel_equals_single import assemble_full_state

# Packed: Lightning resumes an epoch-end checkpoint one micro-batch early under gradient
# accumulation (with any strategy), so each process takes its data ranks' batches as one batch.
CONFIG = RunConfig(data_ranks=4, steps=4, clip=0.05, router="sigmoid", pack_data_ranks=True)


def assert_states_close(actual: dict, expected: dict, msg: str) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=1e-6, msg=f"{msg}: {key}")


def step_losses(results: list[dict], steps: int) -> torch.Tensor:
    per_rank = [torch.tensor(r["losses"], dtype=torch.float64).view(steps, -1).mean(dim=1) for r in results]
    return torch.stack(per_rank).mean(dim=0)


@pytest.fixture(scope="module")
def uninterrupted():
    """Four steps in one go on 2 processes, expert-parallel size 2."""
    return run_on_ranks(2, train, RunConfig(**{**CONFIG.__dict__, "expert_parallel_size": 2}))


@pytest.fixture(scope="module")
def halfway(tmp_path_factory):
    """The first two steps on 2 processes (EP=2), saved as a sharded checkpoint."""
    directory = tmp_path_factory.mktemp("ckpt")
    config = RunConfig(**{**CONFIG.__dict__, "steps": 2, "expert_parallel_size": 2})
    results = run_on_ranks(2, train, config, None, str(directory))
    assert sorted(p.name for p in directory.iterdir()) == ["step=1.ckpt", "step=2.ckpt"]
    return directory / "step=2.ckpt", results


@pytest.mark.parametrize(
    ("processes", "expert_parallel_size"), [(4, 4), (1, None), (4, 2)], ids=["ep4", "single", "ep2xedp2"]
)
def test_resume_on_another_layout_continues_exactly(processes, expert_parallel_size, halfway, uninterrupted) -> None:
    path, _ = halfway
    config = RunConfig(**{**CONFIG.__dict__, "expert_parallel_size": expert_parallel_size})
    resumed = run_on_ranks(processes, train, config, str(path))
    full = assemble_full_state(resumed, expert_parallel_size or 1)
    expected = assemble_full_state(uninterrupted, 2)
    assert_states_close(full, expected, f"resumed on {processes} processes")
    # The resumed run trains steps 3 and 4 only; they match the uninterrupted run's.
    torch.testing.assert_close(step_losses(resumed, 2), step_losses(uninterrupted, 4)[2:], rtol=1e-5, atol=1e-6)


def test_checkpoint_layout_holds_each_expert_once(halfway) -> None:
    path, _ = halfway
    names = sorted(p.name for p in Path(path).iterdir())
    assert names == ["common.pt", "experts-00000-of-00002.pt", "experts-00001-of-00002.pt"]
    common = torch.load(Path(path, "common.pt"), weights_only=False)
    assert not any(".experts." in key for key in common["state_dict"])
    metadata = common["lightning_moe"]
    assert metadata["expert_parallel_size"] == 2
    assert metadata["layers"] == {"moe1.experts.": 4, "moe2.experts.": 4}
    assert {"lightning_moe", "torch", "lightning"} <= metadata["versions"].keys()


def test_consolidate_gives_the_single_device_state_dict(halfway) -> None:
    path, results = halfway
    consolidated = consolidate_checkpoint(path)
    torch.manual_seed(0)
    reference = TwoLayerMoE(CONFIG).state_dict()
    assert {k: v.shape for k, v in consolidated.items()} == {k: v.shape for k, v in reference.items()}
    assert_states_close(consolidated, assemble_full_state(results, 2), "consolidated")


def test_consolidate_command_writes_a_single_device_checkpoint(halfway, tmp_path, capsys) -> None:
    from lightning_moe import cli

    path, results = halfway
    out = tmp_path / "full.ckpt"
    cli.main(["consolidate", str(path), str(out)])
    assert "wrote" in capsys.readouterr().out
    checkpoint = torch.load(out, weights_only=False)
    assert "optimizer_states" not in checkpoint and checkpoint["global_step"] == 2
    model = TwoLayerMoE(CONFIG)
    model.load_state_dict(checkpoint["state_dict"])  # strict: every key, every shape
    assert_states_close(model.state_dict(), assemble_full_state(results, 2), "consolidated file")
    with pytest.raises(SystemExit):
        cli.main(["consolidate", str(tmp_path / "missing"), str(out)])


def test_loading_into_a_different_model_names_the_mismatch(halfway) -> None:
    path, _ = halfway
    config = RunConfig(**{**CONFIG.__dict__, "num_experts": 8})
    with pytest.raises(RuntimeError, match=r"moe1\.experts\.: checkpoint 4 experts, model 8"):
        run_on_ranks(1, train, config, str(path))


def test_kill_9_loses_only_the_steps_since_the_last_checkpoint(tmp_path, uninterrupted) -> None:
    """A run killed with SIGKILL mid-training resumes from its last checkpoint exactly."""
    import multiprocessing
    import os
    import signal
    import time

    from tests.parallel.launch import _worker, free_port

    killed = RunConfig(**{**CONFIG.__dict__, "steps": 50, "step_sleep": 0.5, "expert_parallel_size": 2})
    context = multiprocessing.get_context("spawn")
    port = free_port()
    ranks = [
        context.Process(target=_worker, args=(r, 2, port, train, (killed, None, str(tmp_path)), str(tmp_path)))
        for r in range(2)
    ]
    for process in ranks:
        process.start()
    deadline = time.monotonic() + 240
    while not (tmp_path / "step=2.ckpt").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    for process in ranks:
        os.kill(process.pid, signal.SIGKILL)
        process.join()
    assert (tmp_path / "step=2.ckpt").exists(), "the run wrote no checkpoint in time"
    complete = sorted((p for p in tmp_path.glob("step=*.ckpt")), key=lambda p: int(p.stem.split("=")[1]))
    assert all((p / "common.pt").exists() for p in complete)
    last = complete[-1]
    assert int(last.stem.split("=")[1]) < CONFIG.steps  # killed before the end: the resumed run has steps to do

    resumed = run_on_ranks(2, train, RunConfig(**{**CONFIG.__dict__, "expert_parallel_size": 2}), str(last))
    assert_states_close(assemble_full_state(resumed, 2), assemble_full_state(uninterrupted, 2), "after kill -9")


def test_crash_while_writing_leaves_previous_checkpoint_whole(tmp_path) -> None:
    path = tmp_path / "last.ckpt"

    def write(payload: int):
        def _write(directory: Path) -> None:
            torch.save({"state_dict": {}, "value": payload}, directory / "common.pt")
            if payload == 2:
                raise OSError("disk full")

        return _write

    write_atomically(path, write(1), barrier=lambda: None, is_leader=True)
    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, write(2), barrier=lambda: None, is_leader=True)
    assert torch.load(resolve(path) / "common.pt")["value"] == 1
    write_atomically(path, write(3), barrier=lambda: None, is_leader=True)
    assert torch.load(resolve(path) / "common.pt")["value"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_crash_between_renames_falls_back_to_previous(tmp_path) -> None:
    path = tmp_path / "last.ckpt"
    write_atomically(path, lambda d: torch.save({"value": 1}, d / "common.pt"), lambda: None, True)
    path.rename(tmp_path / "last.ckpt.old")  # as if killed after the first rename
    assert torch.load(resolve(path) / "common.pt")["value"] == 1
