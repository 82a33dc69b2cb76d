"""``MoELightningModule``: the LightningModule base class for models with MoE layers.

It takes care of what every MoE model needs in a Lightning loop and that users of other systems
had to wire by hand: the balance and z losses scaled to match gradient accumulation and fp16 loss
scaling, the sigmoid router's balance bias updated once per optimizer step, and the routing
metrics logged every training step.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torchmetrics.aggregation import MeanMetric
from typing_extensions import override

from lightning_moe.layers.moe import MoE


class MoELightningModule(LightningModule):
    """Subclass this instead of ``LightningModule`` when the model holds :class:`~lightning_moe.MoE` layers.

    Write ``training_step`` as usual and return the task loss only: each MoE layer's balance and
    z losses already reach the gradients. Each training step logs ``moe/aux_loss``,
    ``moe/z_loss``, ``moe/drop_rate`` and ``moe/load_imbalance`` (max over mean tokens per expert),
    averaged over the MoE layers; the last is shown in the progress bar.

    Subclasses that override :meth:`on_train_start`, :meth:`on_train_batch_start` or
    :meth:`on_train_batch_end` call
    ``super()`` so that this bookkeeping still happens.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.moe_metrics = torch.nn.ModuleDict(
            {name: _mean_metric() for name in ("aux_loss", "z_loss", "drop_rate", "load_imbalance")}
        )
        self._bias_updated_at_step = 0

    def moe_layers(self) -> Iterator[MoE]:
        """The MoE layers of this module, in registration order."""
        return (module for module in self.modules() if isinstance(module, MoE))

    @override
    def on_train_start(self) -> None:
        # Counts from here on belong to the next optimizer step (also when resuming mid-run).
        self._bias_updated_at_step = self.trainer.global_step

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
        for layer in self.moe_layers():
            layer.aux_loss_scale = scale
        return None

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._update_router_biases()
        self._log_routing_metrics()

    def _update_router_biases(self) -> None:
        """Let routers with a balance bias react once after each optimizer step.

        The counts are summed over all data-parallel ranks first, so every rank applies the update
        the global batch calls for and the biases stay identical everywhere.
        """
        if self.trainer.global_step == self._bias_updated_at_step:
            return
        self._bias_updated_at_step = self.trainer.global_step
        for layer in self.moe_layers():
            update_bias = getattr(layer.router, "update_bias", None)
            if update_bias is None:
                continue
            counts = layer.router.pending_tokens_per_expert
            if self.trainer.world_size > 1:
                counts = self.trainer.strategy.reduce(counts.clone(), reduce_op="sum")
            update_bias(counts)

    def _log_routing_metrics(self) -> None:
        layers = [layer for layer in self.moe_layers() if layer.routing_stats]
        if not layers:
            return
        # Nothing here waits for the GPU: the values stay on the device, and the drop counts (host
        # integers) reach it through a fill kernel rather than a copy, which would synchronise.
        values = {name: [] for name in ("aux_loss", "z_loss", "load_imbalance")}
        drop_rates = []
        for layer in layers:
            stats = layer.routing_stats
            counts = stats["tokens_per_expert"].float()
            values["aux_loss"].append(stats["aux_loss"].float())
            values["z_loss"].append(stats["z_loss"].float())
            values["load_imbalance"].append(counts.max() / counts.mean().clamp(min=1e-9))
            drop_rates.append(int(stats["dropped"]) / max(1, int(stats["assignments"])))
        means = {name: torch.stack(per_layer).mean() for name, per_layer in values.items()}
        means["drop_rate"] = torch.full((), sum(drop_rates) / len(drop_rates), device=self.device)
        for name in self.moe_metrics:
            metric = self.moe_metrics[name]
            metric(means[name].to(self.device))
            self.log(f"moe/{name}", metric, on_step=True, on_epoch=True, prog_bar=name == "load_imbalance")


def _mean_metric() -> MeanMetric:
    # "disable": no NaN check, which would read the value on the host and stall the GPU every step;
    # a NaN then shows in the logged mean.
    return MeanMetric(nan_strategy="disable")
