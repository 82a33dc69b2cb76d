"""Switch routing: top-1 with multiplicative input jitter (Fedus et al. 2021).

Shape legend: T tokens, D model dim, E experts, K top-k (always 1 here).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_moe.routers.base import Router, Routing, routing_from_topk_route


class SwitchRouter(Router):
    """Each token goes to its single most probable expert, weighted by that probability.

    From Fedus et al. 2021, "Switch Transformers: Scaling to Trillion Parameter Models with Simple
    and Efficient Sparsity". In training the router input is multiplied elementwise by uniform
    noise in ``[1 - jitter_eps, 1 + jitter_eps]`` to explore routings; eval is deterministic. The
    weight is the chosen expert's softmax probability, not renormalised (it would always be 1,
    and the router would get no gradient through the expert outputs). The balance loss is
    ``E * sum_e f_e P_e``; the z-loss is taken on the logits of the jittered input.

    Args:
        d_model: Model dimension D.
        num_experts: Number of experts E.
        top_k: Must be 1; present so that every router shares the ``(d_model, num_experts, top_k)``
            signature.
        jitter_eps: Half-width of the multiplicative jitter, in ``[0, 1)``; 0 disables it.
    """

    single_expert_weight_is_one = True  # a softmax over one expert

    def __init__(self, d_model: int, num_experts: int, top_k: int = 1, jitter_eps: float = 0.01) -> None:
        if top_k != 1:
            raise ValueError(
                f"switch routes each token to one expert; use top_k=1 (got top_k={top_k}), "
                "or router='topk' for several experts per token."
            )
        if isinstance(jitter_eps, bool) or not isinstance(jitter_eps, (int, float)):
            raise TypeError(f"jitter_eps must be a float, got {type(jitter_eps).__name__}.")
        if not 0 <= jitter_eps < 1:
            raise ValueError(f"jitter_eps must be in [0, 1), got {jitter_eps}; use e.g. 0.01, or 0 for no jitter.")
        super().__init__(d_model, num_experts, top_k)
        self.jitter_eps = float(jitter_eps)

    def route(self, x_TD: Tensor, *, jitter: Tensor | None = None) -> Routing:
        """Choose one expert per token.

        Args:
            x_TD: (T, D) tokens.
            jitter: (T, D) multipliers to use in training instead of fresh uniform draws (for
                reproducible tests). Ignored in eval, where routing is deterministic.

        Returns:
            Token-major :class:`Routing` with ``N = T`` assignments.
        """
        # Top-1 of the softmax, weighted by its probability, with the Switch balance loss: the
        # fused op of TopKRouter (unnormalised weights), on the jittered tokens' logits.
        route = self.route_topk(self._jittered(x_TD, jitter), "softmax", normalize=False)
        return routing_from_topk_route(route)

    def _jittered(self, x_TD: Tensor, jitter: Tensor | None) -> Tensor:
        """The router input: the tokens, times uniform jitter (in float32) in training."""
        if not self.training or (jitter is None and self.jitter_eps == 0):
            return x_TD  # the logits are float32 whatever the tokens' dtype
        x_TD = x_TD.float()
        if jitter is None:
            jitter = torch.empty_like(x_TD).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        elif jitter.shape != x_TD.shape:
            raise ValueError(
                f"jitter must have the shape of the tokens (T, D) = {tuple(x_TD.shape)}, got {tuple(jitter.shape)}; "
                "pass one multiplier per token and feature, or None to draw them."
            )
        return x_TD * jitter.to(device=x_TD.device, dtype=torch.float32)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, jitter_eps={self.jitter_eps}"
