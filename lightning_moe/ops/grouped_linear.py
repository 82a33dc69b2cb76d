"""One linear map per expert over expert-sorted rows: the ``lightning_moe::grouped_linear`` op.

Shape legend: N rows (sorted by expert), K input features, M output features, E experts.

``y[r] = x[r] @ w[e].T`` for the rows r of expert e, with ``w`` (E, M, K) laid out like E stacked
``nn.Linear`` weights and the groups given by ``ends_E``, the cumulative row counts as an int32
device tensor, so no host sync is needed. On a compute capability 9.0 GPU the kernel of
``src_cuda/grouped_gemm.cu`` (TMA loads, warp-specialised persistent CTAs, Hopper ``wgmma``) runs
the forward and the input gradient, and ``src_cuda/grouped_gemm_weight_grad.cu`` the weight
gradient, faster than ``torch._grouped_mm`` when experts get few rows each (about 128), where
reading or writing the expert weights sets the time and torch's kernel picks a 64-row tile.
:func:`grouped_linear_usable` says when the kernels apply;
elsewhere :func:`lightning_moe.ops.grouped_mm.grouped_mlp` calls torch's grouped GEMM, and
:func:`lightning_moe.ops.reference.grouped_linear` is the reference.

Registered as ``torch.library`` custom ops, which ``torch.compile`` traces through; eager calls take
the same kernels through a plain ``autograd.Function`` (see :mod:`lightning_moe.ops.permute`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_moe.ops.extension import cuda_device_index, load_extension, require_extension

# The kernel's tiles are 128 output columns wide; the input gradient swaps input and output
# features, so both must be multiples of it.
FEATURE_MULTIPLE = 128
# The layer takes the kernel up to this many rows per expert on average: there it measured faster
# than torch's grouped GEMM in the layer. Above it, the GEMMs alone measured as fast or faster
# (512-1536 rows), but the layer with one or eight experts of 4096+ rows was slower
# (benchmarks/RESULTS.md).
MAX_ROWS_PER_EXPERT = 160
# Output columns per tile of the kernels where they divide the output's columns and leave no SM
# short of work (at least TILE_N_MIN_WAVES tiles per SM), else 128. 256 measured faster at about 128
# rows per expert over 64 experts; with 8 experts of 128 rows, 128 was faster: there 256-column
# tiles number fewer than the SMs (benchmarks/RESULTS.md, tenth session).
TILE_N = 256
TILE_N_MIN_WAVES = 2
# CTAs per SM of the row kernel (forward and input gradient) and of the weight-gradient kernel: 1
# (two consumer warpgroups share a tile, TILE_N wide where tile_columns says so), or 2 (each CTA one
# consumer of a whole 128 x 128 tile, so that one CTA's stores run while the other multiplies). On
# an H200 two CTAs made the weight gradients 12-20% faster at 128 rows per expert over 64 experts,
# and the row kernel faster on some GEMMs, slower on others (benchmarks/RESULTS.md, twelfth session).
ROW_CTAS_PER_SM = 1
WEIGHT_GRAD_CTAS_PER_SM = 2
# Output tiles a weight-gradient CTA takes in a row (with two CTAs per SM) that share an expert and
# 128 rows of its gradient: for experts of at most 192 rows that slice is then read from L2 once
# per run rather than once per tile. 1: one tile at a time. On an H200 runs of 4 made the two weight
# gradients at 128 rows per expert 3-5% faster over 64 experts (1024 x 4096, 2048 x 1408) and
# 6-15% faster over 8 (benchmarks/RESULTS.md, sixteenth session).
WEIGHT_GRAD_RUN_TILES = 4
# Rows per tile of the row kernel where its tiles are 256 columns wide and the experts average more
# than TALL_TILE_MIN_ROWS and at most TALL_TILE_MAX_ROWS rows: 192 (three consumer warpgroups), else
# 128. At 112-160 rows per expert, random routing gives many experts 129-192 rows; 128-row tiles
# take each of them in two tiles that both stream its weights through L2, one 192-row tile streams
# them once. On an H200 (1024 x 4096, 64 experts) the four row GEMMs took 6-21% less time at 112,
# 128 and 160 rows on average, and 2-5% more at 96, 192 and 256 (benchmarks/RESULTS.md, thirteenth
# session).
TALL_ROW_TILES = True
TALL_TILE_MIN_ROWS = 104
TALL_TILE_MAX_ROWS = 176
# With one assignment per token, the second projection's kernel writes the combined output and the
# first projection's input gradient is written in token order (lightning_moe.ops.expert_mlp): two
# row kernels fewer a step. False: the row kernels run.
TOKEN_EPILOGUES = True


def grouped_linear_usable(
    rows: int, num_experts: int, in_features: int, out_features: int, device: torch.device
) -> bool:
    """Whether :func:`grouped_linear` and its gradients run on the kernels, and pay.

    Args:
        rows: N, the rows of all experts together.
        num_experts: E.
        in_features: K; a multiple of 128.
        out_features: M; a multiple of 128.
        device: Device of the rows.
    """
    if device.type != "cuda" or rows > MAX_ROWS_PER_EXPERT * num_experts:
        return False
    if in_features % FEATURE_MULTIPLE or out_features % FEATURE_MULTIPLE:
        return False
    return _kernels_built(cuda_device_index(device))


@torch.compiler.assume_constant_result
def _kernels_built(device_index: int) -> bool:
    return _probe(device_index)


@functools.cache
def _probe(device_index: int) -> bool:
    module = load_extension()
    if module is None:
        return False
    with torch.cuda.device(device_index):
        return bool(module.grouped_gemm_available())


def tile_columns(row_tiles: int, columns: int, num_sms: int) -> int:
    """Output columns per tile, TILE_N or 128, of a kernel call with ``row_tiles`` 128-row tiles (at
    most) of ``columns`` output columns on a GPU of ``num_sms`` SMs."""
    if columns % TILE_N or row_tiles * (columns // TILE_N) < TILE_N_MIN_WAVES * num_sms:
        return FEATURE_MULTIPLE
    return TILE_N


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def tile_rows(rows: int, num_experts: int, tile_n: int) -> int:
    """Output rows per tile, 192 or 128, of a row-kernel call on ``rows`` rows over ``num_experts``
    experts with ``tile_n``-column tiles."""
    tall = TALL_ROW_TILES and tile_n == 256
    if tall and TALL_TILE_MIN_ROWS * num_experts < rows <= TALL_TILE_MAX_ROWS * num_experts:
        return 192
    return 128


def _rows_tiles(rows_NK: Tensor, num_experts: int, columns: int) -> tuple[int, int]:
    """Output (columns, rows) per tile of the row kernel on ``rows_NK`` over ``num_experts`` groups."""
    # At most one partly filled 128-row tile per expert beyond the full ones.
    row_tiles = rows_NK.shape[0] // 128 + num_experts
    tile_n = tile_columns(row_tiles, columns, _num_sms(rows_NK.device.index))
    return tile_n, tile_rows(rows_NK.shape[0], num_experts, tile_n)


def _rows_gemm(a_NK: Tensor, w_EMK: Tensor, ends_E: Tensor, b_is_kn: bool) -> Tensor:
    if ROW_CTAS_PER_SM == 2:
        return require_extension().grouped_gemm_rows(a_NK, w_EMK, ends_E, b_is_kn, FEATURE_MULTIPLE, 2)
    tile_n, tile_m = _rows_tiles(a_NK, w_EMK.shape[0], w_EMK.shape[2 if b_is_kn else 1])
    return require_extension().grouped_gemm_rows(a_NK, w_EMK, ends_E, b_is_kn, tile_n, 1, tile_m)


def _forward(x_NK: Tensor, w_EMK: Tensor, ends_E: Tensor) -> Tensor:
    return _rows_gemm(x_NK, w_EMK, ends_E, False)


def token_epilogues_usable() -> bool:
    """Whether :func:`input_grad_to_tokens` and :func:`forward_and_combine_tokens` run: switched on
    (TOKEN_EPILOGUES), with the row kernel on one CTA per SM (ROW_CTAS_PER_SM 1), whose shapes
    their epilogues are built for."""
    return TOKEN_EPILOGUES and ROW_CTAS_PER_SM == 1


def input_grad_to_tokens(grad_NM: Tensor, w_EMK: Tensor, ends_E: Tensor, order_N: Tensor) -> Tensor:
    """The input gradient ``grad[r] @ w[e]`` of rows that are a permutation of the tokens (one
    assignment per token, every row inside a group), written straight into token order: row ``r``
    to token ``order_N[r]``. The permutation's backward then has nothing left to do."""
    tile_n, tile_m = _rows_tiles(grad_NM, w_EMK.shape[0], w_EMK.shape[2])
    return require_extension().grouped_gemm_rows_to_tokens(grad_NM, w_EMK, ends_E, order_N, tile_n, 1, tile_m)


