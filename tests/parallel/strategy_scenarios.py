"""Checks of MoEStrategy's setup, evaluation and data handling, run inside spawned ranks."""

from __future__ import annotations

import contextlib
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader

from lightning_moe import MoE, MoELightningModule, MoEStrategy

D_MODEL = 8


class Tagger(MoELightningModule):
    """A per-token model; with ``build_in_configure_model`` its layers are built in configure_model."""

    def __init__(
        self, num_experts: int = 4, build_in_configure_model: bool = False, module_experts: bool = False
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.module_experts = module_experts
        if not build_in_configure_model:
            self.configure_model()

    def configure_model(self) -> None:
        if hasattr(self, "moe"):
            return
        self.inp = torch.nn.Linear(D_MODEL, D_MODEL)
        # One module per expert: an idle expert's parameters get no gradient of their own.
        experts = mlp_expert if self.module_experts else None
        self.moe = MoE(D_MODEL, num_experts=self.num_experts, top_k=2, d_hidden=12, experts=experts)

    def forward(self, x):
        return self.moe(self.inp(x))

    def training_step(self, batch, batch_idx):
        return self(batch).square().mean()

    def validation_step(self, batch, batch_idx):
        self.log("val", self(batch).square().mean(), sync_dist=True)

    def predict_step(self, batch, batch_idx):
        return self(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def mlp_expert() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(D_MODEL, 12), torch.nn.GELU(), torch.nn.Linear(12, D_MODEL))


class NoMoE(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(D_MODEL, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def tokens(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, D_MODEL, generator=torch.Generator().manual_seed(seed))


def loader(num_batches: int, seed: int) -> DataLoader:
    return DataLoader([tokens(5, seed * 100 + i) for i in range(num_batches)], batch_size=None)


def trainer(world_size: int, strategy="moe_default", **kwargs) -> Trainer:
    if strategy == "moe_default":
        strategy = MoEStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60))
    defaults = dict(
        accelerator="cpu",
        devices=world_size,
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    return Trainer(**{**defaults, **kwargs})


def error_of(fn) -> str:
    try:
        fn()
    except Exception as error:  # the message is what the test checks
        return f"{type(error).__name__}: {error}"
    return ""


def bad_configurations(rank: int, world_size: int) -> dict[str, str]:
    """Each misconfiguration must fail on every rank at setup, with an error that names the fix."""
    torch.manual_seed(0)
    ep3 = MoEStrategy(expert_parallel_size=3, process_group_backend="gloo")
    return {
        "ep_larger_than_world": error_of(lambda: trainer(world_size, ep3, max_steps=1).fit(Tagger(), loader(2, rank))),
        "ep_not_dividing_experts": error_of(lambda: trainer(world_size, max_steps=1).fit(Tagger(3), loader(2, rank))),
        "ranks_disagree": error_of(lambda: trainer(world_size, max_steps=1).fit(Tagger(2 + 2 * rank), loader(2, rank))),
    }


def no_moe_layer(rank: int, world_size: int) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(world_size, max_steps=2).fit(NoMoE(), loader(2, rank))
    return [str(w.message) for w in caught if "no MoE layer" in str(w.message)]


def uneven_evaluation(rank: int, world_size: int) -> dict:
    """Validation and prediction under EP with a different number of batches on each rank."""
    torch.manual_seed(0)
    model = Tagger()
    fit_trainer = trainer(world_size, max_steps=2, num_sanity_val_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_trainer.fit(model, loader(2, rank), loader(3 + 2 * rank, 50 + rank))
        predictions = trainer(world_size).predict(model, loader(2 + rank, 70 + rank))
    return {
        "predictions": predictions,
        "inputs": [tokens(5, (70 + rank) * 100 + i) for i in range(2 + rank)],
        "warnings": [str(w.message) for w in caught if "batches but another rank" in str(w.message)],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def configure_model_on_meta(rank: int, world_size: int) -> dict:
    """Layers built in configure_model: only local experts ever exist; weights as the same run on one process."""
    torch.manual_seed(0)
    model = Tagger(num_experts=4, build_in_configure_model=True)
    trainer(world_size).validate(model, loader(1, rank))  # sets up (shards, materialises) without training
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "offset": model.moe.experts.expert_offset}


def plain_ddp_with_idle_experts(rank: int, world_size: int) -> dict:
    """FastMoE's data-parallel mode: every rank holds every expert, under Lightning's own DDP."""
    torch.manual_seed(0)
    model = Tagger(num_experts=8, module_experts=True)
    with torch.no_grad():  # equal logits: every token goes to the first two experts, six are idle
        model.moe.router.weight.zero_()
    strategy = "ddp" if world_size > 1 else "auto"
    trainer(world_size, strategy=strategy, max_steps=3).fit(model, loader(3, rank))
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}}


def skewed_exchange(rank: int, world_size: int) -> dict:
    """Expert-parallel layer where rank 0 sends nothing to its peer and rank 1 has no tokens at all."""
    import torch.distributed as dist

    from lightning_moe.parallel.sharding import shard_experts

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    whole = MoE(D_MODEL, num_experts=4, top_k=2, d_hidden=12)
    with torch.no_grad():  # experts 0 and 1 (on rank 0) always win
        whole.router.weight.zero_()
        whole.router.weight[:2, 0] = 1.0
    sharded = MoE(D_MODEL, num_experts=4, top_k=2, d_hidden=12)
    sharded.load_state_dict(whole.state_dict())
    shard_experts(sharded, rank, world_size, dist.group.WORLD)
    x = tokens(6, 3).abs() if rank == 0 else tokens(0, 4)
    x.requires_grad_(True)
    out = sharded(x)
    out.square().sum().backward()
    return {
        "out": out.detach(),
        "x_grad": x.grad,
        "w1_grad": sharded.experts.w1.grad,
        "x": x.detach(),
        "whole": whole.state_dict(),
    }


def _thread_names() -> list[str]:
    """The names of this process's threads, native ones included (Linux)."""
    names = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            names.append((task / "comm").read_text().strip())
    return names


def destroy_after_fit(rank: int, world_size: int) -> dict:
    """Two steps, then what the spawn launcher's workers do at their end (gather the experts, which
    drops the layers' expert-parallel dispatchers, then destroy_process_groups): which threads run
    before and after."""
    torch.manual_seed(0)
    model = Tagger(module_experts=False)
    fitted = trainer(world_size, max_steps=2)
    fitted.fit(model, loader(2, 0))
    before = _thread_names()
    strategy = fitted.strategy
    assert isinstance(strategy, MoEStrategy)
    strategy.gather_experts()
    strategy.destroy_process_groups()
    return {"before": before, "after": _thread_names(), "initialized": dist.is_initialized()}


def fit_two_steps(rank: int, world_size: int, module_experts: bool) -> dict:
    """Two steps with the same batches on every rank (as a spawn launcher hands them out)."""
    torch.manual_seed(0)
    model = Tagger(module_experts=module_experts)
    trainer(world_size, max_steps=2).fit(model, loader(2, 0))
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}}
