"""Float32 tensors cast to bfloat16 or float16 whose gradient is cast back in one vectorised pass:
:func:`cast`, and :func:`fork_cast` for a tensor used both as it is and cast.

Under mixed precision the experts' float32 weights are cast to the compute dtype at every forward
pass, and each backward pass casts their bfloat16 gradients back to float32; for MoE models the
experts hold most of the parameters. PyTorch's float32 to bfloat16 copy is vectorised, but its
bfloat16 (or float16) to float32 copy converts one element at a time: on an H200 it moved about
2 TB/s on the expert weights' gradients. The backward of :func:`cast` runs the kernel of
``src_cuda/cast.cu`` instead, which reads and writes 16-byte vectors; converting to float32 is
exact, so the values are those of PyTorch's copy.

The casts of parameters registered with :func:`keep_casts` are kept between forward passes, and
:class:`lightning_moe.optim.AdamW` writes them in its step, so that the forward pass after a step
takes the updated weights' casts without casting them.

Under ``torch.compile`` the plain ``x.to(dtype)`` is traced instead: inductor writes its own
vectorised casts and can fuse them with their neighbours.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from lightning_moe.ops.extension import require_extension, use_cuda_kernels

NARROW_DTYPES = (torch.bfloat16, torch.float16)
# The kernel moves 16-byte vectors from the start of the tensor.
ALIGNMENT_BYTES = 16


def to_float(x: Tensor, addend: Tensor | None = None) -> Tensor:
    """``x.float()``, or ``addend + x.float()``, for a bfloat16 or float16 ``x``, through the kernel
    where it applies (contiguous CUDA tensors starting on a 16-byte boundary, a float32 addend of
    ``x``'s shape, the extension loaded)."""
    if addend is None or (addend.dtype == torch.float32 and addend.shape == x.shape):
        if _kernel_applies(x, *(() if addend is None else (addend,))):
            return require_extension().cast_to_float(x, addend)
    return x.float() if addend is None else addend + x.float()


def _kernel_applies(x: Tensor, *others: Tensor) -> bool:
    """Whether the cast kernel takes ``x`` (bfloat16 or float16) and ``others``: contiguous CUDA
    tensors starting on a 16-byte boundary, the extension loaded."""
    tensors = (x, *others)
    return x.dtype in NARROW_DTYPES and all(_kernel_layout(t) for t in tensors) and use_cuda_kernels(*tensors)


def _kernel_layout(t: Tensor) -> bool:
    return t.is_cuda and t.is_contiguous() and t.data_ptr() % ALIGNMENT_BYTES == 0


class _CastFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, dtype: torch.dtype) -> Tensor:
        return x.to(dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return to_float(grad), None


def cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)``, with the same values and gradient; for a float32 CUDA tensor cast to
    bfloat16 or float16 the gradient is cast back by :func:`to_float`.

    Args:
        x: Tensor of any dtype and shape.
        dtype: The dtype to cast to.

    Returns:
        ``x`` itself when it already has ``dtype``, else a new tensor; gradients flow to ``x``.
    """
    if x.dtype == dtype:
        return x
    if x.dtype == torch.float32 and dtype in NARROW_DTYPES and x.is_cuda and not torch.compiler.is_compiling():
        if x.requires_grad and torch.is_grad_enabled() and use_cuda_kernels(x):
            kept = _KEPT_CASTS.get(x)
            return _CastFunction.apply(x, dtype) if kept is None else kept.cast(x, dtype)
    return x.to(dtype)


def to_float_with_square_sums(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(x.float(), partials)`` for a bfloat16 or float16 ``x``, where ``partials`` (a float32
    vector) sums to the sum of the squares of ``x.float()``: the kernel's sums per block where it
    applies (as for :func:`to_float`), else one sum."""
    if _kernel_applies(x):
        return require_extension().cast_to_float_square_sums(x)
    out = x.float()
    return out, out.square().sum().reshape(1)


class _KeptCast:
    """The last cast of one float32 parameter, valid while the parameter has the version and the
    storage it had when the cast was made (or when an optimizer step last wrote the cast); and the
    square sums of the gradient the cast's backward last produced."""

    __slots__ = ("copy", "version", "data_ptr", "grad_data_ptr", "grad_param_version", "grad_square_sums")

    def __init__(self) -> None:
        self.copy: Tensor | None = None
        self.version = -1
        self.data_ptr = 0
        self.grad_data_ptr = 0
        self.grad_param_version = -1
        self.grad_square_sums: Tensor | None = None

    def current(self, param: Tensor) -> Tensor | None:
        """The copy, when one was made of ``param``'s present storage (whatever its version)."""
        copy = self.copy
        if copy is None or self.data_ptr != param.data_ptr() or copy.shape != param.shape:
            return None
        return copy

    def cast(self, param: Tensor, dtype: torch.dtype) -> Tensor:
        """``param`` cast to ``dtype``: the kept copy while it is valid, else a new cast, kept."""
        copy = self.current(param)
        if copy is None or copy.dtype != dtype or self.version != param._version:
            copy = param.detach().to(dtype)
            self.copy, self.version, self.data_ptr = copy, param._version, param.data_ptr()
        return _KeptCastFunction.apply(param, copy, self)

    def note_gradient(self, param: Tensor, grad: Tensor, square_sums: Tensor) -> None:
        # Not the gradient itself: a reference would keep autograd from handing it to param.grad.
        self.grad_data_ptr, self.grad_param_version = grad.data_ptr(), param._version
        self.grad_square_sums = square_sums

    def gradient_square_sums(self, param: Tensor) -> Tensor | None:
        """The square sums of ``param.grad`` if it is the gradient the cast's backward produced,
        unchanged since (version 0) and of the parameter unchanged since, else ``None``."""
        grad, sums = param.grad, self.grad_square_sums
        if sums is None or grad is None or grad.dtype != torch.float32 or grad.shape != param.shape:
            return None
        if grad.data_ptr() != self.grad_data_ptr or grad._version != 0 or param._version != self.grad_param_version:
            return None
        return sums


