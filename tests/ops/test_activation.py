"""The activation ops' references (plain and GLU) against float64 elementwise oracles, their
gradients, and their wrappers on the CPU. The kernels themselves are checked on a GPU, in
tests/ops/test_activation_cuda.py.

Shape legend: N rows, F expert hidden.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from torch import Tensor

from lightning_moe import ops
from lightning_moe.layers.activations import activation_function
from lightning_moe.ops import reference

# The module, not the function of the same name that lightning_moe.ops exports.
activation_module = importlib.import_module("lightning_moe.ops.activation")

KINDS = ["swiglu", "geglu"]
PLAIN = ["gelu", "gelu_tanh", "relu", "silu"]


def oracle_activation(value: float, name: str) -> float:
    """One activation of one float64 value, from its definition."""
    if name == "gelu":
        return 0.5 * value * (1 + math.erf(value / math.sqrt(2)))
    if name == "gelu_tanh":
        inner = math.sqrt(2 / math.pi) * (value + 0.044715 * value**3)
        return 0.5 * value * (1 + math.tanh(inner))
    if name == "relu":
        return max(value, 0.0)
    return value / (1 + math.exp(-value))


def oracle_glu(a_NF: Tensor, b_NF: Tensor, kind: str) -> Tensor:
    """``act(a) * b`` one float64 element at a time, from the definitions of SiLU and the erf GELU."""
    values = []
    for a, b in zip(a_NF.double().flatten().tolist(), b_NF.double().flatten().tolist(), strict=True):
        values.append(oracle_activation(a, "silu" if kind == "swiglu" else "gelu") * b)
    return torch.tensor(values, dtype=torch.float64).view(a_NF.shape)


def glu_inputs(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Pre-activations spread over the gates' curved range, and gate values."""
    a_NF = 3 * torch.randn(shape, generator=generator, dtype=torch.float64)
    b_NF = torch.randn(shape, generator=generator, dtype=torch.float64)
    return a_NF.to(dtype), b_NF.to(dtype)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(0, 8), (1, 1), (37, 13)], ids=["empty", "one", "odd"])
def test_reference_matches_the_oracle(kind: str, shape: tuple[int, int], generator: torch.Generator) -> None:
    a_NF, b_NF = glu_inputs(shape, torch.float64, generator)
    torch.testing.assert_close(reference.glu(a_NF, b_NF, kind), oracle_glu(a_NF, b_NF, kind), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_reference_gates_like_the_activation_of_that_name(kind: str, generator: torch.Generator) -> None:
    a_NF, b_NF = glu_inputs((16, 24), torch.float32, generator)
    assert torch.equal(reference.glu(a_NF, b_NF, kind), activation_function(kind)(a_NF) * b_NF)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_of_the_reference(kind: str, generator: torch.Generator) -> None:
    a_NF, b_NF = (t.requires_grad_() for t in glu_inputs((7, 5), torch.float64, generator))
    assert torch.autograd.gradcheck(lambda a, b: ops.glu(a, b, kind), (a_NF, b_NF))  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", KINDS)
def test_the_op_takes_the_reference_on_the_cpu(kind: str, generator: torch.Generator) -> None:
    a_NF, b_NF = glu_inputs((9, 40), torch.bfloat16, generator)
    strided_a = torch.stack([a_NF, -a_NF], dim=-1)[..., 0]  # every other element: not contiguous
    assert not strided_a.is_contiguous()
    assert torch.equal(ops.glu(a_NF, b_NF, kind), reference.glu(a_NF, b_NF, kind))  # type: ignore[arg-type]
    assert torch.equal(ops.glu(strided_a, b_NF, kind), reference.glu(strided_a, b_NF, kind))  # type: ignore[arg-type]


def test_the_op_names_the_fix_for_wrong_arguments() -> None:
    a_NF = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="'swiglu', 'geglu'"):
        ops.glu(a_NF, a_NF, "reglu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"one shape, got \(3, 4\) and \(4, 3\)"):
        ops.glu(a_NF, a_NF.t(), "swiglu")


def test_glu_kinds_are_the_glu_activations() -> None:
    from lightning_moe.layers.activations import GLU_ACTIVATIONS

    assert set(activation_module.GLU_KINDS) == GLU_ACTIVATIONS


@pytest.mark.parametrize("name", PLAIN)
@pytest.mark.parametrize("shape", [(0, 8), (1, 1), (37, 13)], ids=["empty", "one", "odd"])
def test_plain_reference_matches_the_oracle(name: str, shape: tuple[int, int], generator: torch.Generator) -> None:
    a_NF, _ = glu_inputs(shape, torch.float64, generator)
    expected = torch.tensor([oracle_activation(a, name) for a in a_NF.flatten().tolist()], dtype=torch.float64)
    torch.testing.assert_close(reference.activation(a_NF, name), expected.view(shape), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", PLAIN)
def test_plain_op_is_the_activation_of_that_name_on_the_cpu(name: str, generator: torch.Generator) -> None:
    a_NF, _ = glu_inputs((9, 40), torch.bfloat16, generator)
    a_NF.requires_grad_()
    expected = activation_function(name)(a_NF)
    got = ops.activation(a_NF, name)  # type: ignore[arg-type]
    assert torch.equal(got, expected)
    grad_NF = torch.randn_like(a_NF)
    assert torch.equal(torch.autograd.grad(got, a_NF, grad_NF)[0], torch.autograd.grad(expected, a_NF, grad_NF)[0])


def test_plain_op_names_the_fix_for_a_wrong_name() -> None:
    with pytest.raises(ValueError, match="'gelu', 'gelu_tanh', 'relu', 'silu'"):
        ops.activation(torch.zeros(3), "swiglu")  # type: ignore[arg-type]


def test_plain_kernel_activations_are_the_non_glu_activations() -> None:
    from lightning_moe.layers.activations import ACTIVATIONS, GLU_ACTIVATIONS

    assert set(activation_module.KERNEL_ACTIVATIONS) == set(ACTIVATIONS) - GLU_ACTIVATIONS
