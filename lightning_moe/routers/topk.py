"""Softmax top-k routing (Mixtral, Qwen2-MoE; FastMoE's NaiveGate).

Shape legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_moe.routers.base import Router, Routing, switch_balance_loss, token_choice_routing, z_loss_of


class TopKRouter(Router):
    """Float32 softmax over all experts, then the k most probable.

    With ``normalize=True`` (Mixtral) the k weights are renormalised to sum to 1, which equals a
    softmax over the k picked logits (FastMoE's NaiveGate). With ``normalize=False`` (Qwen2-MoE)
    the raw probabilities are kept. The balance loss is the Switch form ``E * sum_e f_e P_e``.

    Args:
        d_model: Model dimension D.
        num_experts: Number of experts E.
        top_k: Experts per token K.
        normalize: Renormalise the k weights to sum to 1.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, normalize: bool = True) -> None:
        super().__init__(d_model, num_experts, top_k)
        self.normalize = normalize

    def route(self, x_TD: Tensor) -> Routing:
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        probs_TK, expert_ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        weights_TK = probs_TK / probs_TK.sum(dim=-1, keepdim=True) if self.normalize else probs_TK
        return token_choice_routing(
            expert_ids_TK,
            weights_TK,
            priorities_TK=probs_TK.detach(),
            aux_loss=switch_balance_loss(probs_TE, expert_ids_TK.reshape(-1), self.num_experts),
            z_loss=z_loss_of(logits_TE),
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, normalize={self.normalize}"
