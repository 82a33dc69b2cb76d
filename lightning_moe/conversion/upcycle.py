"""Sparse upcycling (Komatsuzaki et al. 2022, *Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints*).

Every expert starts as a copy of the dense block it replaces. When the router's weights of each
token sum to 1 and nothing is dropped, every token's output is then ``sum_k w_k * dense(x) =
dense(x)``: the upcycled model computes what the dense model did, whatever the router's (random)
initial weights. Training then moves the experts apart, because each sees different tokens.
"""

from __future__ import annotations

import torch

from lightning_moe.conversion.dense import DenseFFN
from lightning_moe.layers.experts import GroupedExperts
from lightning_moe.layers.moe import MoE
from lightning_moe.routers import ExpertChoiceRouter, GShardRouter, SwitchRouter, TopKRouter


@torch.no_grad()
def copy_dense_into_experts(moe: MoE, dense: DenseFFN) -> None:
    """Make every routed expert of ``moe`` a copy of the dense block ``dense``.

    Args:
        moe: A layer with built-in experts of the block's D, F, activation and (at least) bias.
        dense: The recognised dense block.

    Raises:
        ValueError: If the block's weights cannot be reproduced by the layer's experts.
    """
    experts = moe.experts
    if not isinstance(experts, GroupedExperts):
        raise ValueError("upcycle=True copies the dense weights into the built-in experts; do not pass experts=.")
    if dense.not_upcyclable is not None:
        raise ValueError(f"Cannot upcycle this {dense.kind} block: {dense.not_upcyclable}.")
    if (experts.d_model, experts.d_hidden) != (dense.d_model, dense.d_hidden):
        raise ValueError(
            f"upcycle=True needs experts of the dense block's shape (d_model={dense.d_model}, "
            f"d_hidden={dense.d_hidden}), got d_model={experts.d_model}, d_hidden={experts.d_hidden}; "
            "do not pass a different d_hidden."
        )
    if dense.bias and experts.b1 is None:
        raise ValueError("The dense block has biases; upcycle=True needs bias=True (the default for such blocks).")
    assert dense.w1 is not None and dense.w2 is not None
    pairs = [(experts.w1, dense.w1), (experts.w2, dense.w2), (experts.w3, dense.w3)]
    pairs += [(experts.b1, dense.b1), (experts.b2, dense.b2)]
    for stacked, weight in pairs:
        if stacked is None:
            continue
        if weight is None:  # a bias the dense block lacks on one side
            stacked.zero_()
        else:
            stacked.copy_(weight.detach().to(stacked.dtype).unsqueeze(0).expand_as(stacked))


def upcycling_mismatches(moe: MoE) -> list[str]:
    """Settings of ``moe`` under which the upcycled layer does not reproduce the dense block at step 0."""
    reasons = []
    router = moe.router
    if isinstance(router, TopKRouter) and not router.normalize:
        reasons.append("the top-k router does not renormalise its weights (normalize=False)")
    if isinstance(router, SwitchRouter):
        reasons.append("the Switch router weights each token's expert by its probability, which is below 1")
    if isinstance(router, GShardRouter):
        reasons.append("the GShard router drops second experts at random in training")
    if isinstance(router, ExpertChoiceRouter):
        reasons.append("with expert choice some tokens get no expert")
    if moe.capacity_factor is not None and not isinstance(router, ExpertChoiceRouter):
        reasons.append(f"capacity_factor={moe.capacity_factor} drops assignments beyond capacity")
    if moe.shared_experts is not None:
        reasons.append("the shared experts add their output to the copied block's")
    return reasons
