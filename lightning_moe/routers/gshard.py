"""GShard top-2 routing with random routing of the second expert (Lepikhin et al. 2020).

Shape legend: T tokens, D model dim, E experts, K top-k (always 2 here).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_moe.routers.base import Router, Routing, switch_balance_loss, token_choice_routing, z_loss_of


class GShardRouter(Router):
    """Top-2 routing whose second expert is used only with probability ``min(1, 2 * g2)`` in training.

    From Lepikhin et al. 2020, "GShard: Scaling Giant Models with Conditional Computation and
    Automatic Sharding". The float32 softmax over the E experts gives the two best probabilities,
    renormalised into weights ``g1 + g2 = 1``. In training the second assignment is kept only
    where a uniform draw falls below ``2 * g2``: a second expert with a small weight barely changes
    the output and is not worth its capacity. A dropped second assignment is removed from the
    routing and the first keeps its weight ``g1``. Eval always keeps both.

    The balance loss is ``E * sum_e f_e P_e`` with ``f_e`` the fraction of tokens whose *first*
    choice is e (GShard's definition) and ``P_e`` the mean probability of e. Priorities are the
    unrenormalised probabilities.

    Args:
        d_model: Model dimension D.
        num_experts: Number of experts E (at least 2).
        top_k: Must be 2; present so that every router shares the ``(d_model, num_experts, top_k)``
            signature.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2) -> None:
        if top_k != 2:
            raise ValueError(
                f"gshard routes each token to two experts; use top_k=2 (got top_k={top_k}), "
                "or router='topk' for another number of experts per token."
            )
        super().__init__(d_model, num_experts, top_k)

    def route(self, x_TD: Tensor, *, uniform: Tensor | None = None) -> Routing:
        """Choose the top-2 experts of each token, randomly dropping second choices in training.

        Args:
            x_TD: (T, D) tokens.
            uniform: (T,) draws in [0, 1) to use in training instead of fresh ones (for
                reproducible tests); the second expert of token t is kept where
                ``uniform[t] < 2 * g2[t]``. Ignored in eval, where both experts are kept.

        Returns:
            Token-major :class:`Routing` with between T and ``2 * T`` assignments.
        """
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        probs_TK, expert_ids_TK = torch.topk(probs_TE, 2, dim=-1)
        weights_TK = probs_TK / probs_TK.sum(dim=-1, keepdim=True)
        routing = token_choice_routing(
            expert_ids_TK,
            weights_TK,
            priorities_TK=probs_TK.detach(),
            aux_loss=switch_balance_loss(probs_TE, expert_ids_TK[:, 0], self.num_experts),
            z_loss=z_loss_of(logits_TE),
        )
        if not self.training:
            return routing
        return routing.select(self._kept_TK(weights_TK.detach(), uniform).reshape(-1))

    def _kept_TK(self, weights_TK: Tensor, uniform: Tensor | None) -> Tensor:
        """(T, 2) bool: every first choice, and the second where ``uniform < 2 * g2``."""
        num_tokens = weights_TK.shape[0]
        if uniform is None:
            uniform = torch.rand(num_tokens, device=weights_TK.device)
        elif uniform.shape != (num_tokens,):
            raise ValueError(
                f"uniform must have shape (T,) = ({num_tokens},), got {tuple(uniform.shape)}; "
                "pass one draw in [0, 1) per token, or None to draw them."
            )
        keep_second_T = uniform.to(weights_TK.device) < 2 * weights_TK[:, 1]
        return torch.stack([torch.ones_like(keep_second_T), keep_second_T], dim=-1)
