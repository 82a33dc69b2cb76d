"""The fused GLU kernels (SwiGLU, GeGLU) against their reference and a float64 oracle, on a GPU.

Shape legend: N rows (assignments), F expert hidden dim.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_moe import ops
from lightning_moe.ops import reference
from tests.ops.gpu_checks import DTYPE_IDS, DTYPES, GPU_MARKS, assert_close_to_gpu_oracle, poison_float_blocks

pytestmark = GPU_MARKS


GLU_KINDS = ["swiglu", "geglu"]
GLU_SHAPES = [(0, 8), (1, 1), (37, 1000), (37, 1001), (4096, 1408)]


def glu_inputs(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> list[Tensor]:
    """Pre-activations spread over the gates' curved range, gate values and an upstream gradient."""
    scales = (3.0, 1.0, 1.0)
    return [(scale * torch.randn(shape, generator=generator)).to("cuda", dtype) for scale in scales]


def assert_glu_close(a_NF: Tensor, b_NF: Tensor, grad_NF: Tensor, kind: str) -> None:
    """The op's output and gradients against PyTorch's in the same dtype and a float64 oracle."""
    a_NF, b_NF = a_NF.detach().requires_grad_(), b_NF.detach().requires_grad_()
    poison_float_blocks()
    h_NF = ops.glu(a_NF, b_NF, kind)  # type: ignore[arg-type]
    poison_float_blocks()
    grad_a, grad_b = torch.autograd.grad(h_NF, (a_NF, b_NF), grad_NF)
    assert h_NF.dtype == grad_a.dtype == grad_b.dtype == a_NF.dtype
    torch_h = reference.glu(a_NF, b_NF, kind)
    torch_grads = torch.autograd.grad(torch_h, (a_NF, b_NF), grad_NF)
    a64, b64 = a_NF.detach().double().requires_grad_(), b_NF.detach().double().requires_grad_()
    oracle_h = reference.glu(a64, b64, kind)
    oracle_grads = torch.autograd.grad(oracle_h, (a64, b64), grad_NF.double())
    assert_close_to_gpu_oracle(h_NF, torch_h, oracle_h.detach())
    for got, torch_grad, oracle_grad in zip((grad_a, grad_b), torch_grads, oracle_grads, strict=True):
        assert_close_to_gpu_oracle(got, torch_grad, oracle_grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", GLU_SHAPES, ids=lambda shape: "x".join(map(str, shape)))
@pytest.mark.parametrize("kind", GLU_KINDS)
def test_glu_forward_and_backward(
    kind: str, shape: tuple[int, int], dtype: torch.dtype, generator: torch.Generator
) -> None:
    assert_glu_close(*glu_inputs(shape, dtype, generator), kind)


@pytest.mark.parametrize("layout", ["misaligned_view", "strided"])
@pytest.mark.parametrize("kind", GLU_KINDS)
def test_glu_of_unaligned_inputs(kind: str, layout: str, generator: torch.Generator) -> None:
    rows, hidden = 300, 64
    a_NF, b_NF, grad_NF = glu_inputs((rows, 2 * hidden + 1), torch.bfloat16, generator)
    if layout == "misaligned_view":  # contiguous, but one element past a 16-byte boundary
        a_NF = a_NF.flatten()[1 : 1 + rows * hidden].view(rows, hidden)
    else:  # every other column: the wrapper makes it contiguous
        a_NF = a_NF[:, : 2 * hidden : 2]
    b_NF = b_NF.flatten()[3 : 3 + rows * hidden].view(rows, hidden)
    assert_glu_close(a_NF, b_NF, grad_NF[:, :hidden], kind)


@pytest.mark.parametrize("kind", GLU_KINDS)
def test_glu_is_the_same_on_every_run(kind: str, generator: torch.Generator) -> None:
    a_NF, b_NF, grad_NF = glu_inputs((4096, 1408), torch.bfloat16, generator)
    a_NF.requires_grad_()
    b_NF.requires_grad_()

    def run() -> list[Tensor]:
        h_NF = ops.glu(a_NF, b_NF, kind)  # type: ignore[arg-type]
        return [h_NF, *torch.autograd.grad(h_NF, (a_NF, b_NF), grad_NF)]

    for first, second in zip(run(), run(), strict=True):
        assert torch.equal(first, second)


def test_glu_does_not_synchronise_with_the_host(generator: torch.Generator) -> None:
    a_NF, b_NF, grad_NF = glu_inputs((512, 256), torch.bfloat16, generator)
    a_NF.requires_grad_()
    b_NF.requires_grad_()
    ops.glu(a_NF, b_NF, "swiglu")  # loads the extension
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for kind in GLU_KINDS:
            ops.glu(a_NF, b_NF, kind).backward(grad_NF)  # type: ignore[arg-type]
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("kind", GLU_KINDS)
def test_compiled_glu_matches_eager(kind: str, generator: torch.Generator) -> None:
    a_NF, b_NF, grad_NF = glu_inputs((1000, 256), torch.bfloat16, generator)

    def gated(a: Tensor, b: Tensor) -> Tensor:
        return ops.glu(a, b, kind)  # type: ignore[arg-type]

    compiled = torch.compile(gated, fullgraph=True)
    outputs = []
    for function in (gated, compiled):
        a_in, b_in = a_NF.clone().requires_grad_(), b_NF.clone().requires_grad_()
        h_NF = function(a_in, b_in)
        outputs.append([h_NF, *torch.autograd.grad(h_NF, (a_in, b_in), grad_NF)])
    for eager, traced in zip(*outputs, strict=True):
        assert torch.equal(traced, eager)
