"""Hugging Face Mixtral-style sparse MoE blocks in and out of :class:`~lightning_moe.MoE`.

Shape legend: E experts, D model dim, F expert hidden, Fs shared-expert hidden.

A Mixtral-style block has a router ``gate`` with a weight (E, D), softmax top-k routing, and
gated (SwiGLU) experts. transformers 5 stores the experts fused, ``experts.gate_up_proj``
(E, 2F, D) holding gate then up, and ``experts.down_proj`` (E, D, F); transformers 4 kept a
``ModuleList`` of experts with ``w1``/``w3``/``w2`` (Mixtral) or ``gate_proj``/``up_proj``/
``down_proj`` (Qwen2-MoE) linears. Both layouts are read and written. transformers itself is
not imported: the blocks are read through their attributes.

Qwen2-MoE adds a shared expert whose output each token scales by ``sigmoid(x @ g)``. ``MoE``'s
shared experts are ungated and as wide as the routed ones, so such a block loads as a
:class:`GatedSharedExpertMoE`, an MoE plus that gated shared expert, which computes exactly what
the block does. ``routed_only=True`` loads the router and routed experts alone instead.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_moe.conversion.dense import gated_activation, identify_activation
from lightning_moe.layers.experts import GroupedExperts
from lightning_moe.layers.moe import MoE
from lightning_moe.routers import TopKRouter

_ROUTED_PARTS = {"gate", "experts"}
_SHARED_PARTS = {"shared_expert", "shared_expert_gate"}


class GatedSharedExpertMoE(nn.Module):
    """An MoE layer plus a shared expert gated per token (Qwen2-MoE): ``moe(x) + sigmoid(x @ g) * shared(x)``.

    Args:
        moe: The routed part.
        d_hidden_shared: Hidden size Fs of the shared expert.
        activation: Its activation ("swiglu" for Qwen2-MoE).
    """

    def __init__(self, moe: MoE, d_hidden_shared: int, activation: str = "swiglu") -> None:
        super().__init__()
        self.moe = moe
        self.shared_expert = GroupedExperts(1, moe.d_model, d_hidden_shared, activation)
        self.shared_expert_gate = nn.Linear(moe.d_model, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D)."""
        shared = self.shared_expert.expert_forward(0, x.reshape(-1, x.shape[-1])).reshape(x.shape)
        return self.moe(x) + torch.sigmoid(self.shared_expert_gate(x)) * shared


@dataclass
class _ExpertWeights:
    w1: Tensor  # (E, F, D) gate
    w3: Tensor  # (E, F, D) up
    w2: Tensor  # (E, D, F) down
    activation: str


def from_hf_sparse_block(
    block: nn.Module, *, routed_only: bool = False, normalize: bool | None = None, **moe_kwargs: Any
) -> MoE | GatedSharedExpertMoE:
    """Build an MoE layer holding the router and expert weights of a Hugging Face sparse MoE block.

    Args:
        block: A ``MixtralSparseMoeBlock``, ``Qwen2MoeSparseMoeBlock`` or a block of the same layout.
        routed_only: Load only the router and routed experts of a block that also has a shared
            expert; the result then lacks the shared expert's contribution.
        normalize: Whether the block renormalises its top-k weights. Read from the block
            (``norm_topk_prob``; always for Mixtral); needed only for blocks that do not say.
        **moe_kwargs: Further :class:`~lightning_moe.MoE` arguments (``aux_loss_weight``,
            ``z_loss_weight``, ``capacity_factor``: leave it ``None`` to stay dropless like the block).

    Returns:
        The MoE layer, on the block's device and in its dtype; for a block with a gated shared
        expert (unless ``routed_only``), a :class:`GatedSharedExpertMoE`.
    """
    has_shared = _check_parts(block, routed_only)
    weights = _read_experts(cast(nn.Module, block.experts))
    router_weight = _router_weight(block)
    num_experts, d_hidden, d_model = weights.w1.shape
    normalize = _normalization(block, normalize)
    top_k = _top_k(block)
    if getattr(block, "jitter_noise", 0.0):
        warnings.warn("The block multiplies its input by random jitter in training; MoE does not.", stacklevel=2)
    with torch.device("cpu"):
        router = TopKRouter(d_model, num_experts, top_k, normalize=normalize)
        moe = MoE(d_model, num_experts, top_k, d_hidden, weights.activation, router=router, **moe_kwargs)
    moe.to(device=router_weight.device, dtype=router_weight.dtype)
    with torch.no_grad():
        moe.router.weight.copy_(router_weight)
        for name in ("w1", "w2", "w3"):
            getattr(moe.experts, name).copy_(getattr(weights, name))
    if not has_shared or routed_only:
        return moe
    return _with_shared_expert(moe, block)