def forward_and_combine_tokens(
    x_NK: Tensor, w_EMK: Tensor, ends_E: Tensor, order_N: Tensor, weights_T: Tensor
) -> tuple[Tensor, Tensor]:
    """``y = grouped_linear(x_NK, w_EMK, ends_E)`` for rows that are a permutation of the tokens, and
    the combine ``out[t] = weights_T[t] * y[r]`` (t = ``order_N[r]``) from the same kernel, with the
    bits of :func:`lightning_moe.ops.unpermute` for one assignment per token; (y, out), both bf16."""
    tile_n, tile_m = _rows_tiles(x_NK, w_EMK.shape[0], w_EMK.shape[1])
    kernel = require_extension().grouped_gemm_rows_and_combine
    return kernel(x_NK, w_EMK, ends_E, order_N, weights_T, tile_n, 1, tile_m)


def _input_grad(grad_NM: Tensor, w_EMK: Tensor, ends_E: Tensor) -> Tensor:
    return _rows_gemm(grad_NM, w_EMK, ends_E, True)


def _weight_grad(grad_NM: Tensor, x_NK: Tensor, ends_E: Tensor) -> Tensor:
    # grad_w[e] = grad[rows e].T @ x[rows e], ragged along the contraction: tiles of 128 rows of M.
    if WEIGHT_GRAD_CTAS_PER_SM == 2:
        return require_extension().grouped_gemm_weight_grad(
            grad_NM, x_NK, ends_E, FEATURE_MULTIPLE, 2, WEIGHT_GRAD_RUN_TILES
        )
    row_tiles = ends_E.shape[0] * (grad_NM.shape[1] // 128)
    tile_n = tile_columns(row_tiles, x_NK.shape[1], _num_sms(x_NK.device.index))
    return require_extension().grouped_gemm_weight_grad(grad_NM, x_NK, ends_E, tile_n, 1)


@torch.library.custom_op("lightning_moe::grouped_linear", mutates_args=())
def _grouped_linear_cuda(x_NK: Tensor, w_EMK: Tensor, ends_E: Tensor) -> Tensor:
    return _forward(x_NK, w_EMK, ends_E)


@_grouped_linear_cuda.register_fake
def _(x_NK: Tensor, w_EMK: Tensor, ends_E: Tensor) -> Tensor:
    return x_NK.new_empty(x_NK.shape[0], w_EMK.shape[1])


@torch.library.custom_op("lightning_moe::grouped_linear_input_grad", mutates_args=())
def _grouped_linear_input_grad_cuda(grad_NM: Tensor, w_EMK: Tensor, ends_E: Tensor) -> Tensor:
    return _input_grad(grad_NM, w_EMK, ends_E)


@_grouped_linear_input_grad_cuda.register_fake
def _(grad_NM: Tensor, w_EMK: Tensor, ends_E: Tensor) -> Tensor:
    return grad_NM.new_empty(grad_NM.shape[0], w_EMK.shape[2])


@torch.library.custom_op("lightning_moe::grouped_linear_weight_grad", mutates_args=())
def _grouped_linear_weight_grad_cuda(grad_NM: Tensor, x_NK: Tensor, ends_E: Tensor) -> Tensor:
    return _weight_grad(grad_NM, x_NK, ends_E)


@_grouped_linear_weight_grad_cuda.register_fake
def _(grad_NM: Tensor, x_NK: Tensor, ends_E: Tensor) -> Tensor:
    return grad_NM.new_empty(ends_E.shape[0], grad_NM.shape[1], x_NK.shape[1])


def _setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor | None) -> None:
    ctx.save_for_backward(*inputs)


