"""``MoELightningModule``: the LightningModule base class for models with MoE layers.

It takes care of what every MoE model needs in a Lightning loop and that users of other systems
had to wire by hand: the balance and z losses scaled to match gradient accumulation and fp16 loss
scaling, the sigmoid router's balance bias updated once per optimizer step, and the routing
metrics logged during training.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import Tensor
from torch.optim import Optimizer
from torchmetrics import Metric
from typing_extensions import override

from lightning_moe.layers.moe import MoE
from lightning_moe.ops.cast import gradient_norm as kept_casts_gradient_norm
from lightning_moe.optim import AdamW
from lightning_moe.strategy import MoEStrategy

# Logged as moe/{name}, averaged over the MoE layers.
_ROUTING_METRICS = ("aux_loss", "z_loss", "drop_rate", "load_imbalance")


class MoELightningModule(LightningModule):
    """Subclass this instead of ``LightningModule`` when the model holds :class:`~lightning_moe.MoE` layers.

    Write ``training_step`` as usual and return the task loss only: each MoE layer's balance and
    z losses already reach the gradients. The module logs ``moe/aux_loss``, ``moe/z_loss``,
    ``moe/drop_rate`` and ``moe/load_imbalance`` (max over mean tokens per expert), averaged over
    the MoE layers; the last is shown in the progress bar. Their epoch values (``*_epoch``) are means
    over every training step of the epoch, and over all processes. Their step values (``*_step``)
    are logged every ``routing_log_every_n_steps`` optimizer steps (by default the Trainer's
    ``log_every_n_steps``, the steps at which Lightning writes step metrics to the logger) and at
    the last batch of an epoch or run: each ``self.log`` call costs a fraction of a millisecond of
    host time, a large share of a step for a small model. Set ``routing_log_every_n_steps = 1``
    to log them at every step. :meth:`log_step_value` logs a ``training_step``'s own step values
    the same way, as host copies at those steps (see :meth:`logs_step_values` for why).

    Subclasses that override :meth:`on_train_start`, :meth:`on_train_end`,
    :meth:`on_train_batch_start` or :meth:`on_train_batch_end` call ``super()`` so that this
    bookkeeping still happens.
    """

    #: Optimizer steps between two logs of the step values of the routing metrics; None follows
    #: the Trainer's ``log_every_n_steps``.
    routing_log_every_n_steps: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.moe_metrics = torch.nn.ModuleDict({name: _StepMean() for name in _ROUTING_METRICS})
        self._bias_updated_at_step = 0
        # The MoE layers found when training started (None outside training), for the per-batch
        # hooks: walking every submodule took 44 us of host time for the default GPT, three times
        # a batch.
        self._training_layers: list[MoE] | None = None

    def moe_layers(self) -> Iterator[MoE]:
        """The MoE layers of this module, in registration order."""
        return (module for module in self.modules() if isinstance(module, MoE))

    def _layers(self) -> list[MoE]:
        """The MoE layers, as found when training started; walked afresh outside training."""
        return list(self.moe_layers()) if self._training_layers is None else self._training_layers

    @override
    def on_train_start(self) -> None:
        # Counts from here on belong to the next optimizer step (also when resuming mid-run).
        self._bias_updated_at_step = self.trainer.global_step
        # The model is final here: configure_model and the callbacks' on_train_start have run.
        self._training_layers = list(self.moe_layers())

    @override
    def on_train_end(self) -> None:
        self._training_layers = None  # a later fit may train a changed model

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        # Lightning divides the loss by the accumulation steps and scales it for fp16 before the
        # backward pass; the losses attached inside the layers must get the same factor. It is set
        # before the forward pass because the layers read it there.
        scale = 1.0
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scale *= float(scaler.get_scale())
        if self.automatic_optimization:
            scale /= self.trainer.accumulate_grad_batches
        for layer in self._layers():
            layer.aux_loss_scale = scale
        return None

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._update_router_biases()
        self._log_routing_metrics()

    @override
    def configure_gradient_clipping(
        self,
        optimizer: Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip as Lightning does, except for :class:`lightning_moe.optim.AdamW` and fused torch
        Adam or AdamW without loss scaling, whose own step clips by norm.

        Lightning refuses to clip for optimizers that unscale gradients themselves (``fused=True``
        Adam and AdamW), which only matters under fp16 loss scaling. Without a loss scale, clipping
        by value runs as Lightning's would. Clipping by norm takes the norm of the model's gradient
        (every rank's experts counted, under :class:`~lightning_moe.MoEStrategy`) and hands the
        step ``max(1, norm / clip_val)`` as its gradient divisor (the optimizer's ``grad_scale``,
        as ``torch.amp.GradScaler`` would). The step divides each gradient as it reads it: the
        result of clipping then stepping, without clipping's own pass over every gradient, which
        costs a read and a write of each float32 gradient (for MoE models, whose experts hold most
        of the parameters, a large part of the optimizer's time). Torch's fused step stores the
        clipped gradients back; the kernel step of :class:`lightning_moe.optim.AdamW` leaves them
        unclipped. On one device, the norm takes the square sums that the backward of the weights'
        kept casts computed (:func:`lightning_moe.ops.cast.gradient_norm`) where they still hold.
        """
        if gradient_clip_val and _divides_gradients_in_step(optimizer) and not self._loss_scaling():
            plugin = self.trainer.precision_plugin
            if gradient_clip_algorithm not in (None, "norm"):  # by value: Lightning's own clipping
                plugin.clip_grad_by_value(optimizer, gradient_clip_val)
            elif isinstance(self.trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
                norm = self._gradient_norm(optimizer)
                _divide_gradients_in_step(optimizer, ((norm + 1e-6) / float(gradient_clip_val)).clamp(min=1.0))
            else:  # sharded gradients: the strategy's precision plugin knows their norm
                plugin.clip_grad_by_norm(optimizer, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _gradient_norm(self, optimizer: Optimizer) -> Tensor:
        """The 2-norm of the gradient of ``optimizer``'s parameters over the whole model."""
        strategy = self.trainer.strategy
        if isinstance(strategy, MoEStrategy):
            return strategy.gradient_norm(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if isinstance(strategy, SingleDeviceStrategy):
            # With the square sums of the expert weights' gradients taken as their backward cast
            # them (lightning_moe.optim.AdamW's kept casts), instead of reading them again.
            return kept_casts_gradient_norm(params)
        return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]).float()

    def _loss_scaling(self) -> bool:
        """Whether the precision plugin scales the loss (fp16 mixed precision)."""
        return getattr(self.trainer.precision_plugin, "scaler", None) is not None

    def _update_router_biases(self) -> None:
        """Let routers with a balance bias react once after each optimizer step.

        The counts are summed over all data-parallel ranks first, so every rank applies the update
        the global batch calls for and the biases stay identical everywhere.
        """
        if self.trainer.global_step == self._bias_updated_at_step:
            return
        self._bias_updated_at_step = self.trainer.global_step
        for layer in self._layers():
            update_bias = getattr(layer.router, "update_bias", None)
            if update_bias is None:
                continue
            # A router with update_bias keeps its counts here (SigmoidRouter's contract).
            counts = cast(Tensor, layer.router.pending_tokens_per_expert)
            if self.trainer.world_size > 1:
                counts = self.trainer.strategy.reduce(counts.clone(), reduce_op="sum")
            update_bias(counts)

    def _log_routing_metrics(self) -> None:
        stats = [layer.routing_stats for layer in self._layers() if layer.routing_stats]
        if not stats:
            return
        log_step = self._logs_routing_step()
        values = _mean_over_layers(stats).to(self.device)
        # Lightning converts the progress bar's values to numbers at every batch, the last logged
        # ones included: a device tensor there would make the host wait for the GPU at every batch.
        # One host copy of the four values, made at the steps that log them, waits once.
        shown = values.cpu().unbind() if log_step else (None,) * len(_ROUTING_METRICS)
        for name, value, host_value in zip(_ROUTING_METRICS, values.unbind(), shown, strict=True):
            metric = cast(_StepMean, self.moe_metrics[name])
            # Every step counts towards the epoch mean, logged or not: Lightning computes the
            # metric object at the end of the epoch.
            metric(value, host_value)
            if log_step:
                # One self.log per key is the bulk of the host time; log_dict would only loop over
                # self.log and can't put just one key in the progress bar.
                self.log(f"moe/{name}", metric, on_step=True, on_epoch=True, prog_bar=name == "load_imbalance")

    def _logs_routing_step(self) -> bool:
        """Whether this batch logs the routing metrics: every ``routing_log_every_n_steps``
        optimizer steps, and at the last batch of an epoch or of the run, so that every epoch logs
        its mean. Asked after the batch's optimizer step."""
        step = self.trainer.global_step
        return step % self._step_log_interval() == 0 or self._ends_epoch_or_run(step) or self.trainer.should_stop

    def logs_step_values(self) -> bool:
        """Whether the training batch now running is one that logs step values; for
        ``training_step`` to ask before it logs.

        True in the batches of the optimizer steps at which the routing metrics are logged (every
        ``routing_log_every_n_steps``, by default the Trainer's ``log_every_n_steps``, the steps at
        which Lightning writes step metrics to the logger), and in the last batch of an epoch or
        run. Lightning converts the progress bar's values to numbers at every batch, the last
        logged ones included; for a value on the GPU the host then waits for the GPU to finish the
        batch, so it never gets ahead to queue the next batch's kernels while the GPU runs, and the
        GPU waits for every launch of the next forward. Logging a host copy of a progress-bar value
        (``loss.detach().cpu()``) when this is True waits once per logging step instead, which
        :meth:`log_step_value` does; :class:`~lightning_moe.models.MoEGPTModule` logs its
        ``train_loss`` that way, and this class its routing metrics likewise.
        """
        if self._trainer is None:  # a training_step called outside a Trainer logs nothing anyway
            return False
        step = self.trainer.global_step + 1  # the optimizer step this batch's gradients go to
        return step % self._step_log_interval() == 0 or self._ends_epoch_or_run(step)

    def log_step_value(self, name: str, value: Tensor) -> None:
        """Log ``value`` (a scalar tensor) as ``name``, shown in the progress bar, when
        :meth:`logs_step_values` says so, as a host copy: the way to log a training step's value
        without making the host wait for the GPU at every batch."""
        if self.logs_step_values():
            self.log(name, value.detach().cpu(), prog_bar=True)

    def _step_log_interval(self) -> int:
        every = self.routing_log_every_n_steps
        if every is None:
            # Set on the Trainer by Lightning's logger connector, hence unknown to type checkers.
            return max(1, self.trainer.log_every_n_steps)  # type: ignore[attr-defined]
        if every < 1:
            raise ValueError(f"routing_log_every_n_steps must be at least 1 (or None), got {every}")
        return every

    def _ends_epoch_or_run(self, step: int) -> bool:
        """Whether this batch is the last of its epoch, or ``step`` the run's last optimizer step."""
        trainer = self.trainer
        return trainer.is_last_batch or (trainer.max_steps >= 0 and step >= trainer.max_steps)


def _divides_gradients_in_step(optimizer: Optimizer) -> bool:
    """Whether ``optimizer``'s step takes a gradient divisor (``grad_scale``): a
    :class:`lightning_moe.optim.AdamW`, or a torch Adam or AdamW whose every group steps fused."""
    if isinstance(optimizer, AdamW):
        return True
    groups = optimizer.param_groups
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and all(g.get("fused") for g in groups)


def _divide_gradients_in_step(optimizer: Optimizer, divisor: Tensor) -> None:
    """Have ``optimizer``'s next step divide the gradients by ``divisor`` (a scalar tensor on the
    gradients' device); the step's post-hook takes the divisor away again."""
    optimizer.grad_scale = divisor  # type: ignore[attr-defined]
    if not getattr(optimizer, "_lightning_moe_divisor_hook", False):
        optimizer.register_step_post_hook(_forget_divisor)
        optimizer._lightning_moe_divisor_hook = True  # type: ignore[attr-defined]


def _forget_divisor(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    optimizer.__dict__.pop("grad_scale", None)


def _mean_over_layers(stats: list[dict[str, Tensor]]) -> Tensor:
    """The routing metrics averaged over the layers, in a handful of ops whatever the layer count.

    Nothing here waits for the GPU: the values stay on the device, and the drop counts (CPU
    tensors) reach it through a fill kernel rather than a copy, which would synchronise.

    Args:
        stats: The ``routing_stats`` of each of L layers.

    Returns:
        (4,) float32: the metrics in the order of ``_ROUTING_METRICS``.
    """
    losses_L2 = torch.stack([layer[key] for layer in stats for key in ("aux_loss", "z_loss")]).float().view(-1, 2)
    imbalance_L = _load_imbalance([layer["tokens_per_expert"] for layer in stats])
    drop_rate = sum(int(layer["dropped"]) / max(1, int(layer["assignments"])) for layer in stats) / len(stats)
    drop_rate_1 = torch.full((1,), drop_rate, device=losses_L2.device)
    return torch.cat([losses_L2.mean(dim=0), drop_rate_1, imbalance_L.mean(dim=0, keepdim=True)])


def _load_imbalance(tokens_per_expert: list[Tensor]) -> Tensor:
    """(L,) max over mean tokens per expert of each layer, given each layer's (E,) counts."""
    if len({counts.shape for counts in tokens_per_expert}) > 1:
        # Layers with different numbers of experts don't stack; take them one at a time.
        return torch.cat([_load_imbalance([counts]) for counts in tokens_per_expert])
    counts_LE = torch.stack(tokens_per_expert).float()
    return counts_LE.amax(dim=1) / counts_LE.mean(dim=1).clamp(min=1e-9)


class _StepMean(Metric):
    """Mean over an epoch's steps of a scalar logged once per step, summed over processes when computed.

    ``forward`` returns the step's value and only adds it to the running sums: torchmetrics'
    default ``forward`` resets, updates, computes and merges the state on every call, about six
    times the host time for the same result. No NaN check either, which would read the value on
    the host and stall the GPU every step; a NaN shows in the epoch mean.
    """

    full_state_update = False
    total: Tensor
    steps: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("steps", torch.tensor(0.0), dist_reduce_fx="sum")

    @override
    def update(self, value: Tensor) -> None:
        # In place: `self.total += value` would also rebind the attribute through nn.Module's and
        # torchmetrics' __setattr__, which take longer than the additions.
        self.total.add_(value)
        self.steps.add_(1)

    @override
    def compute(self) -> Tensor:
        return self.total / self.steps

    @override
    def forward(self, value: Tensor, shown: Tensor | None = None) -> Tensor:
        """Add ``value`` to the sums; ``shown`` (default ``value``) is the step value Lightning
        reads when the metric is logged, e.g. a host copy of ``value``."""
        self.update(value)
        # Lightning reads the step value logged with a metric from here.
        self._forward_cache = value if shown is None else shown  # type: ignore[assignment]  # unannotated upstream
        return value