def to_hf_sparse_block(layer: MoE | GatedSharedExpertMoE, block: nn.Module, *, routed_only: bool = False) -> nn.Module:
    """Write the router and expert weights of ``layer`` into the Hugging Face sparse block ``block``.

    Args:
        layer: A layer as made by :func:`from_hf_sparse_block` (built-in SwiGLU/GeGLU experts
            without bias, a top-k router).
        block: A block of the same shape, e.g. fresh from the model's config; changed in place.
        routed_only: Write only the router and routed experts into a block with a shared expert.

    Returns:
        ``block``.
    """
    gated = isinstance(layer, GatedSharedExpertMoE)
    moe = layer.moe if isinstance(layer, GatedSharedExpertMoE) else layer
    has_shared = _check_parts(block, routed_only)
    if has_shared != gated and not routed_only:
        which = ("block", "layer") if has_shared else ("layer", "block")
        raise ValueError(
            f"The {which[0]} has a gated shared expert and the {which[1]} has none; pass routed_only=True to write "
            "the router and routed experts only."
        )
    experts = _check_exportable(moe, block)
    with torch.no_grad():
        _router_weight(block).copy_(moe.router.weight)
        _write_experts(cast(nn.Module, block.experts), experts.w1, experts.w3, experts.w2)
        if isinstance(layer, GatedSharedExpertMoE) and not routed_only:
            shared = layer.shared_expert
            if shared.w3 is None:
                raise ValueError("Only a gated shared expert (activation 'swiglu' or 'geglu') can be exported.")
            _write_linear_mlp(cast(nn.Module, block.shared_expert), shared.w1[0], shared.w3[0], shared.w2[0])
            cast(nn.Linear, block.shared_expert_gate).weight.copy_(layer.shared_expert_gate.weight)
    return block


def _check_parts(block: nn.Module, routed_only: bool) -> bool:
    """Refuse blocks whose outputs depend on parameters this module would ignore.

    Returns:
        Whether the block has a gated shared expert (``shared_expert`` and ``shared_expert_gate``).
    """
    for part in _ROUTED_PARTS:
        if getattr(block, part, None) is None:
            raise ValueError(f"{type(block).__name__} has no `{part}`; expected a Mixtral-style sparse MoE block.")
    children = {name for name, child in block.named_children() if any(True for _ in child.parameters())}
    has_shared = _SHARED_PARTS <= children
    unknown = sorted(children - _ROUTED_PARTS - (_SHARED_PARTS if has_shared else set()))
    if unknown and not routed_only:
        raise ValueError(
            f"{type(block).__name__} has parameters in {unknown}, which MoE cannot reproduce; its outputs would "
            "differ. Pass routed_only=True to move only the router and routed experts."
        )
    gate = cast(nn.Module, block.gate)
    extra = sorted({name for name, _ in gate.named_parameters()} - {"weight"})
    if extra or any(True for _ in gate.buffers()):
        raise ValueError(
            f"The router {type(block.gate).__name__} holds more than a weight (parameters {extra}, or buffers): "
            "it routes differently from softmax top-k, so MoE cannot reproduce it."
        )
    return has_shared


