"""The acceptance test of MoEStrategy: training under expert x data parallelism gives the same
losses and parameters as one process training on the same global batches.

Definitions under test (docs/strategy.md): each data-parallel rank's micro-batch is routed,
capacity-limited and balance-lossed on its own, exactly as the single process routes that
micro-batch; the sigmoid router's bias follows the token counts of the whole global batch.
"""

from __future__ import annotations

import pytest
import torch

from tests.parallel.launch import run_on_ranks
from tests.parallel.scenarios import RunConfig, train_many

# (processes, expert_parallel_size): EP=2, EP=2 x EDP=2, EP=4.
LAYOUTS = [pytest.param(2, 2, id="ep2"), pytest.param(4, 2, id="ep2xedp2"), pytest.param(4, 4, id="ep4")]

VARIANTS = [
    dict(),
    dict(clip=0.05, accumulate=2),
    dict(clip=0.05, capacity_factor=1.0),
    dict(accumulate=2, capacity_factor=0.75),
    dict(router="sigmoid", clip=0.05),
    dict(clip=0.05, fused_adam=True),
]


def assemble_full_state(results: list[dict], expert_parallel_size: int) -> dict[str, torch.Tensor]:
    """The whole model's state from the ranks of the first expert-parallel group."""
    full = {}
    for key, value in results[0]["state"].items():
        if ".experts." in key:
            full[key] = torch.cat([results[r]["state"][key] for r in range(expert_parallel_size)])
        else:
            full[key] = value
    return full


def check_replicas_agree(results: list[dict], expert_parallel_size: int) -> None:
    for rank, result in enumerate(results):
        for key, value in result["state"].items():
            same_role = rank % expert_parallel_size if ".experts." in key else 0
            torch.testing.assert_close(value, results[same_role]["state"][key], rtol=0, atol=0, msg=key)


def per_step_losses(losses: list[float], steps: int) -> torch.Tensor:
    return torch.tensor(losses, dtype=torch.float64).view(steps, -1).mean(dim=1)


@pytest.fixture(scope="module")
def single_process_runs():
    """The one-process reference of each variant, by number of data-parallel ranks it stands for."""
    cache: dict[int, list[dict]] = {}

    def runs(data_ranks: int) -> list[dict]:
        if data_ranks not in cache:
            configs = [RunConfig(data_ranks=data_ranks, **variant) for variant in VARIANTS]
            (cache[data_ranks],) = run_on_ranks(1, train_many, configs)
        return cache[data_ranks]

    return runs


@pytest.mark.parametrize(("processes", "expert_parallel_size"), LAYOUTS)
def test_expert_parallel_training_equals_single_process(processes, expert_parallel_size, single_process_runs) -> None:
    configs = [RunConfig(data_ranks=processes, expert_parallel_size=expert_parallel_size, **v) for v in VARIANTS]
    parallel_runs = run_on_ranks(processes, train_many, configs)
    for index, (config, single) in enumerate(zip(configs, single_process_runs(processes), strict=True)):
        parallel = [rank_runs[index] for rank_runs in parallel_runs]
        check_replicas_agree(parallel, expert_parallel_size)
        # Every rank's losses, step by step, averaged as the single process averages its micro-batches.
        parallel_losses = torch.stack([per_step_losses(r["losses"], config.steps) for r in parallel]).mean(dim=0)
        expected_losses = per_step_losses(single["losses"], config.steps)
        torch.testing.assert_close(parallel_losses, expected_losses, rtol=1e-5, atol=1e-6, msg=str(config))
        full = assemble_full_state(parallel, expert_parallel_size)
        assert full.keys() == single["state"].keys()
        for key, value in single["state"].items():
            torch.testing.assert_close(full[key], value, rtol=1e-5, atol=1e-6, msg=f"{config}: {key}")
