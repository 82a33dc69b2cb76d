"""The activation kernels, gated (SwiGLU, GeGLU) and plain (GELU, tanh GELU, ReLU, SiLU), against
their references and a float64 oracle, on a GPU.

Shape legend: N rows (assignments), F expert hidden dim.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from lightning_moe import ops
from lightning_moe.ops import reference
from tests.ops.gpu_checks import DTYPE_IDS, DTYPES, GPU_MARKS, assert_close_to_gpu_oracle, poison_float_blocks

pytestmark = GPU_MARKS


GLU_KINDS = ["swiglu", "geglu"]
PLAIN = ["gelu", "gelu_tanh", "relu", "silu"]
GLU_SHAPES = [(0, 8), (1, 1), (37, 1000), (37, 1001), (4096, 1408)]


def glu_inputs(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> list[Tensor]:
    """Pre-activations spread over the gates' curved range, gate values and an upstream gradient."""
    scales = (3.0, 1.0, 1.0)
    return [(scale * torch.randn(shape, generator=generator)).to("cuda", dtype) for scale in scales]


def assert_close_to_references(
    op: Callable[..., Tensor], torch_op: Callable[..., Tensor], inputs: tuple[Tensor, ...], grad_NF: Tensor
) -> None:
    """``op``'s output and input gradients against ``torch_op``'s in the same dtype and a float64 oracle."""
    inputs = tuple(t.detach().requires_grad_() for t in inputs)
    poison_float_blocks()
    h_NF = op(*inputs)
    poison_float_blocks()
    grads = torch.autograd.grad(h_NF, inputs, grad_NF)
    assert all(t.dtype == inputs[0].dtype for t in (h_NF, *grads))
    torch_h = torch_op(*inputs)
    torch_grads = torch.autograd.grad(torch_h, inputs, grad_NF)
    inputs64 = tuple(t.detach().double().requires_grad_() for t in inputs)
    oracle_h = torch_op(*inputs64)
    oracle_grads = torch.autograd.grad(oracle_h, inputs64, grad_NF.double())
    assert_close_to_gpu_oracle(h_NF, torch_h, oracle_h.detach())
    for got, torch_grad, oracle_grad in zip(grads, torch_grads, oracle_grads, strict=True):
        assert_close_to_gpu_oracle(got, torch_grad, oracle_grad)


def assert_glu_close(a_NF: Tensor, b_NF: Tensor, grad_NF: Tensor, kind: str) -> None:
    """The GLU op against PyTorch's ``act(a) * b`` in the same dtype and a float64 oracle."""
    op, torch_op = functools.partial(ops.glu, kind=kind), functools.partial(reference.glu, kind=kind)
    assert_close_to_references(op, torch_op, (a_NF, b_NF), grad_NF)


def assert_plain_close(a_NF: Tensor, grad_NF: Tensor, name: str) -> None:
    """The plain op against PyTorch's activation in the same dtype and a float64 oracle."""
    op, torch_op = functools.partial(ops.activation, name=name), functools.partial(reference.activation, name=name)
    assert_close_to_references(op, torch_op, (a_NF,), grad_NF)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", GLU_SHAPES, ids=lambda shape: "x".join(map(str, shape)))
@pytest.mark.parametrize("name", GLU_KINDS + PLAIN)
def test_activation_forward_and_backward(
    name: str, shape: tuple[int, int], dtype: torch.dtype, generator: torch.Generator
) -> None:
    a_NF, b_NF, grad_NF = glu_inputs(shape, dtype, generator)
    if name in GLU_KINDS:
        assert_glu_close(a_NF, b_NF, grad_NF, name)
    else:
        assert_plain_close(a_NF, grad_NF, name)


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


@pytest.mark.parametrize("name", PLAIN)
def test_plain_activation_of_extreme_values(name: str) -> None:
    # Far tails, where erfc underflows, zeros and values either side of them.
    values = [-1e4, -40.0, -9.0, -5.5, -1e-30, 0.0, 1e-30, 5.5, 9.0, 40.0, 1e4]
    a_NF = torch.tensor(values * 3, device="cuda").view(3, -1)
    assert_plain_close(a_NF, torch.ones_like(a_NF), name)


@pytest.mark.parametrize("name", PLAIN)
def test_plain_activation_of_a_misaligned_view(name: str, generator: torch.Generator) -> None:
    a_NF, _, grad_NF = glu_inputs((300 * 65 + 1,), torch.bfloat16, generator)
    assert_plain_close(a_NF[1:].view(300, 65), grad_NF[1:].view(300, 65), name)


@pytest.mark.parametrize("name", PLAIN)
def test_plain_activation_is_the_same_on_every_run_and_does_not_sync(name: str, generator: torch.Generator) -> None:
    a_NF, _, grad_NF = glu_inputs((4096, 1408), torch.bfloat16, generator)
    a_NF.requires_grad_()

    def run() -> list[Tensor]:
        h_NF = ops.activation(a_NF, name)  # type: ignore[arg-type]
        return [h_NF, *torch.autograd.grad(h_NF, a_NF, grad_NF)]

    first = run()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        second = run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for one, other in zip(first, second, strict=True):
        assert torch.equal(one, other)


@pytest.mark.parametrize("name", [*GLU_KINDS, "gelu", "relu"])
def test_compiled_activation_matches_eager(name: str, generator: torch.Generator) -> None:
    a_NF, b_NF, grad_NF = glu_inputs((1000, 256), torch.bfloat16, generator)

    def activate(a: Tensor, b: Tensor) -> Tensor:
        return ops.glu(a, b, name) if name in GLU_KINDS else ops.activation(a, name)  # type: ignore[arg-type]

    compiled = torch.compile(activate, fullgraph=True)
    outputs = []
    for function in (activate, compiled):
        inputs = (a_NF.clone().requires_grad_(), b_NF.clone().requires_grad_())
        h_NF = function(*inputs)
        outputs.append([h_NF, *torch.autograd.grad(h_NF, inputs, grad_NF, allow_unused=True)])
    for eager, traced in zip(*outputs, strict=True):
        assert (eager is None and traced is None) or torch.equal(traced, eager)
