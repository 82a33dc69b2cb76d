"""The router contract shared by every routing scheme.

Shape legend: T tokens, D model dim, E experts, K top-k, N assignments.

A router turns tokens into *assignments*: (token, expert, weight) triples. Token-choice routers
(top-k and friends) produce ``N = T * K`` assignments, expert-choice routing ``N = E * C``. Every
router returns them token-major (``token_ids`` non-decreasing), so each token's assignments are
contiguous and the combine step can sum them without atomics. Representing every scheme as flat
assignments lets one layer serve them all: capacity, permutation and combination never need to
know which router ran.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_moe import ops
from lightning_moe.ops.reference import expert_histogram
from lightning_moe.ops.topk_route import Scoring, TopKRoute


@dataclass
class Routing:
    """The routing decision for one batch of tokens.

    Assignments are token-major: ``token_ids`` is sorted non-decreasing.

    Attributes:
        token_ids: (N,) int64, the token of each assignment.
        expert_ids: (N,) int64, the global expert of each assignment.
        weights: (N,) float32, the factor the expert's output is scaled by before summing.
        priorities: (N,) float32, the score that ranked the assignment when it was selected;
            capacity keeps the highest-priority assignments of each expert.
        aux_loss: float32 scalar, the router's load-balancing loss (unweighted).
        z_loss: float32 scalar, ``mean(logsumexp(logits)^2)`` over tokens (unweighted).
        tokens_per_expert: Optional (E,) int64, how many assignments each expert has, when the
            router counted them anyway (the fused top-k routers do), so the layer need not
            recount; None otherwise, and after :meth:`select`, which changes the counts.
        token_offsets: Optional (T + 1,) int64, where each token's assignments start (token t's
            are ``[token_offsets[t], token_offsets[t + 1])``), when the router knows them without
            a search (token-choice routers: exactly K per token); None otherwise, and after
            :meth:`select`. The layer then need not compute them from ``token_ids``.
    """

    token_ids: Tensor
    expert_ids: Tensor
    weights: Tensor
    priorities: Tensor
    aux_loss: Tensor
    z_loss: Tensor
    tokens_per_expert: Tensor | None = None
    token_offsets: Tensor | None = None

    def select(self, keep: Tensor) -> Routing:
        """The assignments where ``keep`` (N,) bool is True, in their order (still token-major)."""
        return Routing(
            token_ids=self.token_ids[keep],
            expert_ids=self.expert_ids[keep],
            weights=self.weights[keep],
            priorities=self.priorities[keep],
            aux_loss=self.aux_loss,
            z_loss=self.z_loss,
            tokens_per_expert=None,
            token_offsets=None,
        )


class Router(nn.Module):
    """Base class of all routers: a linear map to per-expert logits, then a scheme-specific choice.

    ``weight`` has shape (E, D) and the logits are ``x @ weight.T``, computed in float32 whatever
    the input dtype, so that softmax, top-k and the losses are stable under bf16 and fp16.

    Subclasses implement :meth:`route`.

    Args:
        d_model: Model dimension D.
        num_experts: Number of global experts E.
        top_k: Experts per token K (for expert choice: the average number of experts per token).
    """

    # Whether, with a single expert, every weight is exactly 1 with zero gradient (a softmax over
    # one logit), so that a one-expert layer may skip scaling by it. Subclasses for which that holds
    # set it; the default is the safe answer for any router.
    single_expert_weight_is_one: ClassVar[bool] = False

    def __init__(self, d_model: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        _check_positive_int("d_model", d_model)
        _check_positive_int("num_experts", num_experts)
        _check_positive_int("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(
                f"top_k={top_k} is larger than num_experts={num_experts}; choose top_k between 1 and {num_experts}."
            )
        self.d_model = d_model
        self.num_experts = num_experts
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the router weight like ``nn.Linear`` (uniform in +-1/sqrt(D))."""
        bound = 1.0 / math.sqrt(self.d_model)
        nn.init.uniform_(self.weight, -bound, bound)

    def logits(self, x_TD: Tensor) -> Tensor:
        """Float32 router logits.

        Args:
            x_TD: (T, D) tokens of any floating dtype.

        Returns:
            (T, E) float32 logits ``x @ weight.T``.
        """
        return ops.router_logits(x_TD, self.weight)

    def route(self, x_TD: Tensor) -> Routing:
        """Choose experts for the tokens ``x_TD`` (T, D). Implemented by each scheme."""
        raise NotImplementedError

    def route_topk(self, x_TD: Tensor, scoring: Scoring, normalize: bool, bias_E: Tensor | None = None) -> TopKRoute:
        """:func:`lightning_moe.ops.topk_route` of :meth:`logits`, for token-choice routers (pass the
        result to :func:`routing_from_topk_route` for a :class:`Routing` with its losses).

        Runs through :func:`lightning_moe.ops.router_topk_route`, both ops' kernels in one autograd
        node when eager on a GPU, unless a subclass computes its logits its own way (overrides
        :meth:`logits`); then the op runs on those logits.

        Args:
            x_TD: (T, D) tokens.
            scoring: ``"softmax"`` or ``"sigmoid"``.
            normalize: Renormalise each token's picked weights to sum to 1.
            bias_E: Optional (E,) float32 selection bias of sigmoid scoring.
        """
        if type(self).logits is Router.logits:
            return ops.router_topk_route(x_TD, self.weight, self.top_k, scoring, normalize, bias_E)
        return ops.topk_route(self.logits(x_TD), self.top_k, scoring, normalize, bias_E)

    def forward(self, x_TD: Tensor) -> Routing:
        return self.route(x_TD)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}"


