"""A pretrained-style dense GPT-2, upcycled with moefy in configure_model, under MoEStrategy."""

from __future__ import annotations

from datetime import timedelta

import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from lightning_moe import MoELightningModule, MoEStrategy, moefy
from lightning_moe.callbacks import ExpertLoadMonitor

VOCAB = 64


class UpcycledGPT2(MoELightningModule):
    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16)
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
        self.gpt = GPT2LMHeadModel(config)  # stands for a pretrained dense model
        self.upcycled = False

    def configure_model(self) -> None:
        if not self.upcycled:
            moefy(self.gpt, num_experts=4, top_k=2, upcycle=True)
            self.upcycled = True

    def forward(self, input_ids):
        return self.gpt(input_ids).logits

    def training_step(self, batch, batch_idx):
        return self.gpt(batch, labels=batch).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.gpt(batch, labels=batch).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def batches(rank: int, count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(rank)
    return [torch.randint(0, VOCAB, (2, 16), generator=generator) for _ in range(count)]


def upcycle_under_strategy(rank: int, world_size: int, log_dir: str) -> dict:
    model = UpcycledGPT2()
    inputs = batches(rank, 1)[0]
    with torch.no_grad():
        dense_logits = model(inputs)
    trainer = Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=MoEStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60)),
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=log_dir,
        callbacks=[ExpertLoadMonitor(every_n_steps=2)],  # its logging must not hang the ranks
    )
    trainer.validate(model, DataLoader(batches(rank, 1), batch_size=None))  # sets up: upcycles, shards
    model.eval()
    with torch.no_grad():
        upcycled_logits = model(inputs)  # every rank runs the same number of forwards
    experts = [m.experts for m in model.moe_layers()]
    first_state = {k: v.clone() for k, v in experts[0].state_dict().items()}
    trainer.fit(model, DataLoader(batches(rank, 3), batch_size=None))
    return {
        "dense": dense_logits,
        "upcycled": upcycled_logits,
        "local_experts": [e.num_experts for e in experts],
        "offsets": [e.expert_offset for e in experts],
        "before": first_state,
        "after": {k: v.clone() for k, v in experts[0].state_dict().items()},
    }
