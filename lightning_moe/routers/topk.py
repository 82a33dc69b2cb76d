"""Softmax top-k routing (Mixtral, Qwen2-MoE; FastMoE's NaiveGate).

Shape legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

from torch import Tensor

from lightning_moe.routers.base import Router, Routing, routing_from_topk_route


class TopKRouter(Router):
    """Float32 softmax over all experts, then the k most probable.

    With ``normalize=True`` (Mixtral) the k weights are renormalised to sum to 1, which equals a
    softmax over the k picked logits (FastMoE's NaiveGate). With ``normalize=False`` (Qwen2-MoE)
    the raw probabilities are kept. The balance loss is the Switch form ``E * sum_e f_e P_e``.
    Scoring, top-k and the loss sums run as one fused op, :func:`lightning_moe.ops.topk_route`
    (CUDA kernels on the GPU); experts with equal probability go to the larger logit, then to the
    lower index.

    Args:
        d_model: Model dimension D.
        num_experts: Number of experts E.
        top_k: Experts per token K.
        normalize: Renormalise the k weights to sum to 1.
    """

    single_expert_weight_is_one = True  # a softmax over one expert

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, normalize: bool = True) -> None:
        super().__init__(d_model, num_experts, top_k)
        self.normalize = normalize

    def route(self, x_TD: Tensor) -> Routing:
        route = self.route_topk(x_TD, "softmax", self.normalize)
        return routing_from_topk_route(route)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, normalize={self.normalize}"