class _KeptCastFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, param: Tensor, copy: Tensor, kept: _KeptCast) -> Tensor:
        ctx.param, ctx.kept = param, kept
        # A new tensor object on the copy's storage, sharing its version counter: a graph that
        # saved it sees an optimizer step's write into the copy.
        return copy.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        out, square_sums = to_float_with_square_sums(grad)
        ctx.kept.note_gradient(ctx.param, out, square_sums)
        return out, None, None


# Parameters whose casts are kept, by identity (tensors compare by value).
_KEPT_CASTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def keep_casts(params: Iterable[Tensor]) -> None:
    """Keep the casts :func:`cast` makes of these float32 parameters from one forward pass to the
    next, for an optimizer that writes each updated parameter's cast in its step
    (:class:`lightning_moe.optim.AdamW`): the forward pass after the step then takes that copy
    instead of casting the parameter again.

    A kept cast is used while the parameter holds the storage and the version (autograd's count of
    in-place changes, ``param._version``) it had when the cast was made or last written by the
    optimizer. Changes made through ``param.data`` are not counted in the version: after changing a
    parameter that way, call :func:`forget_casts`. Each kept cast holds the parameter's values in the
    compute dtype (2 bytes per element) between steps.
    """
    for param in params:
        if param not in _KEPT_CASTS:
            _KEPT_CASTS[param] = _KeptCast()


def forget_casts(params: Iterable[Tensor] | None = None) -> None:
    """Drop the kept casts of ``params`` (all when ``None``); the next forward pass casts afresh.
    The parameters stay registered with :func:`keep_casts`."""
    for param in list(_KEPT_CASTS.keys()) if params is None else params:
        kept = _KEPT_CASTS.get(param)
        if kept is not None:
            kept.copy = None


def kept_cast(param: Tensor) -> Tensor | None:
    """The kept cast of ``param`` for an optimizer step to overwrite with the updated parameter's
    cast, or ``None`` when it has none made of its present storage. After writing it, call
    :func:`mark_casts_current`."""
    kept = _KEPT_CASTS.get(param)
    return None if kept is None else kept.current(param)


def gradient_norm(params: Iterable[Tensor]) -> Tensor:
    """The 2-norm of the gradients of ``params`` (those that have one), as
    ``torch.nn.utils.get_total_norm`` gives it, in float32.

    For a parameter registered with :func:`keep_casts` whose gradient is the one the backward of its
    kept cast produced, unchanged since, the squares that backward summed while it cast the
    gradient to float32 stand in for reading the gradient again: for MoE models under mixed
    precision, the experts' weights, most of the parameters. An in-place change of the gradient
    (gradient accumulation, an all-reduce, unscaling) or of the parameter voids those sums.
    """
    sums: list[Tensor] = []
    grads: list[Tensor] = []
    for param in params:
        if param.grad is None:
            continue
        kept = _KEPT_CASTS.get(param)
        square_sums = None if kept is None else kept.gradient_square_sums(param)
        if square_sums is None:
            grads.append(param.grad)
        else:
            sums.append(square_sums)
    if not sums:
        return torch.nn.utils.get_total_norm(grads).float()
    total = torch.cat(sums).sum()
    if grads:
        total = total + torch.nn.utils.get_total_norm(grads).float().square()
    return total.sqrt()


def mark_casts_current(params: Iterable[Tensor]) -> None:
    """Record that the kept casts of ``params`` hold their present values (an optimizer step wrote
    both, and bumped the parameters' versions)."""
    for param in params:
        kept = _KEPT_CASTS.get(param)
        if kept is not None:
            kept.version = param._version


class _ForkCastFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not zeros
        return x, x.to(dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_x: Tensor | None, grad_cast: Tensor | None) -> tuple[Tensor | None, None]:
        if grad_cast is None:
            return grad_x, None
        return to_float(grad_cast, None if grad_x is None else grad_x.contiguous()), None


def fork_cast(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(x, x.to(dtype))``, for two consumers of ``x`` of which one takes it in ``dtype``.

    Autograd would cast the second output's gradient back to float32 and then add the first's;
    for a float32 CUDA ``x`` cast to bfloat16 or float16 one kernel does both (:func:`to_float`
    with an addend), reading each gradient once. The MoE layer gives the first output to the router
    and the second, in the experts' compute dtype, to the permutation.

    Args:
        x: Tensor of any dtype and shape.
        dtype: The dtype of the second output.

    Returns:
        ``x`` (or a view of it) and its cast; gradients of both flow to ``x``.
    """
    if x.dtype == torch.float32 and dtype in NARROW_DTYPES and x.is_cuda and not torch.compiler.is_compiling():
        if x.requires_grad and torch.is_grad_enabled() and use_cuda_kernels(x):
            return _ForkCastFunction.apply(x, dtype)
    return x, cast(x, dtype)
