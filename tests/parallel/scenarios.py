"""Training runs executed inside spawned ranks (see ``launch.py``).

The data of optimizer step s, micro-batch a, data-parallel rank r is ``batch(s, a, r)``. A run on
W ranks feeds rank r the batches ``batch(s, a, r)``; the single-process reference feeds one
process every ``batch(s, a, r)`` of a step as its micro-batches, with W times the accumulation.
Both then see the same global batch per optimizer step, split into the same micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from lightning_moe import MoE, MoELightningModule, MoEStrategy

D_MODEL = 8
BATCH_TOKENS = 6


@dataclass(frozen=True)
class RunConfig:
    """One training configuration; ``data_ranks`` is the W whose batches are used."""

    data_ranks: int
    steps: int = 3
    accumulate: int = 1
    clip: float | None = None
    capacity_factor: float | None = None
    router: str = "topk"
    num_experts: int = 4
    top_k: int = 2
    expert_parallel_size: int | None = None


class TwoLayerMoE(MoELightningModule):
    def __init__(self, config: RunConfig) -> None:
        super().__init__()
        self.config = config
        layer_kwargs = dict(
            num_experts=config.num_experts,
            top_k=config.top_k,
            d_hidden=12,
            router=config.router,
            capacity_factor=config.capacity_factor,
            aux_loss_weight=0.1,
            z_loss_weight=0.01,
        )
        self.inp = torch.nn.Linear(D_MODEL, D_MODEL)
        self.moe1 = MoE(D_MODEL, activation="swiglu", **layer_kwargs)
        self.moe2 = MoE(D_MODEL, num_shared_experts=1, **layer_kwargs)
        self.out = torch.nn.Linear(D_MODEL, D_MODEL)
        self.losses: list[float] = []

    def forward(self, x):
        h = self.inp(x)
        h = h + self.moe1(h)
        h = h + self.moe2(torch.tanh(h))
        return self.out(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        # eps well above float32 rounding of the gradients: Adam's first steps divide a gradient by
        # its own magnitude, which would blow rounding noise on near-zero gradients up to lr.
        return torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.01, eps=1e-3)


def batch(step: int, micro: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(10_000 * step + 100 * micro + rank)
    x = torch.randn(2, BATCH_TOKENS // 2, D_MODEL, generator=generator)
    return x, torch.randn(x.shape, generator=generator)


def batches_for(config: RunConfig, ranks: list[int]) -> list:
    """The micro-batches one process consumes, in order, when it stands for ``ranks``."""
    return [batch(s, a, r) for s in range(config.steps) for a in range(config.accumulate) for r in ranks]


def train(rank: int, world_size: int, config: RunConfig) -> dict:
    """Train on ``world_size`` ranks (1 = the single-process reference); return losses and weights."""
    torch.manual_seed(0)
    model = TwoLayerMoE(config)
    ranks = list(range(config.data_ranks)) if world_size == 1 else [rank]
    loader = DataLoader(batches_for(config, ranks), batch_size=None)
    strategy = MoEStrategy(
        expert_parallel_size=config.expert_parallel_size,
        process_group_backend="gloo",
        timeout=timedelta(seconds=120),
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=strategy,
        max_steps=config.steps,
        accumulate_grad_batches=config.accumulate * len(ranks),
        gradient_clip_val=config.clip,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    return {
        "losses": model.losses,
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }


def train_many(rank: int, world_size: int, configs: list[RunConfig]) -> list[dict]:
    """:func:`train` for each configuration in turn, in the same processes."""
    return [train(rank, world_size, config) for config in configs]
