"""A router's float32 logits and their gradients: the ``lightning_moe::router_logits`` op.

Shape legend: T tokens, D model dim, E experts.

``logits_TE = x_TD @ weight_ED.T`` in float32, for ``x_TD`` in float32, bfloat16 or float16 and a
float32 weight, computed by the kernels of ``src_cuda/router_logits.cu``: x is read in its own dtype
(no float32 copy of it forward or backward), ``grad_x`` is written once in x's dtype, ``grad_weight``
is summed over chunks of tokens in a fixed order (no atomics, the same result on every run), and
nothing synchronises with the host. The kernels take 1 to :data:`MAX_KERNEL_EXPERTS` experts and
any D; they are fastest when rows of x are 16 bytes aligned (D a multiple of 8 in bfloat16 or
float16, of 4 in float32). With at most 8 experts and D a multiple of 8 (up to 4096 for 5 to 8
experts), the forward and ``grad_x`` hold the weight in shared memory and stream x, or ``grad_x``,
through once (``src_cuda/router_logits_few.cu``), at memory speed.

:func:`router_logits` takes the kernels when :func:`kernels_accept` the inputs (a bfloat16 or
float16 weight is widened to float32 first), and :func:`lightning_moe.ops.reference.router_logits`
otherwise (CPU, float64, more experts, no extension), which computes the same float32 product
without keeping a float32 copy of x either.

The kernels are registered as ``torch.library`` custom ops, which ``torch.compile`` traces through;
eager calls take the same kernels through a plain ``autograd.Function`` (see
:mod:`lightning_moe.ops.permute`).

With bfloat16 tokens and at least :data:`SPLIT_MIN_WORK` multiply-adds, the float32 product runs
on bf16 tensor cores instead (:class:`_SplitRouterLogits`): the float32 weight is split into three
bf16 parts ``w = w0 + w1 + w2`` (each the leading 8 significand bits of what the previous ones
leave, together exact to float32's 24 bits), x (exactly bf16) is multiplied by all three in one
cuBLAS GEMM with float32 accumulation and output, and the three products are added. Each product
of a bf16 x and a bf16 part is exact in float32; what differs from ``x.float() @ w.T`` is the
tensor cores' float32 accumulation, whose errors on an H200 were about ten times those of cuBLAS's
float32 GEMM, and within 2^-18 of the sum of the terms' magnitudes (what the GPU tests allow): far
below bf16 (2^-9) and TF32 (2^-11) rounding, which a router computed in the autocast dtype, or
with TF32 matmuls allowed, would carry. The weight gradient splits the float32 logit gradient the
same way; the token gradient, rounded to bf16 in the end, keeps the three leading terms
``g0 w0 + g0 w1 + g1 w0`` (relative error about 2^-16). The SIMT kernels do 2 E D float32 FLOPs
per token per pass, compute-bound with many experts; this path is bound by reading x. GPU time of
forward + backward on an H200: 135 us against 509 us at (T, D, E) = (16384, 2048, 64); 73 against
90 us at (16384, 1024, 8), where the split's extra host time outweighs the gain.

:class:`_TensorCoreRouterLogits` does the same split inside the kernels of
``src_cuda/router_logits_tc.cu``, one launch per pass (the weight gradient adds its chunks of tokens
in a second): the forward sums ``x w2 + x w1`` and ``x w0`` in two float32 accumulators added at the
end, ``grad_x`` keeps ``g0 w0 + g0 w1 + g1 w0`` rounded once to bf16, and ``grad_weight`` sums the
three parts of g like the forward, each in an order fixed by the shapes. It takes bf16 tokens and a
float32 or bf16 weight with E a multiple of 8 from 8 to :data:`MAX_KERNEL_EXPERTS` and D a multiple
of 64 (:func:`tensor_core_accepts`). A bf16 weight (a model cast whole to bf16) is its own leading
part, its other parts zero: the kernels read it as it is, make a third of the forward's products
and two thirds of ``grad_x``'s, and give the bits of the widened weight, without the widening copy;
its gradient is rounded to bf16 by the kernel that adds the chunks of tokens, without a narrowing
pass. It is meant for the mid-size routers where the SIMT kernels are compute-bound and the split
GEMMs pay their host time, e.g. (T, D, E) = (8192, 1024, 64), where on an H200 the three passes
took 31, 36 and 36 us against the SIMT kernels' 62, 52 and 60. :func:`router_logits` takes it,
below :data:`SPLIT_MIN_WORK`, for :data:`TENSOR_CORE_MIN_EXPERTS` experts or more while
:data:`TENSOR_CORE_ROUTER` is set (the default); with 8 experts the few-expert SIMT kernels are
faster.

In all, for bf16 tokens on CUDA: the split GEMMs from :data:`SPLIT_MIN_WORK` multiply-adds, else the
tensor-core kernels from :data:`TENSOR_CORE_MIN_EXPERTS` experts, else the SIMT kernels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_moe.ops import reference
from lightning_moe.ops.extension import cuda_device_index, require_extension, use_cuda_kernels

# Above this many experts cuBLAS on a float32 copy of x wins (kRouterLogitsMaxExperts in router_logits.h).
MAX_KERNEL_EXPERTS = 256
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# From this much work (T * D * E multiply-adds), bf16 tokens take the split-weight tensor-core
# GEMMs (_SplitRouterLogits). Below it the GPU time they save is smaller than the host time of
# their dozen extra small launches, which a layer of that size does not hide (measured on an H200:
# a gain at (T, D, E) = (16384, 2048, 64), a loss at (8192, 1024, 64) and (16384, 1024, 8)).
SPLIT_MIN_WORK = 1 << 30
# bf16 parts of a float32 value: 3 x 8 significand bits cover float32's 24.
FLOAT32_PARTS = 3
# Whether router_logits takes the one-launch tensor-core kernels, below SPLIT_MIN_WORK, for inputs
# of at least TENSOR_CORE_MIN_EXPERTS experts that tensor_core_accepts. Measured on an H200 at
# (T, D, E) = (8192, 1024, 64), forward, grad_x, grad_weight: 31, 36, 36 us against the SIMT
# kernels' 62, 52, 60.
TENSOR_CORE_ROUTER = True
# Whether the tensor-core forward's 32-expert blocks and the weight gradient copy their k tiles
# through a cp.async pipeline rather than one register-staged tile ahead (the same bits).
PIPELINED_TC_ROUTER = True
# Whether the tensor-core grad_x, for up to 64 experts, runs blocks that keep a slice of the weight
# in shared memory across many token tiles (the same bits as one block per output tile).
PERSISTENT_TC_GRAD_X = True
# With 8 experts the SIMT kernels hold the weight in shared memory and stream x once: at
# (16384, 1024, 8) grad_x took 40 us on the tensor cores against their 27.
TENSOR_CORE_MIN_EXPERTS = 16
# What those kernels take (kTensorCore* in src_cuda/router_logits_tc.h): E a multiple of 8 from 8 to
# MAX_KERNEL_EXPERTS, D a positive multiple of 64.
TENSOR_CORE_EXPERT_MULTIPLE = 8
TENSOR_CORE_DIM_MULTIPLE = 64


def _forward(x_TD: Tensor, weight_ED: Tensor) -> Tensor:
    return require_extension().router_logits_forward(x_TD, weight_ED)


def _grad_x(grad_TE: Tensor, weight_ED: Tensor, x_dtype: torch.dtype) -> Tensor:
    return require_extension().router_logits_grad_x(grad_TE, weight_ED, x_dtype)


def _grad_weight(grad_TE: Tensor, x_TD: Tensor) -> Tensor:
    return require_extension().router_logits_grad_weight(grad_TE, x_TD)


def _simt_grad_x(grad_TE: Tensor, weight_ED: Tensor, x_dtype: torch.dtype, addend: Tensor | None) -> Tensor:
    grad_x = _grad_x(grad_TE, weight_ED, x_dtype)
    return grad_x if addend is None else grad_x + addend


def _simt_grad_weight(grad_TE: Tensor, x_TD: Tensor, dtype: torch.dtype) -> Tensor:
    return _grad_weight(grad_TE, x_TD).to(dtype)


@torch.library.custom_op("lightning_moe::router_logits", mutates_args=())
def _router_logits_cuda(x_TD: Tensor, weight_ED: Tensor) -> Tensor:
    return _forward(x_TD, weight_ED)


@_router_logits_cuda.register_fake
def _(x_TD: Tensor, weight_ED: Tensor) -> Tensor:
    return x_TD.new_empty(x_TD.shape[0], weight_ED.shape[0], dtype=torch.float32)


@torch.library.custom_op("lightning_moe::router_logits_grad_x", mutates_args=())
def _router_logits_grad_x_cuda(grad_TE: Tensor, weight_ED: Tensor, x_dtype: torch.dtype) -> Tensor:
    return _grad_x(grad_TE, weight_ED, x_dtype)


@_router_logits_grad_x_cuda.register_fake
def _(grad_TE: Tensor, weight_ED: Tensor, x_dtype: torch.dtype) -> Tensor:
    return grad_TE.new_empty(grad_TE.shape[0], weight_ED.shape[1], dtype=x_dtype)


@torch.library.custom_op("lightning_moe::router_logits_grad_weight", mutates_args=())
def _router_logits_grad_weight_cuda(grad_TE: Tensor, x_TD: Tensor) -> Tensor:
    return _grad_weight(grad_TE, x_TD)


@_router_logits_grad_weight_cuda.register_fake
def _(grad_TE: Tensor, x_TD: Tensor) -> Tensor:
    return grad_TE.new_empty(grad_TE.shape[1], x_TD.shape[1], dtype=torch.float32)


def _setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor | None) -> None:
    ctx.save_for_backward(*inputs)  # x in its own dtype: no float32 copy is kept
    ctx.weight_dtype = inputs[1].dtype  # the dtype of the weight's gradient


# (grad_TE, weight_ED, x's dtype, another gradient of x to add or None) -> grad_x
_GradX = Callable[[Tensor, Tensor, torch.dtype, Tensor | None], Tensor]
_GradWeight = Callable[[Tensor, Tensor, torch.dtype], Tensor]  # (grad_TE, x_TD, its dtype) -> grad_weight
_Backward = Callable[[Any, Tensor], tuple[Tensor | None, Tensor | None]]


def _backward_through(grad_x: _GradX, grad_weight: _GradWeight) -> _Backward:
    """The backward of the logits ``x_TD @ weight_ED.T`` saved by :func:`_setup_context`, with
    these two gradient kernels (called for the inputs that need a gradient; the weight's gradient
    in ``ctx.weight_dtype``)."""

    def backward(ctx: Any, grad_TE: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x_TD, weight_ED = ctx.saved_tensors
        grad_TE = grad_TE.float().contiguous()
        grad_x_TD = grad_x(grad_TE, weight_ED, x_TD.dtype, None) if ctx.needs_input_grad[0] else None
        grad_weight_ED = grad_weight(grad_TE, x_TD, ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return grad_x_TD, grad_weight_ED

    return backward


def _eager_function(name: str, forward: Callable[[Tensor, Tensor], Tensor], backward: _Backward) -> Any:
    """A plain ``autograd.Function`` running the kernels of a custom op: the eager path, the same
    kernels at less host time per call than going through the op's dispatch."""

    class Function(torch.autograd.Function):
        """Takes the weight twice: as the parameter (which gets the gradient, in its own dtype) and
        as the tensor the kernels read (the parameter itself, or a detached widened copy of a
        half-precision one that the kernels do not take as it is), so that widening takes no
        autograd node of its own."""

        @staticmethod
        def forward(ctx: Any, x_TD: Tensor, weight_ED: Tensor, kernel_weight: Tensor) -> Tensor:
            _setup_context(ctx, (x_TD, kernel_weight), None)
            ctx.weight_dtype = weight_ED.dtype
            return forward(x_TD, kernel_weight)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx: Any, grad_TE: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
            grad_x, grad_weight = backward(ctx, grad_TE)
            return grad_x, grad_weight, None

    Function.__name__ = Function.__qualname__ = name
    return Function


