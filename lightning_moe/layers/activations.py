"""Expert activations by name.

The GLU variants ("swiglu", "geglu") gate one projection with another: ``act(w1 x) * (w3 x)``,
so experts that use them carry a third weight ``w3``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

from torch import Tensor

from lightning_moe.ops import reference

Activation = Literal["gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu"]
ACTIVATIONS: tuple[str, ...] = get_args(Activation)
GLU_ACTIVATIONS: frozenset[str] = frozenset({"swiglu", "geglu"})


def check_activation(name: str) -> None:
    """Raise a ``ValueError`` naming the choices when ``name`` is not a known activation."""
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; choose one of {', '.join(map(repr, ACTIVATIONS))}.")


def activation_function(name: str) -> Callable[[Tensor], Tensor]:
    """The elementwise function applied to ``w1 x`` (for GLUs, the gate) for activation ``name``."""
    check_activation(name)
    return reference.PLAIN_ACTIVATIONS[reference.GLU_GATES.get(name, name)]


def is_glu(name: str) -> bool:
    """Whether activation ``name`` gates with a third projection ``w3``."""
    return name in GLU_ACTIVATIONS
