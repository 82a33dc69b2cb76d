"""MoELightningModule: loss scaling under accumulation, routing metrics, bias updates."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe import MoE, MoELightningModule
from tests.parallel import strategy_scenarios as scenarios
from tests.parallel.launch import run_on_ranks


class Regressor(MoELightningModule):
    def __init__(self, router: str = "topk", top_k: int = 2, capacity_factor: float | None = None) -> None:
        super().__init__()
        self.moe = MoE(
            6,
            num_experts=4,
            top_k=top_k,
            d_hidden=8,
            router=router,
            capacity_factor=capacity_factor,
            aux_loss_weight=0.5,
            z_loss_weight=0.1,
        )
        self.grads_at_step: list[dict[str, torch.Tensor]] = []

    def forward(self, x):
        return self.moe(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def on_before_optimizer_step(self, optimizer):
        self.grads_at_step.append({n: p.grad.clone() for n, p in self.named_parameters()})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make_loader(num_batches: int, batch_size: int = 8) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(num_batches * batch_size, 6, generator=generator)
    y = torch.randn(num_batches * batch_size, 6, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def fit(model: Regressor, max_steps: int, accumulate: int = 1, **trainer_kwargs) -> Trainer:
    trainer = Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(model, make_loader(max_steps * accumulate))
    return trainer


@pytest.mark.parametrize("accumulate", [1, 2], ids=["accumulate1", "accumulate2"])
def test_gradient_equals_mean_of_task_plus_weighted_losses(accumulate: int) -> None:
    torch.manual_seed(0)
    model = Regressor()
    initial = copy.deepcopy(model.moe)
    fit(model, max_steps=1, accumulate=accumulate)

    # The reference: each micro-batch's task loss and attached losses, both divided by accumulate.
    initial.aux_loss_scale = 1.0 / accumulate
    expected = {n: torch.zeros_like(p) for n, p in initial.named_parameters()}
    for x, y in make_loader(accumulate):
        initial.zero_grad()
        (torch.nn.functional.mse_loss(initial(x), y) / accumulate).backward()
        for name, param in initial.named_parameters():
            expected[name] += param.grad
    got = model.grads_at_step[0]
    for name, grad in expected.items():
        torch.testing.assert_close(got[f"moe.{name}"], grad, rtol=1e-5, atol=1e-7)


def test_aux_loss_scale_follows_accumulation() -> None:
    model = Regressor()
    fit(model, max_steps=1, accumulate=4)
    assert model.moe.aux_loss_scale == pytest.approx(0.25)


def test_routing_metrics_are_logged() -> None:
    torch.manual_seed(0)
    model = Regressor(capacity_factor=0.5)
    trainer = fit(model, max_steps=3)
    metrics = trainer.callback_metrics
    for name in ("aux_loss", "z_loss", "drop_rate", "load_imbalance"):
        assert f"moe/{name}_step" in metrics or f"moe/{name}" in metrics, name
    stats = model.moe.routing_stats
    counts = stats["tokens_per_expert"].float()
    assert float(metrics["moe/load_imbalance_step"]) == pytest.approx(float(counts.max() / counts.mean()), rel=1e-5)
    assert float(metrics["moe/drop_rate_step"]) == pytest.approx(float(stats["dropped"] / stats["assignments"]))
    assert float(metrics["moe/drop_rate_step"]) > 0


class TwoLayerRegressor(Regressor):
    """Regressor with a second MoE layer, with a capacity, that records the step's routing metrics.

    The record is computed here from the layers' ``routing_stats``, one layer at a time, to check
    what the module logs.
    """

    def __init__(self, second_num_experts: int) -> None:
        super().__init__()
        self.second = MoE(6, num_experts=second_num_experts, d_hidden=8, capacity_factor=0.5)
        self.step_metrics: list[dict[str, float]] = []

    def forward(self, x):
        return self.second(self.moe(x))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        super().on_train_batch_end(outputs, batch, batch_idx)
        per_layer = []
        for layer in (self.moe, self.second):
            stats = layer.routing_stats
            counts = stats["tokens_per_expert"].double()
            per_layer.append(
                {
                    "aux_loss": float(stats["aux_loss"]),
                    "z_loss": float(stats["z_loss"]),
                    "drop_rate": int(stats["dropped"]) / int(stats["assignments"]),
                    "load_imbalance": float(counts.max() / counts.mean()),
                }
            )
        self.step_metrics.append({name: (per_layer[0][name] + per_layer[1][name]) / 2 for name in per_layer[0]})


@pytest.mark.parametrize("second_num_experts", [4, 3], ids=["same_num_experts", "different_num_experts"])
def test_routing_metrics_are_layer_means_and_epoch_values_are_step_means(second_num_experts: int) -> None:
    torch.manual_seed(0)
    model = TwoLayerRegressor(second_num_experts)
    trainer = fit(model, max_steps=4)  # one whole epoch of 4 batches
    assert len(model.step_metrics) == 4
    metrics = trainer.callback_metrics
    for name in ("aux_loss", "z_loss", "drop_rate", "load_imbalance"):
        steps = [step[name] for step in model.step_metrics]
        assert float(metrics[f"moe/{name}_step"]) == pytest.approx(steps[-1], rel=1e-5), name
        assert float(metrics[f"moe/{name}_epoch"]) == pytest.approx(sum(steps) / len(steps), rel=1e-5), name
        assert float(metrics[f"moe/{name}"]) == float(metrics[f"moe/{name}_epoch"]), name
    assert float(metrics["moe/drop_rate_epoch"]) > 0
    assert "moe/load_imbalance_epoch" in trainer.progress_bar_metrics


class LogRecordingRegressor(TwoLayerRegressor):
    """TwoLayerRegressor that records the global step of each call logging moe/load_imbalance."""

    def __init__(self) -> None:
        super().__init__(second_num_experts=3)
        self.routing_logged_at: list[int] = []

    def log(self, name, value, *args, **kwargs):
        if name == "moe/load_imbalance":
            self.routing_logged_at.append(self.trainer.global_step)
        super().log(name, value, *args, **kwargs)


@pytest.mark.parametrize(
    ("every", "trainer_every", "expected"),
    [(3, 50, [3, 6, 8]), (None, 2, [2, 4, 6, 8]), (1, 50, [1, 2, 3, 4, 5, 6, 7, 8])],
    ids=["module_every_3", "trainer_every_2", "every_step"],
)
def test_routing_step_values_are_logged_every_n_steps_and_epoch_means_count_every_step(
    every: int | None, trainer_every: int, expected: list[int]
) -> None:
    torch.manual_seed(0)
    model = LogRecordingRegressor()
    model.routing_log_every_n_steps = every
    trainer = fit(model, max_steps=8, log_every_n_steps=trainer_every)  # one epoch of 8 batches
    assert model.routing_logged_at == expected
    metrics = trainer.callback_metrics
    for name in ("aux_loss", "z_loss", "drop_rate", "load_imbalance"):
        steps = [step[name] for step in model.step_metrics]
        assert len(steps) == 8
        assert float(metrics[f"moe/{name}_step"]) == pytest.approx(steps[-1], rel=1e-5), name
        assert float(metrics[f"moe/{name}_epoch"]) == pytest.approx(sum(steps) / len(steps), rel=1e-5), name


def test_routing_log_interval_below_one_is_refused() -> None:
    model = Regressor()
    model.routing_log_every_n_steps = 0
    with pytest.raises(ValueError, match="routing_log_every_n_steps must be at least 1"):
        fit(model, max_steps=1)


def ddp_routing_metrics(rank: int, world_size: int) -> dict:
    """Fit a TwoLayerRegressor under DDP on data that differs by rank; the step values and the epoch metrics."""
    torch.manual_seed(0)
    model = TwoLayerRegressor(second_num_experts=3)
    generator = torch.Generator().manual_seed(rank)
    x, y = torch.randn(24, 6, generator=generator), torch.randn(24, 6, generator=generator)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    trainer = scenarios.trainer(world_size, strategy="ddp", max_epochs=1)
    trainer.fit(model, loader)
    epoch = {key: float(value) for key, value in trainer.callback_metrics.items() if key.endswith("_epoch")}
    return {"steps": model.step_metrics, "epoch": epoch}


def test_epoch_routing_metrics_are_means_over_all_ranks_steps() -> None:
    results = run_on_ranks(2, ddp_routing_metrics)
    for name in ("aux_loss", "z_loss", "drop_rate", "load_imbalance"):
        steps = [step[name] for result in results for step in result["steps"]]
        assert len(steps) == 6
        for result in results:
            assert result["epoch"][f"moe/{name}_epoch"] == pytest.approx(sum(steps) / len(steps), rel=1e-5), name
    # The ranks saw different data, so a rank's own mean would not pass the check above.
    assert results[0]["steps"] != results[1]["steps"]


def test_moe_layers_found_in_order() -> None:
    model = Regressor()
    model.second = MoE(6, num_experts=2)
    assert list(model.moe_layers()) == [model.moe, model.second]


def test_batch_hooks_walk_the_modules_once_per_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    # The per-batch hooks take the MoE layers found when training started: walking every submodule
    # at every batch costs a small model several percent of its step.
    walks = []
    walk = MoELightningModule.moe_layers
    monkeypatch.setattr(MoELightningModule, "moe_layers", lambda self: walks.append(self) or walk(self))
    model = Regressor()
    fit(model, max_steps=3, accumulate=2)
    assert len(walks) == 1
    assert model.moe.aux_loss_scale == pytest.approx(0.5)
    # A later fit walks again: a layer swapped in between gets its loss scale.
    model.moe = MoE(6, num_experts=4, d_hidden=8)
    fit(model, max_steps=1, accumulate=4)
    assert len(walks) == 2
    assert model.moe.aux_loss_scale == pytest.approx(0.25)


def test_sigmoid_bias_updated_once_per_optimizer_step_with_all_micro_batches(monkeypatch) -> None:
    from lightning_moe.routers import SigmoidRouter

    torch.manual_seed(0)
    model = Regressor(router="sigmoid")
    seen: list[torch.Tensor] = []
    original = SigmoidRouter.update_bias

    def recording_update_bias(self, tokens_per_expert=None):
        seen.append(self.pending_tokens_per_expert.clone())
        original(self, tokens_per_expert)

    monkeypatch.setattr(SigmoidRouter, "update_bias", recording_update_bias)
    fit(model, max_steps=3, accumulate=2)
    assert len(seen) == 3
    # Two micro-batches of 8 tokens, top-2: 32 assignments per optimizer step.
    assert [int(counts.sum()) for counts in seen] == [32, 32, 32]
    assert model.moe.router.bias.abs().sum() > 0
    assert int(model.moe.router.pending_tokens_per_expert.sum()) == 0