# The custom ops' float32 weight gets its gradient in float32 (the weight_dtype of _setup_context).
_router_logits_cuda.register_autograd(
    _backward_through(
        lambda grad_TE, weight_ED, x_dtype, _: torch.ops.lightning_moe.router_logits_grad_x(
            grad_TE, weight_ED, x_dtype
        ),
        lambda grad_TE, x_TD, _: torch.ops.lightning_moe.router_logits_grad_weight(grad_TE, x_TD),
    ),
    setup_context=_setup_context,
)
_RouterLogitsFunction = _eager_function(
    "_RouterLogitsFunction", _forward, _backward_through(_simt_grad_x, _simt_grad_weight)
)


def kernels_accept(x_TD: Tensor, weight_ED: Tensor) -> bool:
    """Whether :func:`router_logits` can take these inputs.

    True for a 2-D ``x_TD`` in float32, bfloat16 or float16 with D >= 1, a float32 (E, D)
    ``weight_ED`` with 1 <= E <= :data:`MAX_KERNEL_EXPERTS`, both on CUDA, and the extension
    loaded. The device comes last, so CPU tensors never trigger a build.
    """
    if x_TD.dim() != 2 or weight_ED.dim() != 2:
        return False
    num_experts, dim = weight_ED.shape
    return (
        x_TD.shape[1] == dim >= 1
        and 1 <= num_experts <= MAX_KERNEL_EXPERTS
        and x_TD.dtype in KERNEL_DTYPES
        and weight_ED.dtype == torch.float32
        and use_cuda_kernels(x_TD, weight_ED)
    )


