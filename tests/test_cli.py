import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_moe.cli import main

EXAMPLE_CONFIG = Path(__file__).parents[1] / "examples" / "gpt_moe.yaml"

TINY_RUN = [
    "--model.n_layer=1",
    "--model.n_head=2",
    "--model.d_model=32",
    "--model.num_experts=4",
    "--model.d_hidden=32",
    "--model.warmup_steps=1",
    "--data.block_size=16",
    "--data.batch_size=4",
    "--data.train_samples_per_epoch=64",
    "--trainer.accelerator=cpu",
    "--trainer.max_steps=3",
    "--trainer.val_check_interval=3",
    "--trainer.limit_val_batches=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.fixture(autouse=True)
def isolated_run(tmp_path, monkeypatch):
    """Run in an empty directory, with none of pytest's own arguments in ``sys.argv``."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-moe"])


def printed_config(capsys, args: list[str]) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_fit_writes_a_checkpoint_and_the_config(tmp_path):
    main(["fit", *TINY_RUN, f"--trainer.default_root_dir={tmp_path}"])
    run_dir = tmp_path / "lightning_logs" / "version_0"
    (checkpoint,) = (run_dir / "checkpoints").glob("*.ckpt")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["num_experts"] == 4 and saved["data"]["block_size"] == 16
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["global_step"] == 3
    # The model's context length is linked to the data's window length, not set on its own.
    assert state["hyper_parameters"]["block_size"] == 16
    assert state["hyper_parameters"]["d_model"] == 32


def test_print_config_shows_the_defaults(tmp_path, capsys):
    config = printed_config(capsys, ["fit", "--print_config"])
    assert config["seed_everything"] == 1337
    assert config["trainer"]["accelerator"] == "auto"
    assert config["trainer"]["max_steps"] > 0
    assert config["model"]["router"] == "topk"
    assert config["data"]["text"] is None
    assert list(tmp_path.iterdir()) == []


def test_options_override_the_defaults(capsys):
    config = printed_config(capsys, ["fit", "--model.num_experts=16", "--data.block_size=64", "--print_config"])
    assert config["model"]["num_experts"] == 16
    assert config["data"]["block_size"] == 64


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("reduce-overhead", "reduce-overhead")])
def test_compile_model_takes_a_flag_or_a_mode(capsys, value, expected):
    config = printed_config(capsys, ["fit", f"--model.compile_model={value}", "--print_config"])
    assert config["model"]["compile_model"] == expected


def test_example_config_is_the_default_run(capsys):
    from_file = printed_config(capsys, ["fit", "--config", str(EXAMPLE_CONFIG), "--print_config"])
    defaults = printed_config(capsys, ["fit", "--print_config"])
    assert from_file == defaults


def test_strategy_is_set_from_the_command_line_by_class_path(tmp_path):
    import torch.distributed as dist

    strategy = [
        "--trainer.strategy=lightning_moe.MoEStrategy",
        "--trainer.strategy.expert_parallel_size=1",
        "--trainer.strategy.process_group_backend=gloo",
        "--trainer.devices=1",
    ]
    try:
        main(["fit", *TINY_RUN, *strategy, f"--trainer.default_root_dir={tmp_path}"])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    (checkpoint,) = (tmp_path / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt")
    assert (checkpoint / "common.pt").exists()  # MoEStrategy's sharded checkpoint directory
    saved = yaml.safe_load((tmp_path / "lightning_logs" / "version_0" / "config.yaml").read_text())
    assert saved["trainer"]["strategy"]["class_path"] == "lightning_moe.MoEStrategy"
