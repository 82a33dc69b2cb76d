"""Sigmoid routing with an aux-loss-free balance bias and group-limited selection (DeepSeek-V3).

Shape legend: T tokens, D model dim, E experts, K top-k, G expert groups, P experts per group.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_moe.ops.reference import expert_histogram
from lightning_moe.routers.base import (
    Router,
    Routing,
    routing_from_topk_route,
    switch_balance_loss,
    token_choice_routing,
    z_loss_of,
)


class SigmoidRouter(Router):
    """Independent sigmoid scores per expert; a per-expert bias steers selection toward balance.

    From DeepSeek-AI (Liu et al.) 2024, "DeepSeek-V3 Technical Report". The scores are
    ``sigmoid(logits)`` in float32. The experts are *selected* by ``scores + bias`` and *weighted*
    by their unbiased scores renormalised to sum to 1, so the bias balances the load without
    changing what the chosen experts contribute. ``bias`` (E,) is a float32 buffer, saved in the
    state dict and never trained by gradient: in training each :meth:`route` adds its tokens per
    expert to :attr:`pending_tokens_per_expert`, and :meth:`update_bias` (once per optimizer step)
    moves every bias by ``bias_update_rate`` toward balance.

    With ``num_groups > 1`` the experts form ``num_groups`` contiguous groups; a group scores the
    sum of its two best biased scores (its best one if it has a single expert), only the
    ``top_groups`` best groups stay eligible, and the top-k experts are chosen among theirs
    (DeepSeek-V3's node-limited routing, which bounds how many devices a token is sent to).

    The balance loss is the complementary sequence-wise loss of DeepSeek-V3, ``E * sum_e f_e P_e``
    with ``f_e`` the fraction of the T * K assignments on e and ``P_e`` the mean over tokens of the
    normalised scores ``scores / scores.sum(-1)``; weight it small or zero, since the bias does the
    balancing. Priorities are the biased scores that made the selection.

    Without groups, scoring, top-k and the loss sums run as one fused op,
    :func:`lightning_moe.ops.topk_route` (CUDA kernels on the GPU); equal biased scores go to the
    lower expert.

    Args:
        d_model: Model dimension D.
        num_experts: Number of experts E.
        top_k: Experts per token K.
        num_groups: Number of expert groups G; must divide ``num_experts``.
        top_groups: Groups each token may use, between 1 and ``num_groups``.
        bias_update_rate: Step u of the bias update ``bias += u * sign(mean_load - load)``.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        num_groups: int = 1,
        top_groups: int = 1,
        bias_update_rate: float = 1e-3,
    ) -> None:
        super().__init__(d_model, num_experts, top_k)
        _validate_groups(num_experts, top_k, num_groups, top_groups)
        if isinstance(bias_update_rate, bool) or not isinstance(bias_update_rate, (int, float)):
            raise TypeError(f"bias_update_rate must be a float, got {type(bias_update_rate).__name__}.")
        if not bias_update_rate >= 0:
            raise ValueError(f"bias_update_rate must be >= 0, got {bias_update_rate}; use e.g. 1e-3, or 0 to freeze.")
        self.num_groups = num_groups
        self.top_groups = top_groups
        self.bias_update_rate = float(bias_update_rate)
        self.bias: Tensor
        self.register_buffer("bias", torch.zeros(num_experts, dtype=torch.float32))
        # Counts of the current optimizer step only; a checkpoint resumes at a step boundary. Not a
        # buffer: DDP would overwrite every rank's counts with rank 0's at each forward.
        self._pending: Tensor | None = None

    @property
    def pending_tokens_per_expert(self) -> Tensor:
        """(E,) int64 tokens per expert routed in training since the last :meth:`update_bias`."""
        if self._pending is None:
            return torch.zeros(self.num_experts, dtype=torch.int64, device=self.weight.device)
        return self._pending

    def reset_parameters(self) -> None:
        """Re-draw the router weight and clear the balance bias and pending counts."""
        super().reset_parameters()
        # Router.__init__ calls this before the buffers exist.
        if hasattr(self, "bias"):
            self.bias.zero_()
            self._pending = None

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # Keep the bias in float32 through `.to(bfloat16)`: updates of 1e-3 vanish in bf16.
        super()._apply(fn, recurse)
        self.bias = self.bias.float()
        return self

    def route(self, x_TD: Tensor) -> Routing:
        """Choose the top-k experts of each token by biased sigmoid scores.

        Args:
            x_TD: (T, D) tokens.

        Returns:
            Token-major :class:`Routing` with ``N = T * K`` assignments.
        """
        if self.num_groups == 1:
            route = self.route_topk(x_TD, "sigmoid", normalize=True, bias_E=self.bias.float())
            self._count_pending(route.tokens_per_expert_E)
            return routing_from_topk_route(route)
        return self._route_in_top_groups(self.logits(x_TD))

    def _route_in_top_groups(self, logits_TE: Tensor) -> Routing:
        """Group-limited routing of the logits (T, E), in plain PyTorch ops."""
        scores_TE = torch.sigmoid(logits_TE)
        biased_TE = scores_TE.detach() + self.bias.float()
        expert_ids_TK = torch.topk(self._restrict_to_top_groups(biased_TE), self.top_k, dim=-1).indices
        picked_TK = scores_TE.gather(1, expert_ids_TK)
        # Clamped so that a token whose picked scores all underflow gets zero weights, not NaN.
        weights_TK = picked_TK / picked_TK.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        counts_E = expert_histogram(expert_ids_TK.reshape(-1), self.num_experts)
        self._count_pending(counts_E)
        normalised_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        return token_choice_routing(
            expert_ids_TK,
            weights_TK,
            priorities_TK=biased_TE.gather(1, expert_ids_TK),
            aux_loss=switch_balance_loss(normalised_TE, expert_ids_TK.reshape(-1), self.num_experts),
            z_loss=z_loss_of(logits_TE),
            tokens_per_expert=counts_E,
        )

    def _count_pending(self, counts_E: Tensor) -> None:
        """In training, add the tokens per expert (E,) to :attr:`pending_tokens_per_expert`."""
        if self.training:
            self._pending = counts_E if self._pending is None else self._pending + counts_E

    def _restrict_to_top_groups(self, biased_TE: Tensor) -> Tensor:
        """``biased_TE`` with the experts outside each token's ``top_groups`` best groups at -inf."""
        if self.num_groups == 1:
            return biased_TE
        num_tokens = biased_TE.shape[0]
        biased_TGP = biased_TE.view(num_tokens, self.num_groups, self.num_experts // self.num_groups)
        best_in_group = min(2, biased_TGP.shape[-1])
        group_scores_TG = biased_TGP.topk(best_in_group, dim=-1).values.sum(dim=-1)
        top_groups_TG = group_scores_TG.topk(self.top_groups, dim=-1).indices
        eligible_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter(1, top_groups_TG, True)
        # -inf, not 0 as some references use: a biased score can be negative.
        return biased_TGP.masked_fill(~eligible_TG.unsqueeze(-1), float("-inf")).view(num_tokens, self.num_experts)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: Tensor | None = None) -> None:
        """Move each bias by ``bias_update_rate`` toward balance, then clear the pending counts.

        ``bias_e += bias_update_rate * sign(mean(tokens_per_expert) - tokens_per_expert_e)``:
        overloaded experts become less likely to be selected, underloaded ones more. With no
        tokens counted every difference is 0 and the bias does not move.

        Args:
            tokens_per_expert: (E,) counts to balance, e.g. :attr:`pending_tokens_per_expert`
                summed over the data-parallel ranks so that every rank applies the same update.
                Defaults to this process's :attr:`pending_tokens_per_expert`.
        """
        counts_E = self.pending_tokens_per_expert if tokens_per_expert is None else tokens_per_expert
        if counts_E.shape != (self.num_experts,):
            raise ValueError(
                f"tokens_per_expert must have shape (num_experts,) = ({self.num_experts},), "
                f"got {tuple(counts_E.shape)}; pass one count per global expert."
            )
        counts_E = counts_E.to(device=self.bias.device, dtype=torch.float32)
        self.bias += self.bias_update_rate * torch.sign(counts_E.mean() - counts_E).to(self.bias.dtype)
        self._pending = None

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_groups={self.num_groups}, top_groups={self.top_groups}, "
            f"bias_update_rate={self.bias_update_rate}"
        )


def _validate_groups(num_experts: int, top_k: int, num_groups: int, top_groups: int) -> None:
    for name, value in (("num_groups", num_groups), ("top_groups", top_groups)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(
            f"num_groups={num_groups} must be a positive divisor of num_experts={num_experts}; "
            "choose a number of groups that splits the experts evenly, or 1 for no grouping."
        )
    if not 1 <= top_groups <= num_groups:
        raise ValueError(f"top_groups={top_groups} must be between 1 and num_groups={num_groups}.")
    experts_per_group = num_experts // num_groups
    if top_k > top_groups * experts_per_group:
        raise ValueError(
            f"top_k={top_k} exceeds the {top_groups * experts_per_group} experts of top_groups={top_groups} "
            f"groups of {experts_per_group}; raise top_groups or lower top_k."
        )
