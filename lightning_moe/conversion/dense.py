"""Recognising the dense feed-forward blocks that :func:`~lightning_moe.conversion.moefy` replaces.

Shape legend: D model dim, F hidden dim.

Each recogniser looks at one module and, when it has a known shape, describes it as the expert
that computes the same function: ``w2 @ act(w1 @ x + b1) + b2``, or ``w2 @ (act(w1 @ x) * (w3 @ x))``
for gated blocks, which is exactly the form of :class:`~lightning_moe.layers.GroupedExperts`. The
description also knows how to put an MoE layer in the block's place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Our activation names, as the plain function each applies to ``w1 @ x``.
_PROBE_CANDIDATES: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
_GATED = {"silu": "swiglu", "gelu": "geglu"}

LOOKED_FOR = (
    "nn.Sequential(nn.Linear(D, F), <activation>, nn.Linear(F, D)[, nn.Dropout])",
    "GPT-2 style: a module with c_fc (Conv1D D->F), act, c_proj (Conv1D F->D) [, dropout]",
    "Llama/Mistral/Qwen2 style: a module with gate_proj, up_proj (Linear D->F), down_proj (Linear F->D), act_fn",
    "BERT style: a layer with intermediate.dense (Linear D->F) + intermediate_act_fn and output.dense (Linear F->D)",
)


@dataclass
class DenseFFN:
    """A dense feed-forward block, described as the MoE expert that computes the same function.

    Attributes:
        kind: "sequential", "gpt2", "llama", "bert", or "generic" (selected by ``target``,
            structure not recognised: no weights to copy).
        d_model: D.
        d_hidden: F.
        activation: The MoE activation name that reproduces the block, or ``None`` if none does.
        activation_found: The block's activation as found, for messages.
        w1: (F, D) first (for gated blocks: gate) projection; ``None`` for "generic".
        w2: (D, F) output projection.
        w3: (F, D) up projection of gated blocks, else ``None``.
        b1: (F,) or ``None``.
        b2: (D,) or ``None``.
        not_upcyclable: Why the weights cannot be copied into experts exactly, or ``None``.
        like: For "generic" blocks, a weight whose dtype and device the MoE takes.
        install: Puts an MoE layer in the block's place; returns the module that replaces the
            block in its parent (the block itself when the MoE went inside it).
    """

    kind: str
    d_model: int
    d_hidden: int
    activation: str | None
    activation_found: str
    install: Callable[[nn.Module], nn.Module]
    w1: Tensor | None = None
    w2: Tensor | None = None
    w3: Tensor | None = None
    b1: Tensor | None = None
    b2: Tensor | None = None
    not_upcyclable: str | None = None
    like: Tensor | None = None

    @property
    def bias(self) -> bool:
        return self.b1 is not None or self.b2 is not None

    @property
    def reference_weight(self) -> Tensor | None:
        """A weight of the block whose dtype and device the MoE takes."""
        return self.w1 if self.w1 is not None else self.like


def identify_activation(fn: Callable[[Tensor], Tensor]) -> str | None:
    """The name of the plain activation (``"gelu"``, ``"gelu_tanh"``, ``"relu"``, ``"silu"``) ``fn`` computes.

    Decided by evaluating ``fn`` on a grid of points, so any implementation (``nn.GELU``,
    ``F.silu``, Hugging Face's ``ACT2FN`` entries) is recognised by what it computes.

    Returns:
        The name, or ``None`` when ``fn`` is none of them or has parameters of its own.
    """
    if isinstance(fn, nn.Module) and any(True for _ in fn.parameters()):
        return None
    x = torch.linspace(-6.0, 6.0, 241, device="cpu")  # also under a meta default device
    try:
        with torch.no_grad():
            y = fn(x)
    except Exception:
        return None
    if not isinstance(y, Tensor) or y.shape != x.shape:
        return None
    for name, candidate in _PROBE_CANDIDATES.items():
        # gelu and its tanh approximation differ by up to 5e-4; float32 rounding stays near 1e-7.
        if torch.allclose(y.float(), candidate(x), rtol=0.0, atol=1e-5):
            return name
    return None


def gated_activation(plain: str | None) -> str | None:
    """The GLU activation whose gate applies ``plain`` ("silu" -> "swiglu", "gelu" -> "geglu")."""
    return _GATED.get(plain) if plain is not None else None


def recognise(module: nn.Module) -> DenseFFN | None:
    """Describe ``module`` if it is a dense feed-forward block of a known shape, else ``None``."""
    for recogniser in (_bert, _gpt2, _llama, _sequential):
        found = recogniser(module)
        if found is not None:
            return found
    return None


def _sequential(module: nn.Module) -> DenseFFN | None:
    """``nn.Sequential(Linear(D, F), act, Linear(F, D))``, optionally ending in a Dropout."""
    if not isinstance(module, nn.Sequential) or len(module) not in (3, 4):
        return None
    first, act, second, *rest = list(module)
    dropout = rest[0] if rest else None
    if not (isinstance(first, nn.Linear) and isinstance(second, nn.Linear)):
        return None
    if dropout is not None and not isinstance(dropout, nn.Dropout):
        return None
    return _linear_pair("sequential", first, act, second, _with_dropout(dropout))


def _linear_pair(
    kind: str, first: nn.Linear, act: Any, second: nn.Linear, install: Callable[[nn.Module], nn.Module]
) -> DenseFFN | None:
    """The block ``second(act(first(x)))``, if ``first`` maps D -> F and ``second`` maps F -> D."""
    if first.out_features != second.in_features or second.out_features != first.in_features:
        return None
    return DenseFFN(
        kind=kind,
        d_model=first.in_features,
        d_hidden=first.out_features,
        activation=identify_activation(act),
        activation_found=repr(act),
        install=install,
        w1=first.weight,
        w2=second.weight,
        b1=first.bias,
        b2=second.bias,
    )


def _gpt2(module: nn.Module) -> DenseFFN | None:
    """Hugging Face GPT-2's MLP: ``dropout(c_proj(act(c_fc(x))))`` with Conv1D weights stored (in, out)."""
    c_fc, c_proj, act = (getattr(module, name, None) for name in ("c_fc", "c_proj", "act"))
    if not (_is_conv1d(c_fc) and _is_conv1d(c_proj)) or act is None:
        return None
    d_model, d_hidden = c_fc.weight.shape
    if tuple(c_proj.weight.shape) != (d_hidden, d_model):
        return None
    dropout = getattr(module, "dropout", None)
    return DenseFFN(
        kind="gpt2",
        d_model=d_model,
        d_hidden=d_hidden,
        activation=identify_activation(act),
        activation_found=repr(act),
        install=_with_dropout(dropout if isinstance(dropout, nn.Dropout) else None),
        w1=c_fc.weight.t(),
        w2=c_proj.weight.t(),
        b1=c_fc.bias,
        b2=c_proj.bias,
    )


def _llama(module: nn.Module) -> DenseFFN | None:
    """Llama, Mistral, Qwen2 and Gemma MLPs: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``."""
    gate, up, down = (getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj"))
    act = getattr(module, "act_fn", None)
    if not (isinstance(gate, nn.Linear) and isinstance(up, nn.Linear) and isinstance(down, nn.Linear)) or act is None:
        return None
    if gate.weight.shape != up.weight.shape or down.weight.shape != gate.weight.t().shape:
        return None
    plain = identify_activation(act)
    d_hidden, d_model = gate.weight.shape
    return DenseFFN(
        kind="llama",
        d_model=d_model,
        d_hidden=d_hidden,
        activation=gated_activation(plain),
        activation_found=f"{act!r} gating up_proj",
        install=lambda moe: moe,
        w1=gate.weight,
        w2=down.weight,
        w3=up.weight,
        b1=gate.bias,
        b2=down.bias,
        not_upcyclable="its up_proj has a bias, which MoE's gated experts do not have" if up.bias is not None else None,
    )


def _bert(module: nn.Module) -> DenseFFN | None:
    """A BERT-style layer: ``intermediate`` (dense + act) feeding ``output`` (dense, dropout, residual, LayerNorm).

    The feed-forward block spans two sibling modules, and the layer calls
    ``output(intermediate(x), x)``. The MoE takes the place of ``intermediate`` and
    ``output.dense`` becomes an identity, so ``output`` still adds the residual and normalises.
    """
    intermediate, output = getattr(module, "intermediate", None), getattr(module, "output", None)
    first, second = getattr(intermediate, "dense", None), getattr(output, "dense", None)
    act = getattr(intermediate, "intermediate_act_fn", None)
    if not (isinstance(first, nn.Linear) and isinstance(second, nn.Linear)) or output is None or act is None:
        return None

    def install(moe: nn.Module) -> nn.Module:
        module.intermediate = moe
        output.dense = nn.Identity()
        return module

    return _linear_pair("bert", first, act, second, install)


class _Conv1D(Protocol):
    weight: Tensor  # (in_features, out_features)
    bias: Tensor | None


def _is_conv1d(module: object) -> TypeGuard[_Conv1D]:
    # transformers' Conv1D: a Linear whose weight is stored (in_features, out_features).
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(weight, Tensor) and weight.dim() == 2


def _with_dropout(dropout: nn.Dropout | None) -> Callable[[nn.Module], nn.Module]:
    """Install an MoE alone, or followed by the block's own trailing dropout."""
    if dropout is None:
        return lambda moe: moe
    return lambda moe: nn.Sequential(moe, dropout)
