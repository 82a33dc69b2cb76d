"""Training runs executed inside spawned ranks (see ``launch.py``).

The data of optimizer step s, micro-batch a, data-parallel rank r is ``batch(s, a, r)``. A run on
W ranks feeds rank r the batches ``batch(s, a, r)``; the single-process reference feeds one
process every ``batch(s, a, r)`` of a step as its micro-batches, with W times the accumulation.
Both then see the same global batch per optimizer step, split into the same micro-batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta

import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, IterableDataset

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
    # True: the micro-batches of the data ranks a process stands for arrive as one Lightning batch
    # (the model loops over them); False: as separate batches, through gradient accumulation.
    pack_data_ranks: bool = False
    # AdamW with fused=True: clipping by norm then happens inside its step (MoELightningModule).
    fused_adam: bool = False
    # Seconds each training step sleeps: gives a test time to kill a run mid-training.
    step_sleep: float = 0.0


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
        micro_batches = batch if self.config.pack_data_ranks else [batch]
        for layer in self.moe_layers():
            layer.aux_loss_scale /= len(micro_batches)  # each micro-batch's losses weigh 1/k
        losses = [torch.nn.functional.mse_loss(self(x), y) for x, y in micro_batches]
        time.sleep(self.config.step_sleep)
        self.losses.extend(loss.item() for loss in losses)
        return torch.stack(losses).mean()

    def configure_optimizers(self):
        # eps well above float32 rounding of the gradients: Adam's first steps divide a gradient by
        # its own magnitude, which would blow rounding noise on near-zero gradients up to lr.
        return torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.01, eps=1e-3, fused=self.config.fused_adam)


def batch(step: int, micro: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(10_000 * step + 100 * micro + rank)
    x = torch.randn(2, BATCH_TOKENS // 2, D_MODEL, generator=generator)
    return x, torch.randn(x.shape, generator=generator)


def data_ranks_of(rank: int, world_size: int, config: RunConfig) -> list[int]:
    """The data-parallel ranks whose batches process ``rank`` of ``world_size`` consumes."""
    per_process = config.data_ranks // world_size
    return list(range(rank * per_process, (rank + 1) * per_process))


class StepBatches(IterableDataset):
    """The micro-batches of the trainer's current optimizer step, read when iteration starts, so a
    resumed run sees exactly the batches an uninterrupted run would."""

    def __init__(self, config: RunConfig, ranks: list[int], trainer: Trainer) -> None:
        self.config, self.ranks, self.trainer = config, ranks, trainer

    def __len__(self) -> int:
        return self.config.accumulate * (1 if self.config.pack_data_ranks else len(self.ranks))

    def __iter__(self):
        step = self.trainer.global_step
        if self.config.pack_data_ranks:
            return iter([[batch(step, a, r) for r in self.ranks] for a in range(self.config.accumulate)])
        return iter([batch(step, a, r) for a in range(self.config.accumulate) for r in self.ranks])


class EpochPerStepData(LightningDataModule):
    """One optimizer step per epoch."""

    def __init__(self, config: RunConfig, ranks: list[int]) -> None:
        super().__init__()
        self.config, self.ranks = config, ranks

    def train_dataloader(self) -> DataLoader:
        return DataLoader(StepBatches(self.config, self.ranks, self.trainer), batch_size=None)


def make_trainer(world_size: int, config: RunConfig, ranks: list[int], max_steps: int, **kwargs) -> Trainer:
    strategy = MoEStrategy(
        expert_parallel_size=config.expert_parallel_size,
        process_group_backend="gloo",
        timeout=timedelta(seconds=120),
    )
    defaults = dict(logger=False, enable_checkpointing=False)
    return Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=strategy,
        max_steps=max_steps,
        max_epochs=-1,
        accumulate_grad_batches=config.accumulate * (1 if config.pack_data_ranks else len(ranks)),
        gradient_clip_val=config.clip,
        use_distributed_sampler=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **{**defaults, **kwargs},
    )


def train(
    rank: int, world_size: int, config: RunConfig, resume_from: str | None = None, checkpoint_dir: str | None = None
) -> dict:
    """Train on ``world_size`` ranks, each standing for ``data_ranks / world_size`` data ranks.

    Optionally resume from ``resume_from``, and save a checkpoint ``step=N.ckpt`` into
    ``checkpoint_dir`` after every step (with ``ModelCheckpoint``, at the end of each epoch).
    Returns this rank's losses (one per micro-batch) and state dict.
    """
    torch.manual_seed(0)
    model = TwoLayerMoE(config)
    ranks = data_ranks_of(rank, world_size, config)
    kwargs = {}
    if checkpoint_dir is not None:
        every_epoch = ModelCheckpoint(checkpoint_dir, filename="{step}", save_top_k=-1, save_on_train_epoch_end=True)
        kwargs = dict(enable_checkpointing=True, callbacks=[every_epoch])
    trainer = make_trainer(world_size, config, ranks, config.steps, **kwargs)
    trainer.fit(model, EpochPerStepData(config, ranks), ckpt_path=resume_from)
    return {"losses": model.losses, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def train_many(rank: int, world_size: int, configs: list[RunConfig]) -> list[dict]:
    """:func:`train` for each configuration in turn, in the same processes."""
    return [train(rank, world_size, config) for config in configs]
