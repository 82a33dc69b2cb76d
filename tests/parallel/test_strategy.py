"""MoEStrategy beyond the training maths: errors at setup, evaluation under EP, uneven data,
building on the meta device, and plain DDP over MoE layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import StrategyRegistry

from lightning_moe import MoEStrategy
from tests.parallel import strategy_scenarios as scenarios
from tests.parallel.launch import run_on_ranks


def test_bad_configurations_fail_at_setup_on_every_rank() -> None:
    results = run_on_ranks(2, scenarios.bad_configurations)
    for errors in results:
        assert "expert_parallel_size=3 is larger than the 2 processes" in errors["ep_larger_than_world"]
        assert "num_experts=3 is not divisible by expert_parallel_size=2" in errors["ep_not_dividing_experts"]
        assert "The ranks disagree on the MoE layers" in errors["ranks_disagree"]


def test_model_without_moe_layer_warns_and_trains_as_ddp() -> None:
    for messages in run_on_ranks(2, scenarios.no_moe_layer)[:1]:
        assert messages and "trains as plain DDP" in messages[0]


def test_validation_and_predict_under_expert_parallelism_with_uneven_batches() -> None:
    results = run_on_ranks(2, scenarios.uneven_evaluation)
    # Rank 1 had 5 validation batches and 3 prediction batches, rank 0 had 3 and 2: rank 1 is told.
    assert results[0]["warnings"] == [] and len(results[1]["warnings"]) == 2
    # Predictions under EP=2 equal the whole model's, rebuilt from both ranks' experts.
    full = {k: v for k, v in results[0]["state"].items()}
    for key in [k for k in full if ".experts." in k]:
        full[key] = torch.cat([results[0]["state"][key], results[1]["state"][key]])
    model = scenarios.Tagger()
    model.load_state_dict(full)
    model.eval()
    for result in results:
        assert len(result["predictions"]) == 2  # the shorter rank's count
        for prediction, inputs in zip(result["predictions"], result["inputs"], strict=False):
            torch.testing.assert_close(prediction, model(inputs), rtol=1e-5, atol=1e-6)


def test_exchange_with_zero_rows_to_a_peer_and_an_empty_rank() -> None:
    results = run_on_ranks(2, scenarios.skewed_exchange)
    assert results[1]["out"].shape == (0, scenarios.D_MODEL)
    whole = scenarios.MoE(scenarios.D_MODEL, num_experts=4, top_k=2, d_hidden=12)
    whole.load_state_dict(results[0]["whole"])
    x = results[0]["x"].clone().requires_grad_(True)
    out = whole(x)
    out.square().sum().backward()
    torch.testing.assert_close(results[0]["out"], out.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0]["x_grad"], x.grad, rtol=1e-5, atol=1e-6)
    # Rank 0 holds experts 0-1 (all the work); rank 1's experts got no token but still a zero gradient.
    torch.testing.assert_close(results[0]["w1_grad"], whole.experts.w1.grad[:2], rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(results[1]["w1_grad"]) == 0


def test_configure_model_builds_only_local_experts_with_single_process_weights() -> None:
    (single,) = run_on_ranks(1, scenarios.configure_model_on_meta)
    parallel = run_on_ranks(2, scenarios.configure_model_on_meta)
    for rank, result in enumerate(parallel):
        assert result["offset"] == 2 * rank
        for key, value in result["state"].items():
            expected = single["state"][key]
            if ".experts." in key:  # this rank's two experts, as the one-process run initialised them
                assert value.shape[0] == 2
                torch.testing.assert_close(value, expected[2 * rank : 2 * rank + 2], rtol=0, atol=0, msg=key)
            else:  # replicated: identical on every rank
                torch.testing.assert_close(value, parallel[0]["state"][key], rtol=0, atol=0, msg=key)


def test_plain_ddp_trains_with_idle_experts() -> None:
    results = run_on_ranks(2, scenarios.plain_ddp_with_idle_experts)
    for key, value in results[0]["state"].items():
        torch.testing.assert_close(value, results[1]["state"][key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("module_experts", [False, True], ids=["stacked", "modules"])
def test_spawn_launcher_returns_the_whole_trained_model(module_experts: bool) -> None:
    launched = run_on_ranks(2, scenarios.fit_two_steps, module_experts)
    torch.manual_seed(0)
    model = scenarios.Tagger(module_experts=module_experts)
    strategy = MoEStrategy(process_group_backend="gloo", start_method="spawn")
    scenarios.trainer(2, strategy, max_steps=2).fit(model, scenarios.loader(2, 0))
    # The main process gets every expert back, trained as the launched ranks trained theirs.
    for key, value in model.state_dict().items():
        if ".experts." in key and not module_experts:
            expected = torch.cat([launched[0]["state"][key], launched[1]["state"][key]])
        elif ".experts.experts." in key:
            index = int(key.split(".experts.experts.")[1].split(".")[0])
            local_key = key.replace(f".experts.experts.{index}.", f".experts.experts.{index % 2}.")
            expected = launched[index // 2]["state"][local_key]
        else:
            expected = launched[0]["state"][key]
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc (Linux)")
def test_destroy_process_groups_joins_the_gloo_threads() -> None:
    for result in run_on_ranks(2, scenarios.destroy_after_fit):
        assert "pt_gloo_runloop" in result["before"]
        assert "pt_gloo_runloop" not in result["after"], result["after"]
        assert not result["initialized"]


def test_strategy_is_registered_and_validates_its_argument() -> None:
    assert "moe" in StrategyRegistry
    trainer = Trainer(strategy="moe", accelerator="cpu", devices=1, logger=False)
    assert isinstance(trainer.strategy, MoEStrategy)
    with pytest.raises(ValueError, match="expert_parallel_size must be at least 1"):
        MoEStrategy(expert_parallel_size=0)
    with pytest.raises(TypeError, match="expert_parallel_size must be an int"):
        MoEStrategy(expert_parallel_size=2.0)