def _read_experts(experts: nn.Module) -> _ExpertWeights:
    if isinstance(experts, nn.ModuleList):
        w1, w3, w2 = zip(*(_linear_mlp_weights(expert) for expert in experts), strict=True)
        return _ExpertWeights(torch.stack(w1), torch.stack(w3), torch.stack(w2), _glu_activation(experts[0]))
    gate_up, down = _fused_weights(experts)
    if getattr(experts, "is_transposed", False):  # stored (E, D, 2F) and (E, F, D)
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    if getattr(experts, "is_concatenated", True):
        gate, up = gate_up.chunk(2, dim=1)
    else:  # interleaved rows: gate_0, up_0, gate_1, up_1, ...
        gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
    return _ExpertWeights(gate, up, down, _glu_activation(experts))


def _write_experts(experts: nn.Module, w1_EFD: Tensor, w3_EFD: Tensor, w2_EDF: Tensor) -> None:
    if isinstance(experts, nn.ModuleList):
        if len(experts) != w1_EFD.shape[0]:
            raise ValueError(f"The block has {len(experts)} experts and the layer {w1_EFD.shape[0]}.")
        for e, expert in enumerate(experts):
            _write_linear_mlp(expert, w1_EFD[e], w3_EFD[e], w2_EDF[e])
        return
    stored_gate_up, stored_down = _fused_weights(experts)
    if getattr(experts, "is_concatenated", True):
        gate_up = torch.cat([w1_EFD, w3_EFD], dim=1)
    else:
        gate_up = torch.stack([w1_EFD, w3_EFD], dim=2).flatten(1, 2)
    down = w2_EDF
    if getattr(experts, "is_transposed", False):
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    _copy_checked(stored_gate_up, gate_up, "experts.gate_up_proj")
    _copy_checked(stored_down, down, "experts.down_proj")


def _fused_weights(experts: nn.Module) -> tuple[Tensor, Tensor]:
    """``(gate_up_proj, down_proj)`` of fused experts as stored, once their layout is one MoE can reproduce."""
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gate_up, Tensor) or not isinstance(down, Tensor):
        raise ValueError(
            f"{type(experts).__name__} is neither a ModuleList of experts nor fused gate_up_proj / down_proj."
        )
    apply_gate = getattr(type(experts), "_apply_gate", None)
    custom_gate = apply_gate is not None and apply_gate.__name__ != "_default_apply_gate"
    if getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True) or custom_gate:
        raise ValueError(
            f"{type(experts).__name__} uses expert biases or a custom gating function; MoE's experts compute "
            "w2 @ (act(w1 @ x) * (w3 @ x)) without bias and cannot reproduce it."
        )
    return gate_up, down