def router_logits(x_TD: Tensor, weight_ED: Tensor) -> Tensor:
    """Float32 (float64 for float64 inputs) router logits ``x_TD @ weight_ED.T``, whatever the
    tokens' dtype and autocast.

    Args:
        x_TD: (T, D) tokens of any floating dtype.
        weight_ED: (E, D) router weight.

    Returns:
        (T, E) logits; gradients flow to both inputs, each in its own dtype.
    """
    if split_accepts(x_TD, weight_ED):
        return _SplitRouterLogits.apply(x_TD.contiguous(), weight_ED.contiguous())
    # Eager, the kernels' autograd node takes a bf16 weight as it is where the tensor-core kernels
    # take it, else widens a half-precision weight itself (one node rather than two, less host time);
    # under torch.compile a traced cast widens it.
    if torch.compiler.is_compiling():
        kernel_weight = _widened(weight_ED)
        kernels = _kernel_family(x_TD, kernel_weight)
    else:
        kernel_weight, kernels = _kernel_weight_and_family(x_TD, weight_ED.detach())
    if kernels is _TENSOR_CORE_KERNELS:
        return _tensor_core_router_logits(x_TD, weight_ED, kernel_weight)
    if kernels is _SIMT_KERNELS:
        return _kernel_router_logits(x_TD, weight_ED, kernel_weight)
    return reference.router_logits(x_TD, weight_ED)


