"""Routers: every scheme maps tokens to (token, expert, weight) assignments.

=================  =====================================================================
name               scheme
=================  =====================================================================
``topk``           softmax top-k, optionally renormalised (Mixtral, Qwen2-MoE)
``noisy_topk``     noisy top-k gating with importance + load loss (Shazeer et al. 2017)
``switch``         top-1 with multiplicative jitter (Fedus et al. 2021)
``gshard``         top-2 with random routing of the second expert (Lepikhin et al. 2020)
``sigmoid``        sigmoid scores with an aux-loss-free balance bias (DeepSeek-V3)
``expert_choice``  each expert picks its top-C tokens (Zhou et al. 2022)
=================  =====================================================================
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from lightning_moe.routers.base import Router, Routing
from lightning_moe.routers.expert_choice import ExpertChoiceRouter
from lightning_moe.routers.gshard import GShardRouter
from lightning_moe.routers.noisy_topk import NoisyTopKRouter
from lightning_moe.routers.sigmoid import SigmoidRouter
from lightning_moe.routers.switch import SwitchRouter
from lightning_moe.routers.topk import TopKRouter

RouterName = Literal["topk", "noisy_topk", "switch", "gshard", "sigmoid", "expert_choice"]

ROUTERS: dict[str, type[Router]] = {
    "topk": TopKRouter,
    "noisy_topk": NoisyTopKRouter,
    "switch": SwitchRouter,
    "gshard": GShardRouter,
    "sigmoid": SigmoidRouter,
    "expert_choice": ExpertChoiceRouter,
}
assert tuple(ROUTERS) == get_args(RouterName)


def build_router(name: str, d_model: int, num_experts: int, top_k: int, **kwargs: Any) -> Router:
    """Build the router registered under ``name``; ``kwargs`` go to its constructor."""
    if name not in ROUTERS:
        raise ValueError(f"Unknown router {name!r}; choose one of {', '.join(map(repr, ROUTERS))} or pass a Router.")
    return ROUTERS[name](d_model, num_experts, top_k, **kwargs)


__all__ = [
    "ROUTERS",
    "ExpertChoiceRouter",
    "GShardRouter",
    "NoisyTopKRouter",
    "Router",
    "RouterName",
    "Routing",
    "SigmoidRouter",
    "SwitchRouter",
    "TopKRouter",
    "build_router",
]
