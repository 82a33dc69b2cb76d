"""Expert-choice routing: each expert picks its top-C tokens (Zhou et al. 2022).

Shape legend: T tokens, D model dim, E experts, K average experts per token, C tokens per expert.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_moe.routers.base import Router, Routing, z_loss_of


class ExpertChoiceRouter(Router):
    """Experts choose tokens instead of tokens choosing experts, so every expert is exactly full.

    From Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing". The float32 softmax
    over experts gives ``probs`` (T, E); each expert takes the C tokens with the highest
    probability for it, ``C = min(T, ceil(capacity_factor * T * top_k / E))``, weighted by that
    probability. A token may get any number of experts, zero included, and ``top_k`` is only the
    average. The load is balanced by construction, so the balance loss is 0.

    Which tokens an expert takes depends on every other token of the batch: a token's output can
    reveal the other tokens, including later positions of its own sequence. The routing is not
    causal; use it for encoders or with care in autoregressive decoders.

    Like every router's, the assignments come token-major (sorted by token, stably, so a token's
    experts keep increasing expert order). Priorities are the probabilities.

    Args:
        d_model: Model dimension D.
        num_experts: Number of experts E.
        top_k: Average experts per token K.
        capacity_factor: Scales the tokens per expert C; must be positive.
    """

    single_expert_weight_is_one = True  # a softmax over one expert

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, capacity_factor: float = 1.0) -> None:
        if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)):
            raise TypeError(f"capacity_factor must be a float, got {type(capacity_factor).__name__}.")
        if not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be positive, got {capacity_factor}; use e.g. 1.0.")
        super().__init__(d_model, num_experts, top_k)
        self.capacity_factor = float(capacity_factor)

    def capacity(self, num_tokens: int) -> int:
        """Tokens each expert takes from a batch of ``num_tokens``: ``min(T, ceil(cf * T * K / E))``."""
        return min(num_tokens, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts))

    def route(self, x_TD: Tensor) -> Routing:
        """Let each expert choose its top-C tokens.

        Args:
            x_TD: (T, D) tokens.

        Returns:
            Token-major :class:`Routing` with ``N = E * C`` assignments.
        """
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        capacity = self.capacity(x_TD.shape[0])
        probs_EC, token_ids_EC = torch.topk(probs_TE.t(), capacity, dim=-1)
        expert_ids_EC = torch.arange(self.num_experts, device=x_TD.device).unsqueeze(-1).expand_as(token_ids_EC)
        token_major = torch.argsort(token_ids_EC.reshape(-1), stable=True)
        return Routing(
            token_ids=token_ids_EC.reshape(-1)[token_major],
            expert_ids=expert_ids_EC.reshape(-1)[token_major],
            weights=probs_EC.reshape(-1)[token_major],
            priorities=probs_EC.detach().reshape(-1)[token_major],
            aux_loss=logits_TE.new_zeros(()),
            z_loss=z_loss_of(logits_TE),
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, capacity_factor={self.capacity_factor}"
