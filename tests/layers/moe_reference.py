"""A brute-force float64 MoE layer, one token at a time, written independently of the package.

It reads the parameters of a ``lightning_moe.MoE`` built with the top-k router and recomputes the
layer's output and its balance / z losses with plain loops, so that autograd through it gives the
reference gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = {
    "gelu": lambda h: F.gelu(h),
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "relu": torch.relu,
    "silu": F.silu,
    "swiglu": F.silu,
    "geglu": F.gelu,
}


def expert_mlp(params: dict[str, Tensor | None], e: int, x_D: Tensor, activation: str) -> Tensor:
    """One expert on one token: ``w2 (act(w1 x + b1) [* w3 x]) + b2``."""
    hidden = params["w1"][e] @ x_D
    if params["b1"] is not None:
        hidden = hidden + params["b1"][e]
    hidden = ACTIVATIONS[activation](hidden)
    if params["w3"] is not None:
        hidden = hidden * (params["w3"][e] @ x_D)
    out = params["w2"][e] @ hidden
    if params["b2"] is not None:
        out = out + params["b2"][e]
    return out


def topk_choices(router_weight: Tensor, x_D: Tensor, top_k: int, normalize: bool) -> tuple[list, Tensor, Tensor]:
    """Experts, combine weights and softmax probabilities of one token, by a full sort."""
    logits = router_weight @ x_D
    probs = torch.exp(logits - logits.max())
    probs = probs / probs.sum()
    ranked = sorted(range(len(probs)), key=lambda e: -probs[e].item())[:top_k]
    picked = torch.stack([probs[e] for e in ranked])
    weights = picked / picked.sum() if normalize else picked
    return ranked, weights, probs


def reference_moe(
    x_TD: Tensor,
    router_weight: Tensor,
    experts: dict[str, Tensor | None],
    shared: dict[str, Tensor | None] | None,
    top_k: int,
    activation: str,
    capacity_factor: float | None = None,
    normalize: bool = True,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """The MoE layer in float64, token by token.

    Returns:
        Output (T, D), Switch balance loss, z-loss, number of dropped assignments.
    """
    num_tokens = x_TD.shape[0]
    num_experts = router_weight.shape[0]
    choices = [topk_choices(router_weight, x_TD[t], top_k, normalize) for t in range(num_tokens)]
    kept = _kept_assignments(choices, num_experts, top_k, num_tokens, capacity_factor)
    rows = []
    for t in range(num_tokens):
        ranked, weights, _ = choices[t]
        out = torch.zeros_like(x_TD[t])
        for k, e in enumerate(ranked):
            if (t, e) in kept:
                out = out + weights[k] * expert_mlp(experts, e, x_TD[t], activation)
        if shared is not None:
            for s in range(shared["w1"].shape[0]):
                out = out + expert_mlp(shared, s, x_TD[t], activation)
        rows.append(out)
    output = torch.stack(rows) if rows else x_TD.new_zeros(0, x_TD.shape[1])
    aux, z = _losses(x_TD, router_weight, choices, num_experts)
    dropped = num_tokens * top_k - len(kept)
    return output, aux, z, dropped


def _kept_assignments(choices, num_experts, top_k, num_tokens, capacity_factor) -> set[tuple[int, int]]:
    every = {(t, e) for t, (ranked, _, _) in enumerate(choices) for e in ranked}
    if capacity_factor is None:
        return every
    capacity = math.ceil(capacity_factor * num_tokens * top_k / num_experts)
    kept = set()
    for e in range(num_experts):
        takers = [(-choices[t][2][e].item(), t) for t in range(num_tokens) if (t, e) in every]
        kept |= {(t, e) for _, t in sorted(takers)[:capacity]}
    return kept


def _losses(x_TD, router_weight, choices, num_experts) -> tuple[Tensor, Tensor]:
    num_tokens = x_TD.shape[0]
    if num_tokens == 0:
        zero = router_weight.sum() * 0
        return zero, zero
    counts = [0] * num_experts
    for ranked, _, _ in choices:
        for e in ranked:
            counts[e] += 1
    slots = sum(counts)
    aux = router_weight.sum() * 0
    z = router_weight.sum() * 0
    for e in range(num_experts):
        mean_prob = sum(choices[t][2][e] for t in range(num_tokens)) / num_tokens
        aux = aux + num_experts * (counts[e] / slots) * mean_prob
    for t in range(num_tokens):
        logits = router_weight @ x_TD[t]
        z = z + torch.log(torch.exp(logits).sum()) ** 2
    return aux, z / num_tokens
