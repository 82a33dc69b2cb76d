"""Optimizers for MoE training: :class:`AdamW`, ``torch.optim.AdamW`` with a one-pass CUDA step that
also writes the experts' compute-dtype copies."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from lightning_moe.ops.adamw import AdamWHyperparameters, adamw_step
from lightning_moe.ops.cast import keep_casts, kept_cast, mark_casts_current
from lightning_moe.ops.extension import cuda_kernels_available

__all__ = ["AdamW"]

# Group options the kernel step does not implement; torch's step runs when any is set.
_TORCH_ONLY_OPTIONS = ("amsgrad", "maximize", "capturable", "differentiable", "fused")


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose step on CUDA is one pass of a kernel over all the parameters
    (:func:`lightning_moe.ops.adamw.adamw_step`), which also writes the experts' weights in their
    compute dtype for the next forward pass.

    For MoE models, whose experts hold most of the parameters, the optimizer step and, under mixed
    precision, the cast of every expert weight to bfloat16 at each forward pass take a large part of
    a training step. This step reads each parameter, gradient and moment once and writes the
    parameter, the moments and, for the weights the MoE layers cast (see
    :func:`lightning_moe.ops.cast.keep_casts`), the updated weight's cast, which the next forward
    pass takes instead of casting again. The arithmetic is that of ``torch.optim.AdamW``'s
    single-tensor step; results agree with it to float32 rounding.

    The arguments, parameter groups and state (``step``, ``exp_avg``, ``exp_avg_sq``) are those of
    ``torch.optim.AdamW``, so checkpoints load into either. The kernel step runs when the CUDA
    extension is loaded and every parameter with a gradient is a contiguous float32 CUDA tensor
    with a float32 gradient, on one device, and no group sets ``amsgrad``, ``maximize``,
    ``capturable``, ``differentiable`` or ``fused``, or holds tensors as ``lr`` or ``betas``.
    Otherwise ``torch.optim.AdamW``'s own step runs (``fused=True`` asks for torch's fused one).

    A float32 scalar tensor set as the optimizer's ``grad_scale`` attribute divides every gradient
    in the step (gradient clipping's ``max(1, norm / max_norm)``;
    :meth:`~lightning_moe.MoELightningModule.configure_gradient_clipping` sets it). The kernel step
    leaves the gradients as they were; torch's step divides them in place first.

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize, foreach, capturable,
            differentiable, fused: As for ``torch.optim.AdamW``.
        keep_casts: Write the updated casts of the weights the MoE layers cast (and let those
            layers keep them between steps, 2 bytes per weight element). ``False`` for a step that
            writes only the parameters and moments. A weight changed through ``param.data`` after a
            step needs :func:`lightning_moe.ops.cast.forget_casts`, as its version does not
            record the change.

    Example::

        optimizer = lightning_moe.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95))
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        keep_casts: bool = True,
    ) -> None:
        self.keep_casts = keep_casts
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if self.keep_casts:
            keep_casts(p for p in self.param_groups[-1]["params"] if p.dtype == torch.float32)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimizer step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        divisor: Tensor | None = getattr(self, "grad_scale", None)
        if self.kernel_step_applies():
            self._kernel_step(divisor)
        else:
            self._torch_step(divisor)
        return loss

    def kernel_step_applies(self) -> bool:
        """Whether :meth:`step` would run the kernel step now (see the class docstring)."""
        device = None
        for group in self.param_groups:
            if any(group.get(option) for option in _TORCH_ONLY_OPTIONS):
                return False
            if any(isinstance(value, Tensor) for value in (group["lr"], *group["betas"])):
                return False
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if type(p.data) is not Tensor or type(grad) is not Tensor or grad.is_sparse:  # e.g. DTensors
                    return False
                if not (p.is_cuda and p.dtype == grad.dtype == torch.float32):
                    return False
                if not (p.is_contiguous() and grad.is_contiguous()) or (device is not None and p.device != device):
                    return False
                device = p.device
        return device is not None and cuda_kernels_available()

    def _kernel_step(self, divisor: Tensor | None) -> None:
        params: list[Tensor] = []
        grads: list[Tensor] = []
        exp_avgs: list[Tensor] = []
        exp_avg_sqs: list[Tensor] = []
        step_counts: list[Tensor] = []
        hyper: dict[str, list[float]] = {name: [] for name in ("lr", "weight_decay", "beta1", "beta2", "eps")}
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif state["step"].device.type != "cpu":  # from a fused or capturable step's checkpoint
                    state["step"] = state["step"].detach().to("cpu", torch.float32)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                step_counts.append(state["step"])
                values = (group["lr"], group["weight_decay"], beta1, beta2, group["eps"])
                for name, value in zip(hyper, values, strict=True):
                    hyper[name].append(float(value))
        torch._foreach_add_(step_counts, 1.0)
        copies = [kept_cast(p) for p in params] if self.keep_casts else [None] * len(params)
        steps = [float(s) for s in step_counts]
        adamw_step(params, grads, exp_avgs, exp_avg_sqs, copies, AdamWHyperparameters(**hyper, steps=steps), divisor)
        written = [c for c in copies if c is not None]
        torch.autograd.graph.increment_version([*params, *exp_avgs, *exp_avg_sqs, *written])
        mark_casts_current(p for p, c in zip(params, copies, strict=True) if c is not None)

    def _torch_step(self, divisor: Tensor | None) -> None:
        """``torch.optim.AdamW``'s step; a gradient divisor is applied to the gradients first
        unless every group steps fused (which takes it as its ``grad_scale``)."""
        torch_step = _unhooked(torch.optim.AdamW.step)
        if divisor is None or all(group.get("fused") for group in self.param_groups):
            torch_step(self)
            return
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        torch._foreach_div_(grads, divisor)
        del self.__dict__["grad_scale"]  # torch's non-fused steps refuse one
        try:
            torch_step(self)
        finally:
            self.__dict__["grad_scale"] = divisor


def _unhooked(step: Callable[..., Any]) -> Callable[..., Any]:
    """An optimizer class's ``step`` without the wrapper ``torch.optim.Optimizer`` adds to run the
    step hooks: they run once, around :meth:`AdamW.step`."""
    while getattr(step, "hooked", False):
        step = step.__wrapped__  # type: ignore[attr-defined]
    return step
