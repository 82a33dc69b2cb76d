"""The expert MLP as grouped GEMMs, through torch's grouped matrix multiply.

Shape legend: N rows (sorted by expert), D model dim, F expert hidden, E experts.

``torch._grouped_mm`` (public as ``torch.nn.functional.grouped_mm`` in newer torch) multiplies each
expert's contiguous block of rows by that expert's weight in one launch, reading the block
boundaries from an int32 device tensor, so the layer needs no host sync and no per-expert loop.
Torch has a fused kernel for it only in bfloat16 on compute capability 9.0 and 10.x; elsewhere it
loops over the groups after copying the offsets to the host, which gains nothing over the
per-expert loop, so this path is taken only there.

Alignment, read off torch's kernel (``GroupMMCommon.cuh``) and meta checks: every operand's row
stride must be a multiple of 16 bytes (D and F multiples of 8 in bfloat16), and there must be
fewer than 1024 groups. Groups split along the rows (forward, and the input gradient) and along
the contraction (the weight gradient, whose left operand is column-major) may have any size,
zero included, so the expert-sorted rows need no per-expert padding.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_moe.ops.activation import activation as apply_activation
from lightning_moe.ops.activation import glu
from lightning_moe.ops.extension import cuda_device_index
from lightning_moe.ops.grouped_linear import grouped_linear, grouped_linear_usable

# torch's fused grouped GEMM accepts fewer than this many groups.
MAX_GROUPS = 1024
# Row strides must be multiples of 16 bytes.
_ALIGNMENT_BYTES = 16


def grouped_mm_function() -> Callable[..., Tensor] | None:
    """``torch.nn.functional.grouped_mm`` or ``torch._grouped_mm``, whichever this torch has."""
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_usable(device: torch.device, dtype: torch.dtype, num_experts: int, d_model: int, d_hidden: int) -> bool:
    """Whether :func:`grouped_mlp` can run these experts on ``device`` in ``dtype``, fused.

    Args:
        device: Device of the rows.
        dtype: Dtype the experts compute in.
        num_experts: E.
        d_model: D.
        d_hidden: F.
    """
    if device.type != "cuda" or dtype != torch.bfloat16 or num_experts >= MAX_GROUPS:
        return False
    elements = _ALIGNMENT_BYTES * 8 // torch.finfo(dtype).bits
    if d_model % elements or d_hidden % elements:
        return False
    return grouped_mm_works(cuda_device_index(device))


@torch.compiler.assume_constant_result
def grouped_mm_works(device_index: int) -> bool:
    """Whether torch's fused grouped GEMM runs, and is right, on CUDA device ``device_index``.

    Tried once per device and process; ``torch.compile`` keeps the answer as a constant.
    """
    return _probe(device_index)


@functools.cache
def _probe(device_index: int) -> bool:
    grouped_mm = grouped_mm_function()
    if grouped_mm is None:
        return False
    if torch.cuda.get_device_capability(device_index)[0] not in (9, 10):
        return False
    device = torch.device("cuda", device_index)
    try:
        with torch.no_grad(), torch.autocast("cuda", enabled=False):
            x_ND = torch.randn(24, 16, device=device, dtype=torch.bfloat16)
            w_EDF = torch.randn(3, 16, 8, device=device, dtype=torch.bfloat16)
            offsets_E = torch.tensor([8, 8, 24], device=device, dtype=torch.int32)
            out_NF = grouped_mm(x_ND, w_EDF, offs=offsets_E)
            expected_NF = torch.cat([x_ND[:8] @ w_EDF[0], x_ND[8:] @ w_EDF[2]])
            correct = torch.allclose(out_NF.float(), expected_NF.float(), rtol=2e-2, atol=2e-2)
    except Exception as error:  # an old or partial torch: keep the per-expert loop, say why once
        warnings.warn(f"lightning_moe: torch's grouped GEMM failed ({error}); using the per-expert loop.", stacklevel=2)
        return False
    if not correct:
        warnings.warn(
            "lightning_moe: torch's grouped GEMM gave wrong results; using the per-expert loop.", stacklevel=2
        )
    return correct


def grouped_mlp(
    x_ND: Tensor,
    tokens_per_expert: Tensor,
    w1_EFD: Tensor,
    w2_EDF: Tensor,
    w3_EFD: Tensor | None,
    b1_EF: Tensor | None,
    b2_ED: Tensor | None,
    activation: str,
) -> Tensor:
    """Every expert's MLP on its block of rows, as two (three for GLUs) grouped GEMMs.

    The GEMMs run on :func:`lightning_moe.ops.grouped_linear.grouped_linear`'s kernels where
    :func:`~lightning_moe.ops.grouped_linear.grouped_linear_usable` holds for both projections (an
    H200-class GPU, few rows per expert), else on torch's grouped GEMM.

    Computes ``w2[e] @ act(w1[e] @ x + b1[e]) + b2[e]``, or ``w2[e] @ (act(w1[e] @ x) * (w3[e] @ x))``
    for GLU experts, for the rows of each expert e, like ``GroupedExperts.expert_forward``.

    Args:
        x_ND: (N, D) rows sorted by expert, in the weights' dtype.
        tokens_per_expert: (E,) int64 rows of each expert, summing to N.
        w1_EFD: (E, F, D) first projection.
        w2_EDF: (E, D, F) second projection.
        w3_EFD: (E, F, D) gate projection of GLU experts, else None.
        b1_EF: (E, F) bias of the first projection, or None.
        b2_ED: (E, D) bias of the second projection, or None.
        activation: The experts' activation, by name (see :mod:`lightning_moe.layers.activations`);
            ``w3_EFD`` is given exactly for the GLUs ``"swiglu"`` and ``"geglu"``. It runs as the
            fused :func:`lightning_moe.ops.activation.activation` or, gated,
            :func:`lightning_moe.ops.activation.glu`.

    Returns:
        (N, D) in ``x_ND``'s dtype.
    """
    grouped_mm = grouped_mm_function()
    assert grouped_mm is not None, "call grouped_mm_usable() first"
    num_rows = x_ND.shape[0]
    if num_rows == 0:
        return x_ND.new_zeros(0, w2_EDF.shape[1])
    x_ND = x_ND.contiguous()
    # Cumulative row ends per expert, computed on the device: no host sync.
    offsets_E = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    expert_of_row_N = None
    if b1_EF is not None or b2_ED is not None:
        experts_E = torch.arange(tokens_per_expert.shape[0], device=x_ND.device)
        expert_of_row_N = torch.repeat_interleave(experts_E, tokens_per_expert, output_size=num_rows)
    num_experts, d_hidden, d_model = w1_EFD.shape
    if grouped_linear_usable(num_rows, num_experts, d_model, d_hidden, x_ND.device):
        linear: Callable[[Tensor, Tensor], Tensor] = functools.partial(grouped_linear, ends_E=offsets_E)
    else:
        linear = functools.partial(_torch_linear, grouped_mm=grouped_mm, ends_E=offsets_E)
    hidden_NF = linear(x_ND, w1_EFD)
    if b1_EF is not None:
        hidden_NF = hidden_NF + b1_EF[expert_of_row_N]
    if w3_EFD is None:
        hidden_NF = apply_activation(hidden_NF, activation)  # type: ignore[arg-type]
    else:
        gate_NF = linear(x_ND, w3_EFD)
        hidden_NF = glu(hidden_NF, gate_NF, activation)  # type: ignore[arg-type]
    out_ND = linear(hidden_NF, w2_EDF)
    if b2_ED is not None:
        out_ND = out_ND + b2_ED[expert_of_row_N]
    return out_ND


def _torch_linear(x_NK: Tensor, w_EMK: Tensor, grouped_mm: Callable[..., Tensor], ends_E: Tensor) -> Tensor:
    return grouped_mm(x_NK, w_EMK.transpose(-2, -1), offs=ends_E)
