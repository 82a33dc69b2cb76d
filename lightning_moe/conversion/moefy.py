"""``moefy``: replace the feed-forward blocks of any PyTorch model with MoE layers, in place.

FastMoE's ``fmoefy`` knew one model family (Megatron-LM) and needed a patch for each of its
releases. ``moefy`` instead recognises feed-forward blocks by their shape (see
:mod:`lightning_moe.conversion.dense`), so it works on plain PyTorch models and on Hugging Face
GPT-2, Llama/Mistral/Qwen2 and BERT-style models alike, and ``target`` selects anything else.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn

from lightning_moe.conversion.dense import LOOKED_FOR, DenseFFN, recognise
from lightning_moe.conversion.upcycle import copy_dense_into_experts, upcycling_mismatches
from lightning_moe.layers.moe import MoE
from lightning_moe.routers import Router

Target = Union[type, str, "re.Pattern[str]", Callable[[str, nn.Module], bool]]
_INFERRED = ("d_model", "num_experts", "top_k")


@dataclass(frozen=True)
class Replacement:
    """One feed-forward block that :func:`moefy` replaced.

    Attributes:
        name: Qualified name of the replaced block in the model.
        moe_name: Qualified name of the new MoE layer (``model.get_submodule(moe_name)``): the
            block's own name, or below it when the block keeps its dropout ("sequential", "gpt2")
            or its residual and norm ("bert").
        kind: The shape it matched: "sequential", "gpt2", "llama", "bert" or "generic"
            (selected by ``target``, not recognised, so a fresh MoE of the same width).
        d_model: D of the block and of the MoE layer.
        d_hidden: F of the MoE layer's experts.
        activation: The MoE layer's activation.
    """

    name: str
    moe_name: str
    kind: str
    d_model: int
    d_hidden: int
    activation: str


@dataclass
class MoefyReport:
    """What :func:`moefy` did: one :class:`Replacement` per block, in model order."""

    replacements: list[Replacement] = field(default_factory=list)
    upcycled: bool = False

    def __len__(self) -> int:
        return len(self.replacements)

    def __iter__(self) -> Iterator[Replacement]:
        return iter(self.replacements)

    def __str__(self) -> str:
        verb = "upcycled" if self.upcycled else "replaced"
        lines = [f"moefy {verb} {len(self)} feed-forward block(s):"]
        lines += [
            f"  {r.name} ({r.kind}) -> {r.moe_name}: d_model={r.d_model}, d_hidden={r.d_hidden}, {r.activation}"
            for r in self
        ]
        return "\n".join(lines)


def moefy(
    model: nn.Module,
    num_experts: int,
    top_k: int = 2,
    *,
    upcycle: bool = False,
    target: Target | None = None,
    **moe_kwargs: Any,
) -> MoefyReport:
    """Replace the feed-forward blocks of ``model`` with :class:`~lightning_moe.MoE` layers, in place.

    Each MoE layer keeps the block's width, hidden size, activation, bias, dtype and device, and
    its output has the block's shape. Call it on a model before creating its optimizer (in
    Lightning: in ``configure_model``).

    Args:
        model: The model; changed in place.
        num_experts: Routed experts E of every MoE layer.
        top_k: Experts per token K.
        upcycle: Start every expert as a copy of the dense block it replaces (sparse upcycling),
            so the model computes what it did before. Needs a recognised block.
        target: Which modules to replace. ``None``: every block of a recognised shape. A module
            class: its instances. A string: an ``fnmatch`` pattern on qualified names
            (``"h.*.mlp"``). A compiled regex: full match on qualified names. A callable
            ``(name, module) -> bool``. Selected modules of no recognised shape get a fresh MoE
            whose width is inferred from their first and last ``nn.Linear``.
        **moe_kwargs: Further :class:`~lightning_moe.MoE` arguments (``router``, ``capacity_factor``,
            ``aux_loss_weight``, ...). ``d_hidden``, ``activation`` and ``bias`` default to the block's.
            A ``Router`` instance is copied and re-initialised for every layer after the first.

    Returns:
        A :class:`MoefyReport` listing the replacements.

    Raises:
        ValueError: When nothing matched (the message lists the shapes looked for), or a block
            cannot be converted as asked.
    """
    for name in _INFERRED:
        if name in moe_kwargs:
            raise TypeError(f"moefy sets {name} itself; do not pass it in moe_kwargs.")
    if upcycle and moe_kwargs.get("experts") is not None:
        raise ValueError("upcycle=True copies the dense weights into the built-in experts; do not pass experts=.")
    selected = _selector(target)
    dense = recognise(model)
    if dense is not None and selected("", model):
        raise ValueError(
            f"The model itself is a feed-forward block ({dense.kind}); moefy replaces sub-modules in place. "
            "Use lightning_moe.MoE directly, or call moefy on the model that contains this block."
        )
    report = MoefyReport(upcycled=upcycle)
    routers = _RouterSupply(moe_kwargs.pop("router", "topk"))
    for parent, child_name, name, dense in list(_find_blocks(model, selected, explicit=target is not None)):
        moe = _build_moe(dense, num_experts, top_k, upcycle, routers.next(), moe_kwargs)
        replacement = dense.install(moe)
        setattr(parent, child_name, replacement)
        moe_name = next(f"{name}.{sub}".rstrip(".") for sub, m in replacement.named_modules() if m is moe)
        activation = getattr(moe.experts, "activation", "custom experts")
        report.replacements.append(Replacement(name, moe_name, dense.kind, dense.d_model, moe.d_hidden, activation))
        if upcycle and len(report) == 1:
            _warn_if_inexact(moe, on_meta=moe.router.weight.is_meta)
    if not report.replacements:
        raise ValueError(_nothing_matched_message(model, target))
    return report


def _selector(target: Target | None) -> Callable[[str, nn.Module], bool]:
    """Turn each accepted form of ``target`` into a ``(name, module) -> bool`` predicate."""
    if target is None:
        return lambda name, module: True
    if isinstance(target, type):
        return lambda name, module: isinstance(module, target)
    if isinstance(target, str):
        return lambda name, module: fnmatch.fnmatchcase(name, target)
    if isinstance(target, re.Pattern):
        return lambda name, module: target.fullmatch(name) is not None
    if callable(target):
        _check_predicate(target)
        return target
    raise TypeError(
        f"target must be a module class, a name pattern, a compiled regex or a callable (name, module) -> bool; "
        f"got {type(target).__name__}."
    )


def _check_predicate(predicate: Callable[..., bool]) -> None:
    try:
        parameters = inspect.signature(predicate).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: trust them
        return
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 and not any(p.kind == p.VAR_POSITIONAL for p in parameters):
        raise TypeError("A target predicate is called as predicate(name, module); give it both parameters.")


def _find_blocks(
    module: nn.Module, selected: Callable[[str, nn.Module], bool], explicit: bool, prefix: str = ""
) -> Iterator[tuple[nn.Module, str, str, DenseFFN]]:
    """Yield (parent, child name, qualified name, block) top-down; never look inside a block or an MoE."""
    for child_name, child in module.named_children():
        name = f"{prefix}{child_name}"
        if _is_sparse(child):
            continue
        if selected(name, child):
            dense = recognise(child)
            if dense is None and explicit:
                dense = _generic_block(name, child)
            if dense is not None:
                yield module, child_name, name, dense
                continue
        yield from _find_blocks(child, selected, explicit, prefix=f"{name}.")


def _is_sparse(module: nn.Module) -> bool:
    """An MoE layer, ours or another library's (a router ``gate`` beside ``experts``): its experts stay."""
    children = dict(module.named_children())
    return isinstance(module, MoE) or ("gate" in children and "experts" in children)


