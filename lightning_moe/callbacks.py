"""Lightning callbacks that show what the experts do.

:class:`ExpertLoadMonitor` watches every MoE layer of the model during training. Every
``every_n_steps`` optimizer steps it logs

- ``moe/layer{i}/drop_rate``: assignments dropped by capacity / assignments, over the interval;
- ``moe/layer{i}/router_entropy``: the mean over tokens of the entropy (in nats) of the router's
  distribution over experts; ``ln E`` is a router that cannot tell experts apart, 0 a certain one;
- an expert-load heatmap (layers x experts, each expert's share of its layer's token
  assignments): an image in TensorBoard when a ``TensorBoardLogger`` is active, otherwise a PNG
  under ``<log dir>/expert_load/``;

and appends the interval's counts to ``<log dir>/expert_load/counts.jsonl``, which
``lightning-moe plot-load LOGDIR`` (:func:`lightning_moe.plotting.plot_load`) draws afterwards.
Layer ``i`` is the i-th MoE layer of the model in registration order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from typing_extensions import override

from lightning_moe.layers.moe import MoE
from lightning_moe.plotting import COUNTS_FILENAME, LOAD_DIRNAME, record_title, render_load_heatmap, save_png
from lightning_moe.routers import Router, SigmoidRouter


class _LayerTally:
    """What one MoE layer routed during the current interval, accumulated on its device."""

    def __init__(self, name: str, layer: MoE) -> None:
        self.name = name
        self.layer = layer
        self.reset()

    def reset(self) -> None:
        self.tokens_per_expert: Tensor | None = None
        self.dropped = 0
        self.assignments = 0
        self.entropy_sum: Tensor | None = None
        self.tokens = 0

    @torch.no_grad()
    def after_forward(self, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        """Forward hook of the layer: add this training forward's routing to the tally."""
        if not layer.training or not self.layer.routing_stats:
            return
        x = args[0] if args else kwargs["x"]
        stats = self.layer.routing_stats
        counts = stats["tokens_per_expert"].detach()
        self.tokens_per_expert = counts if self.tokens_per_expert is None else self.tokens_per_expert + counts
        self.dropped += int(stats["dropped"])
        self.assignments += int(stats["assignments"])
        x_TD = x.detach().reshape(-1, self.layer.d_model)
        entropy = routing_entropy(self.layer.router, x_TD).sum()
        self.entropy_sum = entropy if self.entropy_sum is None else self.entropy_sum + entropy
        self.tokens += x_TD.shape[0]

    def packed(self, device: torch.device) -> Tensor:
        """(E + 4,): counts, dropped, assignments, entropy sum, tokens; one tensor to all-reduce."""
        counts = self.tokens_per_expert if self.tokens_per_expert is not None else torch.zeros(self.layer.num_experts)
        entropy = float(self.entropy_sum) if self.entropy_sum is not None else 0.0
        scalars = torch.tensor([self.dropped, self.assignments, entropy, self.tokens], dtype=torch.float64)
        # float64 keeps counts exact far past 2**24; MPS has no float64.
        dtype = torch.float32 if device.type == "mps" else torch.float64
        return torch.cat([counts.cpu().double(), scalars]).to(device=device, dtype=dtype)


def routing_entropy(router: Router, x_TD: Tensor) -> Tensor:
    """(T,) entropy in nats of the router's distribution over experts for each token.

    Softmax routers: the softmax of the logits. The sigmoid router: its scores normalised to sum to 1.
    """
    logits_TE = router.logits(x_TD)
    if isinstance(router, SigmoidRouter):
        scores_TE = torch.sigmoid(logits_TE)
        log_probs_TE = torch.log(scores_TE) - torch.log(scores_TE.sum(dim=-1, keepdim=True))
    else:
        log_probs_TE = torch.log_softmax(logits_TE, dim=-1)
    return -(log_probs_TE.exp() * log_probs_TE).sum(dim=-1)


class ExpertLoadMonitor(Callback):
    """Log each MoE layer's expert load, drop rate and router entropy every ``every_n_steps`` steps.

    Counts are summed over every training forward of the interval (and over all processes), so
    the picture does not depend on which batch happened to come last. The counts left at the end
    of training are logged as a last, shorter interval.

    Args:
        every_n_steps: Optimizer steps per logging interval.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive int, got {every_n_steps!r}.")
        self.every_n_steps = every_n_steps
        self._tallies: list[_LayerTally] = []
        self._hooks: list[Any] = []
        self._last_logged_step = 0

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Not in setup(): layers made in configure_model exist only from here on.
        self._remove_hooks()
        self._tallies = [_LayerTally(name, m) for name, m in pl_module.named_modules() if isinstance(m, MoE)]
        self._hooks = [t.layer.register_forward_hook(t.after_forward, with_kwargs=True) for t in self._tallies]
        self._last_logged_step = trainer.global_step

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step != self._last_logged_step and step % self.every_n_steps == 0:
            self._log_interval(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step != self._last_logged_step:
            self._log_interval(trainer, pl_module)
        self._remove_hooks()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _log_interval(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._tallies:
            return
        # One collective for all layers; every process reaches this at the same step.
        packed = [tally.packed(pl_module.device) for tally in self._tallies]
        reduced = trainer.strategy.reduce(torch.cat(packed), reduce_op="sum").double().cpu()
        record = self._record(reduced.split([p.numel() for p in packed]), trainer.global_step)
        for tally in self._tallies:
            tally.reset()
        self._last_logged_step = trainer.global_step
        # `trainer.log_dir` broadcasts under DDP-like strategies: every process must ask for it.
        directory = Path(trainer.log_dir or trainer.default_root_dir) / LOAD_DIRNAME
        if trainer.is_global_zero:
            self._publish(trainer, record, directory)

    def _record(self, per_layer: tuple[Tensor, ...], step: int) -> dict[str, Any]:
        record: dict[str, Any] = {"step": step, "first_step": self._last_logged_step + 1, "layers": []}
        for key in ("tokens_per_expert", "dropped", "assignments", "router_entropy"):
            record[key] = []
        for tally, values in zip(self._tallies, per_layer, strict=True):
            counts, (dropped, assignments, entropy_sum, tokens) = values[:-4], values[-4:].tolist()
            record["layers"].append(tally.name)
            record["tokens_per_expert"].append([int(c) for c in counts.tolist()])
            record["dropped"].append(int(dropped))
            record["assignments"].append(int(assignments))
            record["router_entropy"].append(entropy_sum / max(tokens, 1.0))
        return record

    def _publish(self, trainer: Trainer, record: dict[str, Any], directory: Path) -> None:
        metrics = {}
        for i, (dropped, assignments, entropy) in enumerate(
            zip(record["dropped"], record["assignments"], record["router_entropy"], strict=True)
        ):
            metrics[f"moe/layer{i}/drop_rate"] = dropped / max(assignments, 1)
            metrics[f"moe/layer{i}/router_entropy"] = entropy
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=record["step"])
            logger.save()
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / COUNTS_FILENAME, "a") as counts_file:
            counts_file.write(json.dumps(record) + "\n")
        image = render_load_heatmap(record["tokens_per_expert"], record_title(record))
        tensorboards = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        for logger in tensorboards:
            logger.experiment.add_image("moe/expert_load", image, record["step"], dataformats="HWC")
        if not tensorboards:
            save_png(image, directory / f"step_{record['step']:07d}.png")