class EagerKernels(NamedTuple):
    """The kernel calls of one of :func:`router_logits`' kernel families, for callers that run them
    inside an autograd node of their own (:func:`lightning_moe.ops.topk_route.router_topk_route`)."""

    forward: Callable[[Tensor, Tensor], Tensor]  # (x_TD, the kernels' weight) -> logits_TE
    grad_x: _GradX  # (grad_TE, the kernels' weight, x's dtype, gradient to add or None) -> grad_x
    grad_weight: _GradWeight  # (grad_TE, x_TD, the weight's dtype) -> grad_weight in that dtype


def eager_kernels(x_TD: Tensor, weight_ED: Tensor) -> tuple[Tensor, EagerKernels] | None:
    """The weight as the kernels read it (``weight_ED`` detached, or a detached widened copy of a
    half-precision one that they do not take as it is) and the kernels that :func:`router_logits`
    runs these inputs on, the tensor-core or the SIMT ones; None where it takes the split GEMMs or
    the reference instead."""
    if split_accepts(x_TD, weight_ED):
        return None
    weight, kernels = _kernel_weight_and_family(x_TD, weight_ED.detach())
    return None if kernels is None else (weight, kernels)


def _kernel_weight_and_family(x_TD: Tensor, weight_ED: Tensor) -> tuple[Tensor, EagerKernels | None]:
    """For inputs the split GEMMs do not take: the weight as the kernels read it and the kernels
    that take it (None: the reference). The tensor-core kernels read a bf16 weight as it is (it is
    its own leading bf16 part: no widening copy, a third of the forward's products, and the bits of
    the widened weight); otherwise a half-precision weight is widened to float32."""
    if weight_ED.dtype == torch.bfloat16 and _takes_tensor_cores(x_TD, weight_ED):
        return weight_ED, _TENSOR_CORE_KERNELS
    weight_f32 = _widened(weight_ED)
    return weight_f32, _kernel_family(x_TD, weight_f32)


def _kernel_family(x_TD: Tensor, weight_f32: Tensor) -> EagerKernels | None:
    """The kernels :func:`router_logits` takes for inputs the split GEMMs do not take, the weight
    widened: the tensor-core ones, else the SIMT ones, else None (the reference)."""
    if _takes_tensor_cores(x_TD, weight_f32):
        return _TENSOR_CORE_KERNELS
    if kernels_accept(x_TD, weight_f32):
        return _SIMT_KERNELS
    return None


