"""A small GPT-style decoder whose feed-forward layers are Mixture-of-Experts.

Shape legend: B batch, S sequence (at most ``block_size``), D model dim, H heads,
Dh head dim (D / H), V vocabulary.

:class:`MoEGPT` is the model, a plain ``nn.Module`` in the manner of nanoGPT: token and position
embeddings, pre-LayerNorm blocks of causal self-attention and :class:`~lightning_moe.MoE`, a final
LayerNorm and a language-model head tied to the token embedding. :class:`MoEGPTModule` trains it
with Lightning on next-token prediction; it is the default model of the ``lightning-moe`` command.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Literal, cast, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_moe import ops
from lightning_moe.layers.activations import Activation
from lightning_moe.layers.moe import MoE
from lightning_moe.module import MoELightningModule
from lightning_moe.optim import AdamW
from lightning_moe.routers import RouterName

# torch.compile modes; "reduce-overhead" replays CUDA graphs, so a step no longer waits for the host.
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position sees only itself and earlier positions.

    Args:
        d_model: Model dimension D.
        n_head: Number of heads H; must divide D.
        dropout: Dropout on the attention weights and on the output.
    """

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x_BSD: Tensor) -> Tensor:
        """Attend over earlier positions; (B, S, D) -> (B, S, D)."""
        B, S, D = x_BSD.shape
        # (B, S, D) -> (B, H, S, Dh) each: heads become a batch dimension for the attention kernel.
        q, k, v = (t.view(B, S, self.n_head, D // self.n_head).transpose(1, 2) for t in self.qkv(x_BSD).split(D, -1))
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)  # (B, H, S, Dh)
        y_BSD = y.transpose(1, 2).reshape(B, S, D)
        return self.resid_dropout(self.proj(y_BSD))


class Block(nn.Module):
    """One pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + moe(ln(x))``.

    Args:
        d_model: Model dimension D.
        n_head: Number of attention heads.
        dropout: Dropout on the attention and on the MoE output.
        moe_kwargs: Arguments of :class:`~lightning_moe.MoE` besides ``d_model``.
    """

    def __init__(self, d_model: int, n_head: int, dropout: float, **moe_kwargs: Any) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.ln_moe = nn.LayerNorm(d_model)
        self.moe = MoE(d_model, **moe_kwargs)
        self.moe_dropout = nn.Dropout(dropout)

    def forward(self, x_BSD: Tensor) -> Tensor:
        """(B, S, D) -> (B, S, D)."""
        x_BSD = x_BSD + self.attn(self.ln_attn(x_BSD))
        return x_BSD + self.moe_dropout(self.moe(self.ln_moe(x_BSD)))


class MoEGPT(nn.Module):
    """A GPT-style decoder-only language model with an MoE feed-forward in every block.

    Args:
        vocab_size: Vocabulary size V; 256 for byte-level text.
        block_size: Longest context S the position embedding covers.
        n_layer: Number of transformer blocks.
        n_head: Attention heads per block; must divide ``d_model``.
        d_model: Model dimension D.
        num_experts: Routed experts per MoE layer.
        top_k: Experts per token.
        d_hidden: Expert hidden dimension; defaults to ``4 * d_model``.
        activation: Expert activation.
        router: Routing scheme of every MoE layer.
        capacity_factor: ``None`` for dropless routing, else the experts' capacity factor.
        num_shared_experts: Always-on experts per MoE layer.
        aux_loss_weight: Weight of each layer's load-balancing loss in the gradient.
        z_loss_weight: Weight of each layer's router z-loss in the gradient.
        dropout: Dropout on embeddings, attention and block outputs.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        block_size: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        d_model: int = 128,
        num_experts: int = 8,
        top_k: int = 2,
        d_hidden: int | None = None,
        activation: Activation = "gelu",
        router: RouterName = "topk",
        capacity_factor: float | None = None,
        num_shared_experts: int = 0,
        aux_loss_weight: float = 0.01,
        z_loss_weight: float = 0.001,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _validate(vocab_size, block_size, n_layer, n_head, d_model, dropout)
        self.block_size = block_size
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(block_size, d_model)
        self.embedding_dropout = nn.Dropout(dropout)
        moe_kwargs = dict(
            num_experts=num_experts,
            top_k=top_k,
            d_hidden=d_hidden,
            activation=activation,
            router=router,
            capacity_factor=capacity_factor,
            num_shared_experts=num_shared_experts,
            aux_loss_weight=aux_loss_weight,
            z_loss_weight=z_loss_weight,
        )
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout, **moe_kwargs) for _ in range(n_layer))
        self.ln_final = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight  # weight tying: one matrix for bytes in and out
        self._init_dense_weights(n_layer)

    @torch.no_grad()
    def _init_dense_weights(self, n_layer: int) -> None:
        """GPT-2 initialisation of the embeddings and attention; the MoE layers keep their own.

        Small embeddings make the initial logits nearly uniform (loss close to ln V). The residual
        projections are scaled down by ``sqrt(2 * n_layer)`` so the residual stream's variance
        does not grow with depth.
        """
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)
        for block in self.blocks:
            attn = cast(Block, block).attn
            nn.init.normal_(attn.qkv.weight, std=0.02)
            nn.init.normal_(attn.proj.weight, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx: Tensor) -> Tensor:
        """Next-token logits at every position.

        Args:
            idx: (B, S) int64 token ids, S <= ``block_size``.

        Returns:
            (B, S, V) float logits; position s depends on ``idx[:, : s + 1]`` only.
        """
        if idx.dim() != 2 or idx.shape[1] > self.block_size:
            raise ValueError(
                f"MoEGPT expects token ids of shape (batch, seq) with seq <= block_size={self.block_size}, "
                f"got {tuple(idx.shape)}; crop the sequence or build the model with a larger block_size."
            )
        positions_S = torch.arange(idx.shape[1], device=idx.device)
        x_BSD = self.embedding_dropout(self.token_embedding(idx) + self.position_embedding(positions_S))
        for block in self.blocks:
            x_BSD = block(x_BSD)
        return self.lm_head(self.ln_final(x_BSD))

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None) -> Tensor:
        """Sample a continuation token by token.

        Call it in eval mode (``model.eval()``) so that dropout is off.

        Args:
            idx: (B, S) int64 prompt token ids.
            max_new_tokens: Number of tokens to append.
            temperature: Divides the logits; below 1 is more conservative, 0 picks the most likely.
            top_k: Sample only among the ``top_k`` most likely tokens; ``None`` for all.

        Returns:
            (B, S + max_new_tokens) int64, the prompt followed by the sampled tokens.
        """
        for _ in range(max_new_tokens):
            # Only the last block_size tokens fit in the position embedding.
            logits_BV = self(idx[:, -self.block_size :])[:, -1, :].float()
            if temperature == 0:
                next_B1 = logits_BV.argmax(dim=-1, keepdim=True)
            else:
                logits_BV = logits_BV / temperature
                if top_k is not None:
                    kth_largest_B1 = torch.topk(logits_BV, min(top_k, logits_BV.shape[-1])).values[:, -1:]
                    logits_BV = logits_BV.masked_fill(logits_BV < kth_largest_B1, float("-inf"))
                next_B1 = torch.multinomial(torch.softmax(logits_BV, dim=-1), num_samples=1)
            idx = torch.cat([idx, next_B1], dim=1)
        return idx


class MoEGPTModule(MoELightningModule):
    """Trains :class:`MoEGPT` on next-token prediction with AdamW and a warmup-then-cosine schedule.

    Batches are ``(inputs, targets)``, both (B, S) int64 with targets the inputs shifted by one.
    Logs ``train_loss`` and ``val_loss`` (mean cross-entropy in nats per token); the balance
    losses of the MoE layers reach the gradient on their own and are logged by the base class.
    ``train_loss`` is logged, and shown in the progress bar, at the steps at which the logger
    writes step metrics (the Trainer's ``log_every_n_steps``, or ``routing_log_every_n_steps``)
    and at the last batch of an epoch or run, not at every step: reading it at every step would
    make the host wait for the GPU each time (see :meth:`logs_step_values`).

    The model arguments are those of :class:`MoEGPT`, repeated here for the command line's help.

    Args:
        vocab_size: Vocabulary size; 256 for bytes.
        block_size: Longest context in tokens.
        n_layer: Number of transformer blocks.
        n_head: Attention heads per block; must divide ``d_model``.
        d_model: Model dimension.
        num_experts: Routed experts per MoE layer.
        top_k: Experts per token.
        d_hidden: Expert hidden dimension; ``None`` for ``4 * d_model``.
        activation: Expert activation.
        router: Routing scheme of every MoE layer.
        capacity_factor: ``None`` for dropless routing, else the experts' capacity factor.
        num_shared_experts: Always-on experts per MoE layer.
        aux_loss_weight: Weight of each layer's load-balancing loss.
        z_loss_weight: Weight of each layer's router z-loss.
        dropout: Dropout on embeddings, attention and block outputs.
        learning_rate: Peak AdamW learning rate, reached after ``warmup_steps``.
        weight_decay: AdamW weight decay of the matrices; biases and LayerNorms get none.
        warmup_steps: Optimizer steps of linear warmup. After them the learning rate follows a
            cosine down to ``min_lr_ratio * learning_rate`` at the trainer's last step, or stays
            constant when the run has no step limit.
        min_lr_ratio: Final learning rate as a fraction of ``learning_rate``.
        compile_model: Run the model through ``torch.compile`` (``nn.Module.compile``, so the
            checkpoint keys stay the same): ``True`` in its default mode, or a mode name.
            ``"reduce-overhead"`` captures each step's kernels in CUDA graphs and replays them,
            which suits small models, whose steps otherwise wait for the host to launch kernels
            one by one (the default GPT trained 2.3x faster on an H200). The first steps take longer
            while it compiles.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        block_size: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        d_model: int = 128,
        num_experts: int = 8,
        top_k: int = 2,
        d_hidden: int | None = None,
        activation: Activation = "gelu",
        router: RouterName = "topk",
        capacity_factor: float | None = None,
        num_shared_experts: int = 0,
        aux_loss_weight: float = 0.01,
        z_loss_weight: float = 0.001,
        dropout: float = 0.0,
        learning_rate: float = 3e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
        compile_model: bool | CompileMode = False,
    ) -> None:
        super().__init__()
        if not isinstance(compile_model, bool) and compile_model not in get_args(CompileMode):
            raise ValueError(
                f"compile_model={compile_model!r} is not a torch.compile mode; use True, False or one of "
                f"{', '.join(get_args(CompileMode))}."
            )
        if not learning_rate > 0 or weight_decay < 0 or warmup_steps < 0 or not 0 <= min_lr_ratio <= 1:
            raise ValueError(
                f"Got learning_rate={learning_rate}, weight_decay={weight_decay}, warmup_steps={warmup_steps}, "
                f"min_lr_ratio={min_lr_ratio}; use learning_rate > 0, weight_decay >= 0, warmup_steps >= 0 "
                "and min_lr_ratio between 0 and 1."
            )
        self.save_hyperparameters()
        model_args = {name: self.hparams[name] for name in inspect.signature(MoEGPT).parameters}
        self.model = MoEGPT(**model_args)
        if compile_model:
            self.model.compile(**({} if compile_model is True else {"mode": compile_model}))

    @override
    def forward(self, idx: Tensor) -> Tensor:
        """(B, S) int64 token ids -> (B, S, V) logits."""
        return self.model(idx)

    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None) -> Tensor:
        """Sample a continuation of ``idx`` (B, S); see :meth:`MoEGPT.generate`."""
        return self.model.generate(idx, max_new_tokens, temperature, top_k)

    def next_token_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Mean cross-entropy of the predicted next tokens; ``batch`` is (inputs, targets), each (B, S)."""
        inputs_BS, targets_BS = batch
        logits_BSV = self(inputs_BS)
        return F.cross_entropy(logits_BSV.flatten(0, 1).float(), targets_BS.flatten())

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.next_token_loss(batch)
        self.log_step_value("train_loss", loss)  # not at every batch: see logs_step_values
        return loss

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.next_token_loss(batch), prog_bar=True)

    @override
    def configure_optimizers(self) -> Any:
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for param in self.parameters():
            # Matrices (and the experts' stacked matrices) are decayed; gains and biases are not.
            (decay if param.dim() >= 2 else no_decay).append(param)
        optimizer = AdamW(
            [
                {"params": decay, "weight_decay": self.hparams["weight_decay"]},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams["learning_rate"],
            betas=(0.9, 0.95),
            fused=self._fused_optimizer(),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _fused_optimizer(self) -> bool | None:
        """``fused`` for :class:`lightning_moe.optim.AdamW`: ``None`` (its kernel step) for CUDA
        parameters with the extension loaded, else whether torch's fused step runs, one kernel per
        step instead of several passes over every parameter, which counts for MoE models, whose
        experts hold most of the parameters.

        Torch's fused step is not used under fp16 loss scaling with gradient clipping, which an
        optimizer that unscales the gradients itself cannot be combined with.
        """
        devices = {param.device.type for param in self.parameters()}
        if devices == {"cuda"} and ops.cuda_kernels_available():
            return None
        if not devices <= {"cuda", "cpu"}:
            return False
        return not self._loss_scaling() or not self.trainer.gradient_clip_val

    def _lr_factor(self, step: int) -> float:
        """Multiplier of the peak learning rate at optimizer step ``step``."""
        warmup_steps = self.hparams["warmup_steps"]
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps) or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        min_ratio = self.hparams["min_lr_ratio"]
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _validate(vocab_size: int, block_size: int, n_layer: int, n_head: int, d_model: int, dropout: float) -> None:
    for name, value in (
        ("vocab_size", vocab_size),
        ("block_size", block_size),
        ("n_layer", n_layer),
        ("n_head", n_head),
        ("d_model", d_model),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if d_model % n_head:
        head_counts = [h for h in range(1, min(d_model, 32) + 1) if d_model % h == 0]
        raise ValueError(
            f"d_model={d_model} is not divisible by n_head={n_head}; choose n_head from {head_counts} "
            f"or a d_model that is a multiple of {n_head}."
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