def token_choice_routing(
    expert_ids_TK: Tensor,
    weights_TK: Tensor,
    priorities_TK: Tensor,
    aux_loss: Tensor,
    z_loss: Tensor,
    tokens_per_expert: Tensor | None = None,
) -> Routing:
    """Flatten per-token choices (T, K) into token-major assignments (N = T * K)."""
    num_tokens, top_k = expert_ids_TK.shape
    token_ids, token_offsets = token_major_layout(num_tokens, top_k, expert_ids_TK.device)
    return Routing(
        token_ids=token_ids,
        expert_ids=expert_ids_TK.reshape(-1),
        weights=weights_TK.reshape(-1).float(),
        priorities=priorities_TK.reshape(-1).float(),
        aux_loss=aux_loss,
        z_loss=z_loss,
        tokens_per_expert=tokens_per_expert,
        token_offsets=token_offsets,
    )


def token_major_layout(num_tokens: int, top_k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The token ids (T * K,) and token offsets (T + 1,), both int64, of T tokens with K
    assignments each: ``[0]*K + [1]*K + ...`` and ``[0, K, 2K, ..., T*K]``.

    They depend on (T, K, device) alone, so eager calls share one copy per triple (a few recent
    ones are kept) instead of launching the same kernels in every layer at every step; treat them
    as read-only. Under ``torch.compile`` and during CUDA graph capture they are built afresh.
    """
    if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return _build_token_major_layout(num_tokens, top_k, device)
    return _cached_token_major_layout(num_tokens, top_k, device)


@functools.lru_cache(maxsize=16)
def _cached_token_major_layout(num_tokens: int, top_k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    # Normal tensors even when first asked for under inference mode: training saves them for backward.
    with torch.inference_mode(False):
        return _build_token_major_layout(num_tokens, top_k, device)


def _build_token_major_layout(num_tokens: int, top_k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    token_ids = torch.arange(num_tokens, device=device)
    if top_k > 1:
        token_ids = token_ids.repeat_interleave(top_k)
    return token_ids, torch.arange(0, num_tokens * top_k + 1, top_k, device=device)


def routing_from_topk_route(route: TopKRoute) -> Routing:
    """The :class:`Routing` of an :func:`lightning_moe.ops.topk_route` result, with its losses: the
    balance loss of the Switch form of :func:`switch_balance_loss` and the z-loss, as the op
    computes them."""
    return token_choice_routing(
        route.expert_ids_TK,
        route.weights_TK,
        route.priorities_TK,
        aux_loss=route.balance_loss,
        z_loss=route.z_loss,
        tokens_per_expert=route.tokens_per_expert_E,
    )


def z_loss_of(logits_TE: Tensor) -> Tensor:
    """Router z-loss (ST-MoE): ``mean over tokens of logsumexp(logits)^2``; 0 for no tokens."""
    if logits_TE.shape[0] == 0:
        return logits_TE.new_zeros(())
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def switch_balance_loss(probs_TE: Tensor, expert_ids: Tensor, num_experts: int) -> Tensor:
    """Switch Transformer balance loss ``E * sum_e f_e * P_e``.

    Args:
        probs_TE: (T, E) float32 router probabilities (differentiable).
        expert_ids: (N,) the experts chosen; ``f_e`` is the fraction of these equal to e.
        num_experts: E.

    Returns:
        Float32 scalar; 0 when there are no tokens. Equals 1 under perfect balance.
    """
    if probs_TE.shape[0] == 0 or expert_ids.numel() == 0:
        return probs_TE.new_zeros(()).float()
    counts_E = expert_histogram(expert_ids, num_experts).float()
    fraction_E = counts_E / expert_ids.numel()
    mean_prob_E = probs_TE.float().mean(dim=0)
    return num_experts * (fraction_E * mean_prob_E).sum()


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}.")
