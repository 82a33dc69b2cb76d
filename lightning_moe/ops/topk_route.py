"""A token-choice router's scoring, top-k and loss sums in one op: ``lightning_moe::topk_route``.

Shape legend: T tokens, E experts, K top-k.

From float32 logits (T, E) the op gives everything :class:`~lightning_moe.routers.TopKRouter` and
:class:`~lightning_moe.routers.SigmoidRouter` (without groups) need: the picked experts, their
combine weights and priorities, the tokens per expert, the per-expert sum of probabilities (``P_e``
of the balance loss, times T), the sum of squared logsumexps (the z-loss, times T), and the two
losses themselves. Written in PyTorch that is about twenty small kernels forward and as many
backward; here it is three launches forward (``src_cuda/topk_route.cu``: one warp per token, a
fixed-order reduction of per-block partial sums, then one block for the losses) and one backward
(``src_cuda/topk_route_backward.cu``: one warp per token, the gradient in closed form), with no
atomics on floats, so results are the same on every run, and no host sync. The losses' gradients
fold into those of the sums before the backward kernel runs, so a router pays no autograd nodes of
its own for them.

The kernels take float32 logits on CUDA with at most :data:`MAX_KERNEL_EXPERTS` experts (a warp
holds a token's logits in registers, 16 per lane), any ``top_k`` up to E; everything else (CPU,
float64, more experts, no extension) takes :func:`lightning_moe.ops.reference.topk_route`, which
computes the same in plain differentiable PyTorch. The picks of the two agree exactly on the same
float32 logits: softmax ranks by the logits, sigmoid by ``sigmoid(logits) + bias`` computed as
``torch.sigmoid`` computes it.

``torch.compile`` traces the custom op; eager calls take the same kernels through a plain
``autograd.Function`` (see :mod:`lightning_moe.ops.permute`).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from lightning_moe.ops import reference
from lightning_moe.ops.extension import require_extension, use_cuda_kernels
from lightning_moe.ops.router_logits import EagerKernels, eager_kernels, router_logits
from lightning_moe.ops.token_grad import TokenGradSum, join_token_grad_sum

# One warp holds a token's logits, at most 16 per lane (kTopKRouteMaxExperts in topk_route.h).
MAX_KERNEL_EXPERTS = 512

Scoring = Literal["softmax", "sigmoid"]
_SCORINGS = ("softmax", "sigmoid")


class TopKRoute(NamedTuple):
    """What :func:`topk_route` returns; the float outputs are in the logits' dtype.

    Attributes:
        expert_ids_TK: (T, K) int64, each token's picks, best first.
        weights_TK: (T, K), the combine weights (differentiable).
        priorities_TK: (T, K), the scores that ranked the picks (no gradient).
        tokens_per_expert_E: (E,) int64, how many tokens picked each expert.
        prob_sum_E: (E,), the sum over tokens of each expert's probability (differentiable).
        lse_sq_sum: scalar, the sum over tokens of ``logsumexp(logits)^2`` (differentiable).
        balance_loss: scalar, the Switch balance loss made of those sums,
            ``E * sum_e (tokens_per_expert_E[e] / (T * K)) * (prob_sum_E[e] / T)`` (differentiable).
        z_loss: scalar, ``lse_sq_sum / T`` (differentiable). Both losses are 0 when T = 0.
    """

    expert_ids_TK: Tensor
    weights_TK: Tensor
    priorities_TK: Tensor
    tokens_per_expert_E: Tensor
    prob_sum_E: Tensor
    lse_sq_sum: Tensor
    balance_loss: Tensor
    z_loss: Tensor


_Outputs = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def _forward(logits_TE: Tensor, top_k: int, scoring: str, normalize: bool, bias_E: Tensor | None) -> _Outputs:
    return require_extension().topk_route_forward(logits_TE, top_k, scoring, normalize, bias_E)


def _backward_kernel(
    grads: tuple[Tensor, Tensor | None, Tensor | None],
    logits_TE: Tensor,
    expert_ids_TK: Tensor,
    scoring: str,
    normalize: bool,
) -> Tensor:
    return require_extension().topk_route_backward(*grads, logits_TE, expert_ids_TK, scoring, normalize)


def _differentiable_grads(
    grads: tuple[Tensor | None, ...], logits_TE: Tensor, expert_ids_TK: Tensor, tokens_per_expert_E: Tensor
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The gradients of weights, prob_sum and lse_sq_sum as the kernel takes them, those of the
    two losses folded into the sums' (the losses are linear in them).

    Gradients are not materialised (an unused output's is None), which spares zero-filled tensors
    for the outputs that have none (ids, priorities, counts, and the losses and their sums when no
    loss is attached): the kernel counts an absent prob_sum or lse_sq_sum gradient as zeros. An
    absent weights gradient becomes zeros here.
    """
    _, grad_weights, _, _, grad_prob_sum, grad_lse_sq_sum, grad_balance, grad_z = grads
    grad_weights = (
        logits_TE.new_zeros(expert_ids_TK.shape) if grad_weights is None else grad_weights.float().contiguous()
    )
    num_tokens, top_k = expert_ids_TK.shape
    if num_tokens > 0 and grad_balance is not None:
        balance_scale = reference.balance_loss_scale(logits_TE.shape[1], num_tokens, top_k)
        term = tokens_per_expert_E * (grad_balance.float() * balance_scale)  # float32, by type promotion
        grad_prob_sum = term if grad_prob_sum is None else grad_prob_sum + term
    if num_tokens > 0 and grad_z is not None:
        term = grad_z.float() / num_tokens
        grad_lse_sq_sum = term if grad_lse_sq_sum is None else grad_lse_sq_sum + term
    grad_prob_sum, grad_lse_sq_sum = (
        None if grad is None else grad.float().contiguous() for grad in (grad_prob_sum, grad_lse_sq_sum)
    )
    return grad_weights, grad_prob_sum, grad_lse_sq_sum