_Gradient = Callable[[Tensor, Tensor, Tensor], Tensor]


def _gradients(
    ctx: Any, grad_NM: Tensor, input_grad: _Gradient, weight_grad: _Gradient
) -> tuple[Tensor | None, Tensor | None, None]:
    """The gradients of x and w, computed by ``input_grad`` and ``weight_grad`` (ops or kernel calls)."""
    x_NK, w_EMK, ends_E = ctx.saved_tensors
    grad_NM = grad_NM.contiguous()
    grad_x = input_grad(grad_NM, w_EMK, ends_E) if ctx.needs_input_grad[0] else None
    grad_w = weight_grad(grad_NM, x_NK, ends_E) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


def _backward(ctx: Any, grad_NM: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    ops = torch.ops.lightning_moe
    return _gradients(ctx, grad_NM, ops.grouped_linear_input_grad, ops.grouped_linear_weight_grad)


_grouped_linear_cuda.register_autograd(_backward, setup_context=_setup_context)


class _GroupedLinearFunction(torch.autograd.Function):
    """The eager path: the same kernels as the custom op, at less host time per call."""

    @staticmethod
    def forward(ctx: Any, x_NK: Tensor, w_EMK: Tensor, ends_E: Tensor) -> Tensor:
        _setup_context(ctx, (x_NK, w_EMK, ends_E), None)
        return _forward(x_NK, w_EMK, ends_E)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_NM: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        return _gradients(ctx, grad_NM, _input_grad, _weight_grad)


def grouped_linear(x_NK: Tensor, w_EMK: Tensor, ends_E: Tensor) -> Tensor:
    """``x[r] @ w[e].T`` for the rows r of each expert e, on the grouped GEMM kernels.

    Call only where :func:`grouped_linear_usable` holds for these sizes; inputs it cannot take
    raise a ``ValueError`` naming the input.

    Args:
        x_NK: (N, K) bfloat16 rows sorted by expert.
        w_EMK: (E, M, K) bfloat16 expert weights.
        ends_E: (E,) int32 cumulative rows per expert, ``ends_E[-1] == N``.

    Returns:
        (N, M) bfloat16; gradients flow to ``x_NK`` and ``w_EMK``.
    """
    _check_inputs(x_NK, w_EMK, ends_E)
    args = (x_NK.contiguous(), w_EMK.contiguous(), ends_E)
    if torch.compiler.is_compiling():
        return torch.ops.lightning_moe.grouped_linear(*args)
    return _GroupedLinearFunction.apply(*args)


def _check_inputs(x_NK: Tensor, w_EMK: Tensor, ends_E: Tensor) -> None:
    """The kernels' conditions on the inputs, as ``ValueError``s that name the input to change."""
    if x_NK.dim() != 2 or w_EMK.dim() != 3 or ends_E.dim() != 1:
        raise ValueError(
            f"grouped_linear needs x (N, K), w (E, M, K) and ends (E,), got shapes {tuple(x_NK.shape)}, "
            f"{tuple(w_EMK.shape)} and {tuple(ends_E.shape)}."
        )
    if x_NK.dtype != torch.bfloat16 or w_EMK.dtype != torch.bfloat16 or ends_E.dtype != torch.int32:
        raise ValueError(
            f"grouped_linear needs bfloat16 x and w and int32 ends, got {x_NK.dtype}, {w_EMK.dtype} and {ends_E.dtype}."
        )
    if not (x_NK.is_cuda and w_EMK.device == x_NK.device and ends_E.device == x_NK.device):
        raise ValueError(
            f"grouped_linear needs x, w and ends on one CUDA device, got {x_NK.device}, {w_EMK.device} and "
            f"{ends_E.device}."
        )
    if w_EMK.shape[0] != ends_E.shape[0] or w_EMK.shape[2] != x_NK.shape[1]:
        raise ValueError(
            f"grouped_linear needs one (M, K) weight per entry of ends with K = x's columns, got w "
            f"{tuple(w_EMK.shape)}, {ends_E.shape[0]} ends and x {tuple(x_NK.shape)}."
        )
    if x_NK.shape[1] % FEATURE_MULTIPLE or w_EMK.shape[1] % FEATURE_MULTIPLE:
        raise ValueError(
            f"grouped_linear needs K and M to be multiples of {FEATURE_MULTIPLE} (the kernels' tile), got "
            f"K={x_NK.shape[1]} and M={w_EMK.shape[1]}; check grouped_linear_usable() first."
        )
