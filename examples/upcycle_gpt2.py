"""Sparse upcycling: turn a dense Hugging Face GPT-2 into an MoE model, then fine-tune it with Lightning.

The dense GPT-2 is built from a small config (no download) over bytes, so it trains on the
corpus that ships with Python. In ``configure_model`` every feed-forward block becomes an MoE
layer whose experts all start as copies of that block: at step 0 the MoE model computes exactly
what the dense model did, and training then moves the experts apart. The expert-load heatmap
and the per-layer drop rate and router entropy are logged every 50 steps.

    pip install transformers
    python examples/upcycle_gpt2.py fit --trainer.max_steps 300
    lightning-moe plot-load lightning_logs            # redraw the last logged expert load

To upcycle a trained dense model instead, build ``self.gpt2`` with
``GPT2LMHeadModel.from_pretrained(path)`` (and data in its tokenizer's vocabulary); nothing else
changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_moe import MoE, MoELightningModule
from lightning_moe.callbacks import ExpertLoadMonitor
from lightning_moe.conversion import moefy
from lightning_moe.data import ByteCorpusDataModule


class UpcycledGPT2(MoELightningModule):
    """A byte-level GPT-2 whose MLPs become upcycled MoE layers before training.

    Args:
        n_layer, n_embd, n_head: The dense GPT-2's size.
        num_experts: Experts per MoE layer.
        top_k: Experts per token.
        learning_rate: AdamW learning rate.
    """

    def __init__(
        self,
        n_layer: int = 4,
        n_embd: int = 128,
        n_head: int = 4,
        num_experts: int = 8,
        top_k: int = 2,
        learning_rate: float = 1e-3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        config = GPT2Config(
            vocab_size=256,
            n_positions=1024,
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
            bos_token_id=0,
            eos_token_id=0,
        )
        self.gpt2 = GPT2LMHeadModel(config)

    def configure_model(self) -> None:
        # Lightning may call this more than once; upcycle only the first time.
        if any(isinstance(module, MoE) for module in self.modules()):
            return
        report = moefy(self.gpt2, self.hparams.num_experts, self.hparams.top_k, upcycle=True)
        rank_zero_info(str(report))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, S) byte ids -> (B, S, 256) logits."""
        return self.gpt2(input_ids=idx).logits

    def next_byte_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        return F.cross_entropy(self(inputs).flatten(0, 1), targets.flatten())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.next_byte_loss(batch)
        self.log_step_value("train_loss", loss)  # a host copy at the logging steps: no wait for the GPU
        return loss  # the MoE balance losses reach the gradients by themselves

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.next_byte_loss(batch), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Built after configure_model, so it holds the experts' parameters.
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.learning_rate)


if __name__ == "__main__":
    LightningCLI(
        UpcycledGPT2,
        ByteCorpusDataModule,
        seed_everything_default=1337,
        trainer_defaults={
            "max_steps": 300,
            "val_check_interval": 50,
            "limit_val_batches": 8,
            "log_every_n_steps": 10,
            "callbacks": [ExpertLoadMonitor(every_n_steps=50)],
        },
    )