@torch.library.custom_op("lightning_moe::topk_route", mutates_args=())
def _topk_route_cuda(
    logits_TE: Tensor, top_k: int, scoring: str, normalize: bool, bias_E: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _forward(logits_TE, top_k, scoring, normalize, bias_E)


@_topk_route_cuda.register_fake
def _(
    logits_TE: Tensor, top_k: int, scoring: str, normalize: bool, bias_E: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    num_tokens, num_experts = logits_TE.shape
    return (
        logits_TE.new_empty(num_tokens, top_k, dtype=torch.int64),
        logits_TE.new_empty(num_tokens, top_k),
        logits_TE.new_empty(num_tokens, top_k),
        logits_TE.new_empty(num_experts, dtype=torch.int64),
        logits_TE.new_empty(num_experts),
        logits_TE.new_empty(()),
        logits_TE.new_empty(()),
        logits_TE.new_empty(()),
    )


@torch.library.custom_op("lightning_moe::topk_route_backward", mutates_args=())
def _topk_route_backward_cuda(
    grad_weights: Tensor,
    grad_prob_sum: Tensor | None,
    grad_lse_sq_sum: Tensor | None,
    logits_TE: Tensor,
    expert_ids_TK: Tensor,
    scoring: str,
    normalize: bool,
) -> Tensor:
    return _backward_kernel(
        (grad_weights, grad_prob_sum, grad_lse_sq_sum), logits_TE, expert_ids_TK, scoring, normalize
    )


@_topk_route_backward_cuda.register_fake
def _(
    grad_weights: Tensor,
    grad_prob_sum: Tensor | None,
    grad_lse_sq_sum: Tensor | None,
    logits_TE: Tensor,
    expert_ids_TK: Tensor,
    scoring: str,
    normalize: bool,
) -> Tensor:
    return torch.empty_like(logits_TE)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: _Outputs, saved_first: tuple[Tensor, ...] = ()) -> None:
    """Saves ``*saved_first, logits, expert_ids, tokens_per_expert`` (a node that computes the logits
    too saves what their gradients need first) and marks the outputs without gradients."""
    logits_TE, _, scoring, normalize, _ = inputs
    expert_ids_TK, _, priorities_TK, tokens_per_expert_E, *_ = output
    ctx.save_for_backward(*saved_first, logits_TE, expert_ids_TK, tokens_per_expert_E)
    ctx.scoring = scoring
    ctx.normalize = normalize
    ctx.mark_non_differentiable(expert_ids_TK, priorities_TK, tokens_per_expert_E)
    ctx.set_materialize_grads(False)


def _backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor, None, None, None, None]:
    logits_TE, expert_ids_TK, tokens_per_expert_E = ctx.saved_tensors
    grad_logits = torch.ops.lightning_moe.topk_route_backward(
        *_differentiable_grads(grads, logits_TE, expert_ids_TK, tokens_per_expert_E),
        logits_TE,
        expert_ids_TK,
        ctx.scoring,
        ctx.normalize,
    )
    return grad_logits, None, None, None, None