def takes_tensor_cores(x_TD: Tensor, weight_ED: Tensor) -> bool:
    """Whether :func:`router_logits` runs these inputs on the one-launch tensor-core kernels."""
    return not split_accepts(x_TD, weight_ED) and _takes_tensor_cores(x_TD, _widened(weight_ED))


def _takes_tensor_cores(x_TD: Tensor, weight_ED: Tensor) -> bool:
    """:func:`takes_tensor_cores` for inputs the split GEMMs do not take, the weight widened."""
    return TENSOR_CORE_ROUTER and tensor_core_accepts(x_TD, weight_ED) and weight_ED.shape[0] >= TENSOR_CORE_MIN_EXPERTS


def _widened(weight_ED: Tensor) -> Tensor:
    """A half-precision CUDA weight (a model cast whole to bf16) as float32 for the kernels: an
    (E, D) copy, small next to the tokens, whose gradient autograd narrows back. Off CUDA the
    reference takes the weight as it is, so no copy is made there."""
    widen = weight_ED.is_cuda and weight_ED.dtype in (torch.bfloat16, torch.float16)
    return weight_ED.float() if widen else weight_ED


def _kernel_router_logits(x_TD: Tensor, weight_ED: Tensor, kernel_weight: Tensor | None = None) -> Tensor:
    """The kernels, for inputs that :func:`kernels_accept`: ``kernel_weight`` is ``weight_ED`` as the
    tensor they read (None: ``weight_ED`` itself), from :func:`router_logits`."""
    return _run_kernels(torch.ops.lightning_moe.router_logits, _RouterLogitsFunction, x_TD, weight_ED, kernel_weight)


def _run_kernels(op: Any, function: Any, x_TD: Tensor, weight_ED: Tensor, kernel_weight: Tensor | None) -> Tensor:
    """``op`` (the custom op, traced by ``torch.compile``) or, eager, ``function`` on the tokens and
    the weight the kernels read (detached or not: gradients reach ``weight_ED`` either way)."""
    x_TD = x_TD.contiguous()
    kernel_weight = (weight_ED if kernel_weight is None else kernel_weight).contiguous()
    if torch.compiler.is_compiling():
        return op(x_TD, kernel_weight)
    return function.apply(x_TD, weight_ED, kernel_weight)


def bf16_parts(t: Tensor, parts: int) -> list[Tensor]:
    """``parts`` bf16 tensors that add up to float32 ``t``: each the leading 8 significand bits of
    what the previous ones leave (a bf16 ``t`` is its own single part). Three parts hold float32
    exactly, but for values whose last part falls below bf16's normal range.

    The parts are cut by masking the low 16 bits of the float32 words, not by rounding casts:
    each part is then exactly a bf16 value however a compiler fuses the casts (inductor keeps
    float32 precision across casts inside its kernels, which would make a rounded remainder 0).
    """
    if t.dtype == torch.bfloat16:
        return [t]
    out = []
    rest = t.float()
    for index in range(parts):
        part = rest if index + 1 == parts else _leading_bf16_bits(rest)
        out.append(part.bfloat16())
        if index + 1 < parts:
            rest = rest - part
    return out


def _leading_bf16_bits(t: Tensor) -> Tensor:
    """Float32 ``t`` with the low 16 bits of each word cleared: a bf16 value, truncated."""
    return (t.view(torch.int32) & -65536).view(torch.float32)


