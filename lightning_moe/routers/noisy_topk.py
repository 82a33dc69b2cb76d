"""Noisy top-k gating (Shazeer et al. 2017; FastMoE's NoisyGate).

Shape legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_moe.routers.base import Router, Routing, token_choice_routing, z_loss_of


class NoisyTopKRouter(Router):
    """Top-k of logits perturbed by learned Gaussian noise, with an importance + load balance loss.

    From Shazeer et al. 2017, "Outrageously Large Neural Networks: The Sparsely-Gated
    Mixture-of-Experts Layer". In training the router ranks the noisy logits
    ``H = x @ weight.T + N(0, 1) * softplus(x @ noise_weight.T)``; in eval it ranks the clean logits.
    The k kept values are softmaxed into the weights (equal to the full softmax of ``H`` renormalised
    over the k picked experts, whose unrenormalised values are the priorities).

    The balance loss is ``cv^2(importance) + cv^2(load)``, with ``cv^2 = var / mean^2`` over experts
    using the population variance (as the paper's tensor2tensor code does; it is also defined for
    a single expert). ``importance_e`` sums the dense gate of expert e over tokens. ``load_e`` sums
    over tokens the probability that the token is routed to e under a fresh draw of e's noise:
    ``Phi((clean_e - threshold_e) / noise_std_e)``, the threshold being the k-th largest noisy logit
    of the other experts. Where a noise std is 0, and in eval, that probability is the hard 0/1
    choice, so ``load`` becomes the count of tokens per expert.

    ``noise_weight`` starts at zero, so the initial noise std is ``softplus(0) = ln 2`` everywhere.
    The z-loss is taken on the clean logits: it penalises the router's scale, not the noise.

    Args:
        d_model: Model dimension D.
        num_experts: Number of experts E.
        top_k: Experts per token K.
    """

    single_expert_weight_is_one = True  # a softmax over one expert

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2) -> None:
        super().__init__(d_model, num_experts, top_k)
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_model))

    def reset_parameters(self) -> None:
        """Initialise ``weight`` like ``nn.Linear`` and ``noise_weight`` to zero."""
        super().reset_parameters()
        # The base constructor calls this before noise_weight exists.
        if hasattr(self, "noise_weight"):
            nn.init.zeros_(self.noise_weight)

    def route(self, x_TD: Tensor, *, noise: Tensor | None = None) -> Routing:
        """Choose the top-k experts of each token by noisy logits.

        Args:
            x_TD: (T, D) tokens.
            noise: (T, E) standard normal draws to use in training instead of fresh ones (for
                reproducible tests). Ignored in eval, where routing is noiseless.

        Returns:
            Token-major :class:`Routing` with ``N = T * K`` assignments.
        """
        clean_TE = self.logits(x_TD)
        noise_std_TE = F.softplus(x_TD.float() @ self.noise_weight.float().t())
        if self.training:
            noisy_TE = clean_TE + _standard_normal(noise, clean_TE) * noise_std_TE
        else:
            noisy_TE = clean_TE
        probs_TE = torch.softmax(noisy_TE, dim=-1)
        probs_TK, expert_ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        weights_TK = probs_TK / probs_TK.sum(dim=-1, keepdim=True)
        return token_choice_routing(
            expert_ids_TK,
            weights_TK,
            priorities_TK=probs_TK.detach(),
            aux_loss=self._balance_loss(clean_TE, noisy_TE, noise_std_TE, expert_ids_TK, weights_TK),
            z_loss=z_loss_of(clean_TE),
        )

    def _balance_loss(
        self, clean_TE: Tensor, noisy_TE: Tensor, noise_std_TE: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor
    ) -> Tensor:
        """``cv^2(importance) + cv^2(load)``; 0 for no tokens."""
        if clean_TE.shape[0] == 0:
            return clean_TE.new_zeros(())
        gates_TE = torch.zeros_like(clean_TE).scatter(1, expert_ids_TK, weights_TK)
        chosen_TE = torch.zeros_like(clean_TE).scatter(1, expert_ids_TK, 1.0)
        if self.training and self.top_k < self.num_experts:
            routed_prob_TE = _prob_in_top_k(clean_TE, noisy_TE, noise_std_TE, chosen_TE.bool(), self.top_k)
        else:
            # Without noise (eval) or when every expert is chosen, routing is certain.
            routed_prob_TE = chosen_TE
        return _cv_squared(gates_TE.sum(dim=0)) + _cv_squared(routed_prob_TE.sum(dim=0))


def _standard_normal(noise: Tensor | None, like_TE: Tensor) -> Tensor:
    """The given (T, E) draws, checked and cast to float32, or fresh ones shaped like ``like_TE``."""
    if noise is None:
        return torch.randn_like(like_TE)
    if noise.shape != like_TE.shape:
        raise ValueError(
            f"noise must have shape (T, E) = {tuple(like_TE.shape)}, got {tuple(noise.shape)}; "
            "pass one standard normal draw per token and expert, or None to draw them."
        )
    return noise.to(device=like_TE.device, dtype=torch.float32)


def _prob_in_top_k(clean_TE: Tensor, noisy_TE: Tensor, noise_std_TE: Tensor, chosen_TE: Tensor, top_k: int) -> Tensor:
    """Probability that each expert stays in its token's top-k when only its own noise is redrawn.

    The other experts' noisy logits fix a threshold: the k-th largest of them. For a chosen expert
    that is the (k+1)-th largest noisy logit overall, for an unchosen one the k-th. Where the noise
    std is 0 the outcome is certain and the hard choice is returned.

    Args:
        clean_TE: (T, E) float32 clean logits.
        noisy_TE: (T, E) float32 noisy logits that made the choice.
        noise_std_TE: (T, E) float32 noise standard deviations (>= 0).
        chosen_TE: (T, E) bool, True where the expert was picked.
        top_k: K, smaller than E.

    Returns:
        (T, E) float32 probabilities, differentiable w.r.t. all three float inputs.
    """
    top_values_TK1, _ = torch.topk(noisy_TE, top_k + 1, dim=-1)
    threshold_if_chosen_T1 = top_values_TK1[:, top_k : top_k + 1]
    threshold_if_not_chosen_T1 = top_values_TK1[:, top_k - 1 : top_k]
    threshold_TE = torch.where(chosen_TE, threshold_if_chosen_T1, threshold_if_not_chosen_T1)
    has_noise_TE = noise_std_TE > 0
    # A std of exactly 0 (softplus underflow) would divide by zero and poison the gradient.
    safe_std_TE = torch.where(has_noise_TE, noise_std_TE, torch.ones_like(noise_std_TE))
    smooth_TE = torch.special.ndtr((clean_TE - threshold_TE) / safe_std_TE)
    return torch.where(has_noise_TE, smooth_TE, chosen_TE.float())


def _cv_squared(values_E: Tensor) -> Tensor:
    """Squared coefficient of variation ``var / mean^2``, population variance; 0 for one expert."""
    return values_E.var(correction=0) / values_E.mean().square()