def _linear_mlp_weights(expert: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """(gate, up, down) weights of one transformers-4 expert module."""
    for names in (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj")):
        gate, up, down = (getattr(expert, name, None) for name in names)
        if isinstance(gate, nn.Linear) and isinstance(up, nn.Linear) and isinstance(down, nn.Linear):
            if any(linear.bias is not None for linear in (gate, up, down)):
                raise ValueError(f"{type(expert).__name__} has biases; MoE's gated experts have none.")
            return gate.weight, up.weight, down.weight
    raise ValueError(f"{type(expert).__name__} has neither w1/w3/w2 nor gate_proj/up_proj/down_proj linears.")


def _write_linear_mlp(expert: nn.Module, w1_FD: Tensor, w3_FD: Tensor, w2_DF: Tensor) -> None:
    mixtral_names = isinstance(getattr(expert, "w1", None), nn.Linear)
    names = ("w1", "w3", "w2") if mixtral_names else ("gate_proj", "up_proj", "down_proj")
    for name, weight in zip(names, (w1_FD, w3_FD, w2_DF), strict=True):
        _copy_checked(getattr(expert, name).weight, weight, name)


def _glu_activation(module: nn.Module) -> str:
    act = getattr(module, "act_fn", None)
    name = gated_activation(identify_activation(act)) if act is not None else None
    if name is None:
        raise ValueError(f"{type(module).__name__} gates with {act!r}; MoE supports SiLU (swiglu) and GELU (geglu).")
    return name


def _router_weight(block: nn.Module) -> Tensor:
    weight = getattr(block.gate, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"The router {type(block.gate).__name__} has no (E, D) weight.")
    return weight


def _normalization(block: nn.Module, normalize: bool | None) -> bool:
    """Whether the block renormalises its top-k weights: its own word, else the caller's."""
    declared = _declared_normalization(block)
    if declared is not None and normalize is not None and declared != normalize:
        raise ValueError(f"normalize={normalize} contradicts the block, which renormalises: {declared}.")
    if declared is None and normalize is None:
        raise ValueError(
            f"Cannot tell whether {type(block).__name__} renormalises its top-k weights; pass normalize=True "
            "(Mixtral style) or normalize=False (Qwen2-MoE without norm_topk_prob)."
        )
    return declared if declared is not None else bool(normalize)


def _declared_normalization(block: nn.Module) -> bool | None:
    declared = getattr(block.gate, "norm_topk_prob", getattr(block, "norm_topk_prob", None))
    if declared is None and type(block).__name__.startswith("Mixtral"):
        return True  # Mixtral always renormalises and has no flag for it
    return None if declared is None else bool(declared)


def _top_k(block: nn.Module) -> int:
    for owner in (block.gate, block):
        for name in ("top_k", "num_experts_per_tok"):
            value = getattr(owner, name, None)
            if isinstance(value, int):
                return value
    raise ValueError(f"Cannot find top_k on {type(block).__name__} or its gate.")


def _with_shared_expert(moe: MoE, block: nn.Module) -> GatedSharedExpertMoE:
    shared_expert = cast(nn.Module, block.shared_expert)
    w1, w3, w2 = _linear_mlp_weights(shared_expert)
    with torch.device("cpu"):
        layer = GatedSharedExpertMoE(moe, w1.shape[0], _glu_activation(shared_expert))
    layer.to(device=w1.device, dtype=w1.dtype)
    with torch.no_grad():
        for name, weight in (("w1", w1), ("w3", w3), ("w2", w2)):
            getattr(layer.shared_expert, name)[0].copy_(weight)
        shared_gate = cast(nn.Linear, block.shared_expert_gate)
        _copy_checked(layer.shared_expert_gate.weight, shared_gate.weight, "shared_expert_gate")
    return layer


def _check_exportable(moe: MoE, block: nn.Module) -> _ExpertWeights:
    """The layer's expert weights, once the block is known to compute what the layer does."""
    experts, router = moe.experts, moe.router
    if not isinstance(experts, GroupedExperts) or experts.w3 is None or experts.b1 is not None:
        raise ValueError("Only built-in gated experts without bias (activation 'swiglu' or 'geglu') can be exported.")
    if not isinstance(router, TopKRouter):
        raise ValueError(f"The block routes by softmax top-k; the layer's {type(router).__name__} routes differently.")
    target = _read_experts(cast(nn.Module, block.experts))
    if target.activation != experts.activation:
        raise ValueError(f"The block's experts use {target.activation}, the layer's {experts.activation}.")
    if _top_k(block) != moe.top_k:
        raise ValueError(f"The block routes to top_k={_top_k(block)} experts, the layer to {moe.top_k}.")
    declared = _declared_normalization(block)
    if declared is not None and declared != router.normalize:
        raise ValueError(f"The block renormalises its top-k weights: {declared}; the layer: {router.normalize}.")
    return _ExpertWeights(experts.w1, experts.w3, experts.w2, experts.activation)


def _copy_checked(destination: Tensor, source: Tensor, name: str) -> None:
    if destination.shape != source.shape:
        raise ValueError(f"{name}: the block holds shape {tuple(destination.shape)}, the layer {tuple(source.shape)}.")
    with torch.no_grad():
        destination.copy_(source)