_topk_route_cuda.register_autograd(_backward, setup_context=_setup_context)


class _TopKRouteFunction(torch.autograd.Function):
    """The eager path: the same kernels as the custom op, at less host time per call."""

    @staticmethod
    def forward(
        ctx: Any, logits_TE: Tensor, top_k: int, scoring: str, normalize: bool, bias_E: Tensor | None
    ) -> _Outputs:
        output = _forward(logits_TE, top_k, scoring, normalize, bias_E)
        _setup_context(ctx, (logits_TE, top_k, scoring, normalize, bias_E), output)
        return output

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor, None, None, None, None]:
        logits_TE, expert_ids_TK, tokens_per_expert_E = ctx.saved_tensors
        upstream = _differentiable_grads(grads, logits_TE, expert_ids_TK, tokens_per_expert_E)
        grad_logits = _backward_kernel(upstream, logits_TE, expert_ids_TK, ctx.scoring, ctx.normalize)
        return grad_logits, None, None, None, None


def topk_route(
    logits_TE: Tensor, top_k: int, scoring: Scoring, normalize: bool, bias_E: Tensor | None = None
) -> TopKRoute:
    """Score each token's experts, pick the top k, and sum what the router's losses need.

    ``scoring="softmax"``: ``p = softmax(logits)``; the k largest ``p`` are picked (ranked by the
    logits, which order ``p`` the same way without the ties that rounding ``p`` makes);
    ``weights = p / sum(picked p)`` if ``normalize`` else ``p``; ``priorities = p``;
    ``prob_sum_E = sum over tokens of p``. ``bias_E`` is ignored.

    ``scoring="sigmoid"``: ``s = sigmoid(logits)``; the k largest ``s + bias_E`` are picked
    (``bias_E`` None counts as zeros); ``weights = s / max(sum(picked s), float32 tiny)`` if
    ``normalize`` else ``s``; ``priorities = s + bias_E``;
    ``prob_sum_E = sum over tokens of s / sum_e(s)``.

    Either way ties go to the lower expert, each token's picks come best first, and
    ``lse_sq_sum = sum over tokens of logsumexp(logits)^2``; ``balance_loss`` and ``z_loss`` as in
    :class:`TopKRoute`. Only ``weights_TK``, ``prob_sum_E``, ``lse_sq_sum`` and the two losses carry
    gradients. No host sync; T = 0 gives empty picks and zero sums and losses.

    Args:
        logits_TE: (T, E) router logits, float32 for the CUDA kernels (float64 takes the reference).
        top_k: K, between 1 and E.
        scoring: ``"softmax"`` or ``"sigmoid"``.
        normalize: Renormalise each token's picked weights to sum to 1.
        bias_E: Optional (E,) float32 selection bias of sigmoid scoring; never differentiated.

    Returns:
        A :class:`TopKRoute`.
    """
    num_experts = logits_TE.shape[-1]
    if scoring not in _SCORINGS:
        raise ValueError(f"scoring must be one of {_SCORINGS}, got {scoring!r}.")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be between 1 and the {num_experts} experts, got {top_k}.")
    bias_E = bias_E if scoring == "sigmoid" else None
    tensors = (logits_TE,) if bias_E is None else (logits_TE, bias_E)
    if _kernel_accepts(logits_TE, bias_E) and use_cuda_kernels(*tensors):
        args = (logits_TE.contiguous(), top_k, scoring, normalize, None if bias_E is None else bias_E.contiguous())
        if torch.compiler.is_compiling():
            return TopKRoute(*torch.ops.lightning_moe.topk_route(*args))
        return TopKRoute(*_TopKRouteFunction.apply(*args))
    return TopKRoute(*reference.topk_route(logits_TE, top_k, scoring, normalize, bias_E))


def _kernel_accepts(logits_TE: Tensor, bias_E: Tensor | None) -> bool:
    shape_ok = logits_TE.dim() == 2 and 1 <= logits_TE.shape[1] <= MAX_KERNEL_EXPERTS
    bias_ok = bias_E is None or bias_E.dtype == torch.float32
    return shape_ok and bias_ok and logits_TE.dtype == torch.float32