def _generic_block(name: str, module: nn.Module) -> DenseFFN:
    """A module selected by ``target`` whose structure is not recognised: only its width is known."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears or linears[0].in_features != linears[-1].out_features:
        raise ValueError(
            f"target selected {name!r} ({type(module).__name__}), which is not a recognised feed-forward block, and "
            "moefy could not infer its width: it needs an nn.Linear first and last with in_features == out_features. "
            "Select the feed-forward block itself with target=."
        )
    _check_single_tensor_interface(name, module, linears[0].in_features)
    return DenseFFN(
        kind="generic",
        d_model=linears[0].in_features,
        d_hidden=linears[0].out_features,
        activation=None,
        activation_found="unknown",
        install=lambda moe: moe,
        like=linears[0].weight,
        not_upcyclable=f"moefy does not know how {type(module).__name__} computes its output",
    )


def _check_single_tensor_interface(name: str, module: nn.Module, d_model: int) -> None:
    """MoE maps one (..., D) tensor to one of the same shape; refuse modules that do otherwise."""
    parameters = list(inspect.signature(module.forward).parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in parameters if p.default is p.empty and p.kind in positional]
    if len(required) > 1:
        raise ValueError(
            f"target selected {name!r} ({type(module).__name__}), whose forward takes {len(required)} arguments "
            f"({', '.join(p.name for p in required)}); an MoE layer takes one tensor (..., d_model). "
            "Select the feed-forward sub-module inside it instead."
        )
    was_training = module.training
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            weight = next(module.parameters())
            output = module.eval()(torch.zeros(1, d_model, dtype=weight.dtype, device=weight.device))
    except Exception:
        return  # it needs inputs we cannot make up; the shape check in MoE will still catch a wrong width
    finally:
        module.train(was_training)
    if not isinstance(output, torch.Tensor) or output.shape != (1, d_model):
        got = type(output).__name__ if not isinstance(output, torch.Tensor) else f"shape {tuple(output.shape)}"
        raise ValueError(
            f"target selected {name!r} ({type(module).__name__}), which returns {got} for a (1, {d_model}) input; "
            "an MoE layer returns one tensor of its input's shape. Select the feed-forward sub-module inside it."
        )


def _build_moe(
    dense: DenseFFN, num_experts: int, top_k: int, upcycle: bool, router: str | Router, moe_kwargs: dict[str, Any]
) -> MoE:
    """An MoE layer shaped like ``dense``, on its device and in its dtype; upcycled if asked."""
    kwargs = {"d_hidden": dense.d_hidden, "bias": dense.bias, **moe_kwargs, "router": router}
    kwargs.setdefault("activation", dense.activation or ("gelu" if dense.kind == "generic" else None))
    if kwargs["activation"] is None:
        raise ValueError(
            f"The {dense.kind} block's activation {dense.activation_found} is none of MoE's "
            "('gelu', 'gelu_tanh', 'relu', 'silu', 'swiglu', 'geglu'); pass activation= to choose one "
            "(the MoE layer will then compute a different function than the block)."
        )
    if upcycle:
        _check_upcyclable(dense, kwargs)
    # Built on the CPU whatever the default device (the layer draws its seed with .item(), which a
    # meta tensor cannot do), then moved to the block's device and dtype.
    with torch.device("cpu"):
        moe = MoE(dense.d_model, num_experts, top_k, **kwargs)
    weight = dense.reference_weight
    if weight is not None:
        moe.to(device=weight.device, dtype=weight.dtype)
    if upcycle:
        copy_dense_into_experts(moe, dense)
    return moe


def _check_upcyclable(dense: DenseFFN, kwargs: dict[str, Any]) -> None:
    if dense.not_upcyclable is not None:
        raise ValueError(f"upcycle=True cannot copy the {dense.kind} block: {dense.not_upcyclable}.")
    if dense.activation is None or kwargs["activation"] != dense.activation:
        raise ValueError(
            f"upcycle=True keeps the block's activation ({dense.activation_found}); "
            f"activation={kwargs['activation']!r} would change what the experts compute."
        )
    if kwargs["d_hidden"] != dense.d_hidden:
        raise ValueError(
            f"upcycle=True keeps the block's hidden size {dense.d_hidden}; got d_hidden={kwargs['d_hidden']}."
        )


def _warn_if_inexact(moe: MoE, on_meta: bool) -> None:
    if on_meta:
        warnings.warn(
            "upcycle=True on weights on the meta device copies nothing: they hold no values yet. Upcycle after "
            "the dense weights are materialised and loaded, or load an upcycled checkpoint.",
            stacklevel=3,
        )
    reasons = upcycling_mismatches(moe)
    if reasons:
        warnings.warn(
            "The upcycled model will not compute exactly what the dense model did, because "
            + "; ".join(reasons)
            + ". Use router='topk' (normalised) without capacity_factor or shared experts for an exact start.",
            stacklevel=3,
        )


class _RouterSupply:
    """Hands each new layer its router: a name as is, an instance first itself, then fresh copies."""

    def __init__(self, router: str | Router) -> None:
        self.router = router
        self.handed_out = 0

    def next(self) -> str | Router:
        self.handed_out += 1
        if isinstance(self.router, str) or self.handed_out == 1:
            return self.router
        fresh = copy.deepcopy(self.router)
        fresh.reset_parameters()
        return fresh


def _nothing_matched_message(model: nn.Module, target: Target | None) -> str:
    existing = sum(isinstance(m, MoE) for m in model.modules())
    lines = [f"moefy found no feed-forward block to replace in {type(model).__name__}."]
    if target is None:
        lines += ["It looks for these shapes (D model dim, F hidden dim):"]
        lines += [f"  - {shape}" for shape in LOOKED_FOR]
        lines += [
            "Pass target= to choose the blocks yourself: a module class (target=MyFeedForward), a name pattern "
            "(target='layers.*.ffn'), a compiled regex, or a predicate (target=lambda name, module: ...)."
        ]
    else:
        names = [name for name, _ in model.named_modules() if name][:12]
        lines += [f"target={target!r} selected no module. Module names look like: {', '.join(names)}."]
    if existing:
        lines += [
            f"The model already holds {existing} MoE layer(s): was moefy called on it before? In configure_model, "
            "return early when the model already has MoE layers."
        ]
    return "\n".join(lines)
