"""Expert activations by name.

The GLU variants ("swiglu", "geglu") gate one projection with another: ``act(w1 x) * (w3 x)``,
so experts that use them carry a third weight ``w3``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch.nn.functional as F
from torch import Tensor

Activation = Literal["gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu"]
ACTIVATIONS: tuple[str, ...] = get_args(Activation)
GLU_ACTIVATIONS: frozenset[str] = frozenset({"swiglu", "geglu"})

_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swiglu": F.silu,
    "geglu": F.gelu,
}


def check_activation(name: str) -> None:
    """Raise a ``ValueError`` naming the choices when ``name`` is not a known activation."""
    if name not in _FUNCTIONS:
        raise ValueError(f"Unknown activation {name!r}; choose one of {', '.join(map(repr, ACTIVATIONS))}.")


def activation_function(name: str) -> Callable[[Tensor], Tensor]:
    """The elementwise function applied to ``w1 x`` (for GLUs, the gate) for activation ``name``."""
    check_activation(name)
    return _FUNCTIONS[name]


def is_glu(name: str) -> bool:
    """Whether activation ``name`` gates with a third projection ``w3``."""
    return name in GLU_ACTIVATIONS
