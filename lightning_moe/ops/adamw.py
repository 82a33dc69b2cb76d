"""One AdamW step over many float32 tensors: :func:`adamw_step`, the kernel of
:class:`lightning_moe.optim.AdamW`, with :func:`adamw_step_reference` beside it.

An AdamW step reads every parameter, its gradient and its two moments and writes three of them
back. For MoE models, whose experts hold most of the parameters, that pass is a large part of a
training step, and under mixed precision so is the cast of every expert weight to the compute dtype
at each forward pass. The kernel (``src_cuda/adamw.cu``) covers up to 32 tensors per launch and
can write each updated parameter's bfloat16 or float16 copy while it has it in registers, which the
next forward pass then takes instead of casting (see :func:`lightning_moe.ops.cast.keep_casts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from lightning_moe.ops.extension import require_extension, use_cuda_kernels


@dataclass(frozen=True)
class AdamWHyperparameters:
    """Each parameter's AdamW hyperparameters and step count, one entry per parameter.

    Attributes:
        lr, weight_decay, beta1, beta2, eps: As for ``torch.optim.AdamW`` (``betas = (beta1, beta2)``).
        steps: The step count, this step included (at least 1).
    """

    lr: Sequence[float]
    weight_decay: Sequence[float]
    beta1: Sequence[float]
    beta2: Sequence[float]
    eps: Sequence[float]
    steps: Sequence[float]

    def columns(self) -> list[list[float]]:
        """The six sequences as lists, in the order of the fields."""
        return [list(getattr(self, field.name)) for field in fields(self)]


def adamw_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    copies: Sequence[Tensor | None],
    hyper: AdamWHyperparameters,
    grad_divisor: Tensor | None = None,
) -> None:
    """One AdamW step, in place, with the arithmetic of ``torch.optim.AdamW``'s single-tensor step:

    ``g = grad / grad_divisor``, ``p *= 1 - lr * weight_decay``, ``m += (1 - beta1) * (g - m)``,
    ``v = v * beta2 + (1 - beta2) * g * g``, and
    ``p -= lr / (1 - beta1**step) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)``; then each given
    copy is set to ``p`` cast to its dtype. The gradients are only read.

    Runs the CUDA kernel when every tensor is a contiguous float32 CUDA tensor (copies bfloat16 or
    float16) and the extension is loaded, else :func:`adamw_step_reference`. The kernel's results
    may differ from the reference's in the last bit of float32 (fused multiply-adds).

    Args:
        params, grads, exp_avgs, exp_avg_sqs: Equally long sequences of float32 tensors; the i-th
            of each has one shape.
        copies: For each parameter, ``None`` or a bfloat16 or float16 tensor of its shape.
        hyper: Each parameter's hyperparameters and step count.
        grad_divisor: ``None``, or a float32 scalar tensor on the parameters' device that divides
            every gradient (gradient clipping's ``max(1, norm / max_norm)``).
    """
    columns = hyper.columns()
    lengths = {len(s) for s in (params, grads, exp_avgs, exp_avg_sqs, copies, *columns)}
    if len(lengths) > 1:
        raise ValueError(f"adamw_step takes one entry per parameter in every sequence, got lengths {sorted(lengths)}")
    tensors = [*params, *grads, *exp_avgs, *exp_avg_sqs]
    if tensors and all(_kernel_tensor(t, (torch.float32,)) for t in tensors):
        if all(c is None or _kernel_tensor(c, (torch.bfloat16, torch.float16)) for c in copies):
            if (grad_divisor is None or grad_divisor.is_cuda) and use_cuda_kernels(*params):
                lists = (list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(copies))
                require_extension().adamw_step(*lists, *columns, grad_divisor)
                return
    adamw_step_reference(params, grads, exp_avgs, exp_avg_sqs, copies, hyper, grad_divisor)


def _kernel_tensor(t: Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    return t.is_cuda and t.dtype in dtypes and t.is_contiguous()


@torch.no_grad()
def adamw_step_reference(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    copies: Sequence[Tensor | None],
    hyper: AdamWHyperparameters,
    grad_divisor: Tensor | None = None,
) -> None:
    """:func:`adamw_step` in PyTorch ops, one tensor at a time, for any device and float dtype."""
    lr, weight_decay, beta1, beta2, eps, steps = hyper.columns()
    for i, (p, grad, m, v, copy) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, copies, strict=True)):
        if steps[i] < 1:
            raise ValueError(f"steps[{i}] must be at least 1 (the count including this step), got {steps[i]}")
        g = grad if grad_divisor is None else grad / grad_divisor
        p.mul_(1 - lr[i] * weight_decay[i])
        m.lerp_(g, 1 - beta1[i])
        v.mul_(beta2[i]).addcmul_(g, g, value=1 - beta2[i])
        bias_correction1 = 1 - beta1[i] ** steps[i]
        bias_correction2_sqrt = (1 - beta2[i] ** steps[i]) ** 0.5
        p.addcdiv_(m, (v.sqrt() / bias_correction2_sqrt).add_(eps[i]), value=-lr[i] / bias_correction1)
        if copy is not None:
            copy.copy_(p)