def _mm_float32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` of bf16 matrices with float32 accumulation and a float32 result."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()  # the same exact products, for CPU tests of the split maths


def _sum_blocks(product: Tensor, blocks: int, dim: int) -> Tensor:
    """Add the ``blocks`` equal slices of ``product`` along ``dim`` (smallest parts first)."""
    if blocks == 1:
        return product
    pieces = product.chunk(blocks, dim=dim)
    total = pieces[-1]
    for piece in reversed(pieces[:-1]):
        total = total + piece
    return total


class _SplitRouterLogits(torch.autograd.Function):
    """Float32 logits ``x @ w.T`` of bf16 tokens on bf16 tensor cores, the weight split in parts."""

    @staticmethod
    def forward(ctx: Any, x_TD: Tensor, weight_ED: Tensor) -> Tensor:
        weight_parts = bf16_parts(weight_ED, FLOAT32_PARTS)
        ctx.save_for_backward(x_TD, weight_ED)
        ctx.weight_parts = weight_parts[:2]
        product_TPE = _mm_float32(x_TD, torch.cat(weight_parts).t())
        return _sum_blocks(product_TPE, len(weight_parts), dim=1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_TE: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x_TD, weight_ED = ctx.saved_tensors
        grad_parts = bf16_parts(grad_TE.float().contiguous(), FLOAT32_PARTS)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            # g0 w0 + g0 w1 + g1 w0: the terms above bf16's rounding of the result.
            w_parts = ctx.weight_parts
            lhs = [grad_parts[0]] * len(w_parts) + [grad_parts[1]]
            rhs = [*w_parts, w_parts[0]]
            grad_x = torch.mm(torch.cat(lhs, dim=1), torch.cat(rhs))
        if ctx.needs_input_grad[1]:
            product_PED = _mm_float32(torch.cat(grad_parts, dim=1).t(), x_TD)
            grad_weight = _sum_blocks(product_PED, len(grad_parts), dim=0).to(weight_ED.dtype)
        ctx.weight_parts = None
        return grad_x, grad_weight


def split_accepts(x_TD: Tensor, weight_ED: Tensor) -> bool:
    """Whether :func:`router_logits` takes the split-weight tensor-core GEMMs for these inputs:
    2-D bf16 tokens and a float32 or bf16 (E, D) weight with T * D * E at least
    :data:`SPLIT_MIN_WORK`, on a CUDA device where cuBLAS gives float32 results of bf16 GEMMs."""
    return (
        x_TD.dim() == 2
        and weight_ED.dim() == 2
        and x_TD.dtype == torch.bfloat16
        and weight_ED.dtype in (torch.float32, torch.bfloat16)
        and x_TD.shape[1] == weight_ED.shape[1]
        and x_TD.numel() * weight_ED.shape[0] >= SPLIT_MIN_WORK
        and x_TD.is_cuda
        and weight_ED.is_cuda
        and float32_output_mm_works(cuda_device_index(x_TD.device))
    )


@torch.compiler.assume_constant_result
def float32_output_mm_works(device_index: int) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for bf16 ``a``, ``b`` on this CUDA device."""
    return _probe_float32_output_mm(device_index)


@functools.cache
def _probe_float32_output_mm(device_index: int) -> bool:
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=torch.device("cuda", device_index))
        return bool(torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32)
    except (RuntimeError, TypeError):
        return False


# ---------------------------------------------------------------------------------------------
# The one-launch tensor-core kernels (src_cuda/router_logits_tc.cu).


def _aligned(t: Tensor) -> Tensor:
    """``t``, or a copy of it where its data does not start on 16 bytes (a contiguous view at an
    offset), which the tensor-core kernels' vector loads need."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _tc_forward(x_TD: Tensor, weight_ED: Tensor) -> Tensor:
    return require_extension().router_logits_tc_forward(_aligned(x_TD), _aligned(weight_ED), PIPELINED_TC_ROUTER)


def _tc_grad_x(grad_TE: Tensor, weight_ED: Tensor, addend: Tensor | None = None) -> Tensor:
    """``grad_x`` in bf16, plus ``addend`` (another bf16 gradient of x, added by the kernel with the
    bits of a bf16 addition) when given."""
    addend = None if addend is None else _aligned(addend.contiguous())
    ext = require_extension()
    return ext.router_logits_tc_grad_x(_aligned(grad_TE), _aligned(weight_ED), PERSISTENT_TC_GRAD_X, addend)


def _tc_grad_weight(grad_TE: Tensor, x_TD: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The weight's gradient in ``dtype`` (float32, bfloat16 or float16), rounded from the float32
    sum by the kernel that adds the chunks of tokens: the bits of a cast, without its pass."""
    ext = require_extension()
    return ext.router_logits_tc_grad_weight(_aligned(grad_TE), _aligned(x_TD), PIPELINED_TC_ROUTER, dtype)


@torch.library.custom_op("lightning_moe::router_logits_tc", mutates_args=())
def _router_logits_tc_cuda(x_TD: Tensor, weight_ED: Tensor) -> Tensor:
    return _tc_forward(x_TD, weight_ED)


@_router_logits_tc_cuda.register_fake
def _(x_TD: Tensor, weight_ED: Tensor) -> Tensor:
    return x_TD.new_empty(x_TD.shape[0], weight_ED.shape[0], dtype=torch.float32)


def _tc_eager_grad_x(grad_TE: Tensor, weight_ED: Tensor, x_dtype: torch.dtype, addend: Tensor | None) -> Tensor:
    """:func:`_tc_grad_x` as a :data:`_GradX`: its grad_x is bf16, the only token dtype the
    tensor-core kernels take, so ``x_dtype`` needs no cast."""
    return _tc_grad_x(grad_TE, weight_ED, addend)


@torch.library.custom_op("lightning_moe::router_logits_tc_grad_x", mutates_args=())
def _router_logits_tc_grad_x_cuda(grad_TE: Tensor, weight_ED: Tensor) -> Tensor:
    return _tc_grad_x(grad_TE, weight_ED)


@_router_logits_tc_grad_x_cuda.register_fake
def _(grad_TE: Tensor, weight_ED: Tensor) -> Tensor:
    return grad_TE.new_empty(grad_TE.shape[0], weight_ED.shape[1], dtype=torch.bfloat16)


@torch.library.custom_op("lightning_moe::router_logits_tc_grad_weight", mutates_args=())
def _router_logits_tc_grad_weight_cuda(grad_TE: Tensor, x_TD: Tensor) -> Tensor:
    return _tc_grad_weight(grad_TE, x_TD)


@_router_logits_tc_grad_weight_cuda.register_fake
def _(grad_TE: Tensor, x_TD: Tensor) -> Tensor:
    return grad_TE.new_empty(grad_TE.shape[1], x_TD.shape[1], dtype=torch.float32)


# grad_x of the tensor-core kernels is bf16, the only token dtype they take.
_router_logits_tc_cuda.register_autograd(
    _backward_through(
        lambda grad_TE, weight_ED, _, __: torch.ops.lightning_moe.router_logits_tc_grad_x(grad_TE, weight_ED),
        lambda grad_TE, x_TD, _: torch.ops.lightning_moe.router_logits_tc_grad_weight(grad_TE, x_TD),
    ),
    setup_context=_setup_context,
)
_TensorCoreRouterLogits = _eager_function(
    "_TensorCoreRouterLogits",
    _tc_forward,
    _backward_through(_tc_eager_grad_x, _tc_grad_weight),
)


def tensor_core_accepts(x_TD: Tensor, weight_ED: Tensor) -> bool:
    """Whether the tensor-core kernels take these inputs: 2-D bf16 ``x_TD`` and a float32 or bf16
    (E, D) ``weight_ED`` (widen a float16 one first) with E a multiple of
    :data:`TENSOR_CORE_EXPERT_MULTIPLE` from 8 to :data:`MAX_KERNEL_EXPERTS` and D a positive
    multiple of :data:`TENSOR_CORE_DIM_MULTIPLE`, both on CUDA, and the extension loaded. The device
    comes last, so CPU tensors never trigger a build."""
    if x_TD.dim() != 2 or weight_ED.dim() != 2:
        return False
    num_experts, dim = weight_ED.shape
    return (
        x_TD.shape[1] == dim
        and dim > 0
        and dim % TENSOR_CORE_DIM_MULTIPLE == 0
        and TENSOR_CORE_EXPERT_MULTIPLE <= num_experts <= MAX_KERNEL_EXPERTS
        and num_experts % TENSOR_CORE_EXPERT_MULTIPLE == 0
        and x_TD.dtype == torch.bfloat16
        and weight_ED.dtype in (torch.float32, torch.bfloat16)
        and use_cuda_kernels(x_TD, weight_ED)
    )


def _tensor_core_router_logits(x_TD: Tensor, weight_ED: Tensor, kernel_weight: Tensor | None = None) -> Tensor:
    """The tensor-core kernels, for inputs that :func:`tensor_core_accepts`; ``kernel_weight`` as in
    :func:`_kernel_router_logits`."""
    return _run_kernels(
        torch.ops.lightning_moe.router_logits_tc, _TensorCoreRouterLogits, x_TD, weight_ED, kernel_weight
    )


_SIMT_KERNELS = EagerKernels(_forward, _simt_grad_x, _simt_grad_weight)
_TENSOR_CORE_KERNELS = EagerKernels(_tc_forward, _tc_eager_grad_x, _tc_grad_weight)