def router_topk_route(
    x_TD: Tensor,
    weight_ED: Tensor,
    top_k: int,
    scoring: Scoring,
    normalize: bool,
    bias_E: Tensor | None = None,
) -> TopKRoute:
    """``topk_route(router_logits(x_TD, weight_ED), top_k, scoring, normalize, bias_E)``: a router
    from its tokens and weight to its route.

    Eager, where both ops run on their kernels (:func:`lightning_moe.ops.router_logits.eager_kernels`
    and the conditions of :func:`topk_route`), the two ops' kernels run in one autograd node: the
    same kernels in the same order, saving the same tensors, so the same bits, at less host time
    (one Python ``autograd.Function`` call and one engine visit fewer per step). That node joins
    the sum of the tokens' gradients an MoE layer opens around its router
    (:mod:`lightning_moe.ops.token_grad`) when ``x_TD`` is the layer's tokens: its ``grad_x`` then
    includes the experts' gradient of them. Elsewhere, and under ``torch.compile``, it is the
    composition itself.

    Args:
        x_TD: (T, D) tokens of any floating dtype.
        weight_ED: (E, D) router weight.
        top_k, scoring, normalize, bias_E: As in :func:`topk_route`.

    Returns:
        A :class:`TopKRoute`; gradients flow to ``x_TD`` and ``weight_ED`` (in their own dtypes).
    """
    if not torch.compiler.is_compiling():
        args = _one_node_args(x_TD, weight_ED, top_k, scoring, normalize, bias_E)
        if args is not None:
            token_grads = join_token_grad_sum(x_TD) if x_TD.requires_grad else None
            return TopKRoute(*_RouterTopKRouteFunction.apply(*args, token_grads))
    return topk_route(router_logits(x_TD, weight_ED), top_k, scoring, normalize, bias_E)


def _one_node_args(
    x_TD: Tensor, weight_ED: Tensor, top_k: int, scoring: str, normalize: bool, bias_E: Tensor | None
) -> tuple[Any, ...] | None:
    """The arguments of :class:`_RouterTopKRouteFunction` for these inputs, or None where the two
    ops would not both run on their kernels (the composition then runs, and raises on bad input)."""
    chosen = eager_kernels(x_TD, weight_ED)
    if chosen is None or scoring not in _SCORINGS or not 1 <= top_k <= weight_ED.shape[0] <= MAX_KERNEL_EXPERTS:
        return None
    bias_E = bias_E if scoring == "sigmoid" else None
    if bias_E is not None and not (bias_E.is_cuda and bias_E.dtype == torch.float32):
        return None
    kernel_weight, kernels = chosen
    bias = None if bias_E is None else bias_E.contiguous()
    return x_TD.contiguous(), weight_ED, kernel_weight.contiguous(), kernels, top_k, scoring, normalize, bias


class _RouterTopKRouteFunction(torch.autograd.Function):
    """The kernels of router_logits and topk_route in one node (see :func:`router_topk_route`)."""

    @staticmethod
    def forward(
        ctx: Any,
        x_TD: Tensor,
        weight_ED: Tensor,
        kernel_weight: Tensor,
        kernels: EagerKernels,
        top_k: int,
        scoring: str,
        normalize: bool,
        bias_E: Tensor | None,
        token_grads: TokenGradSum | None,
    ) -> _Outputs:
        logits_TE = kernels.forward(x_TD, kernel_weight)
        output = _forward(logits_TE, top_k, scoring, normalize, bias_E)
        _setup_context(ctx, (logits_TE, top_k, scoring, normalize, bias_E), output, saved_first=(x_TD, kernel_weight))
        ctx.kernels, ctx.weight_dtype, ctx.token_grads = kernels, weight_ED.dtype, token_grads
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        x_TD, kernel_weight, logits_TE, expert_ids_TK, tokens_per_expert_E = ctx.saved_tensors
        upstream = _differentiable_grads(grads, logits_TE, expert_ids_TK, tokens_per_expert_E)
        grad_TE = _backward_kernel(upstream, logits_TE, expert_ids_TK, ctx.scoring, ctx.normalize)
        # The experts' gradient of the same tokens, when they handed it over, goes into grad_x.
        handed_over = ctx.token_grads.take() if ctx.token_grads is not None else None
        needs_x = ctx.needs_input_grad[0]
        grad_x = ctx.kernels.grad_x(grad_TE, kernel_weight, x_TD.dtype, handed_over) if needs_x else None
        grad_weight = ctx.kernels.grad_weight(grad_TE, x_TD, ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, None, None, None, None, None, None, None
