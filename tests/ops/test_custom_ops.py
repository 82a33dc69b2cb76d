"""The torch.library registrations: every op has a fake (meta) implementation for torch.compile."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import lightning_moe.ops  # noqa: F401  (registers the ops)


def test_fake_implementations_give_the_output_shapes() -> None:
    num_tokens, dim, assignments, experts = 5, 8, 9, 4
    with FakeTensorMode():
        x = torch.empty(num_tokens, dim, dtype=torch.bfloat16)
        ids = torch.empty(assignments, dtype=torch.int64)
        offsets = torch.empty(num_tokens + 1, dtype=torch.int64)
        weights = torch.empty(assignments)
        order, inverse, counts = torch.ops.lightning_moe.sort_by_expert(ids, experts)
        kept = torch.ops.lightning_moe.capacity_mask(ids, weights, experts, 2)
        x_sorted = torch.ops.lightning_moe.permute(x, inverse, offsets)
        grad_x = torch.ops.lightning_moe.permute_backward(x_sorted, inverse, offsets, torch.bfloat16)
        out = torch.ops.lightning_moe.unpermute(x_sorted, inverse, weights, offsets, torch.float32)
        grad_y, grad_w = torch.ops.lightning_moe.unpermute_backward(out, x_sorted, inverse, weights, offsets)
    assert order.shape == inverse.shape == (assignments,) and counts.shape == (experts,)
    assert kept.shape == (assignments,) and kept.dtype == torch.bool
    assert x_sorted.shape == (assignments, dim) and x_sorted.dtype == torch.bfloat16
    assert grad_x.shape == (num_tokens, dim) and grad_x.dtype == torch.bfloat16
    assert out.shape == (num_tokens, dim) and out.dtype == torch.float32
    assert grad_y.shape == (assignments, dim) and grad_y.dtype == torch.bfloat16
    assert grad_w.shape == (assignments,) and grad_w.dtype == torch.float32


def test_fake_implementations_of_topk_route() -> None:
    num_tokens, experts, top_k = 5, 6, 2
    with FakeTensorMode():
        logits = torch.empty(num_tokens, experts)
        bias = torch.empty(experts)
        outputs = torch.ops.lightning_moe.topk_route(logits, top_k, "sigmoid", True, bias)
        expert_ids, weights, priorities, counts, prob_sum, lse_sq_sum, balance_loss, z_loss = outputs
        grad_logits = torch.ops.lightning_moe.topk_route_backward(
            weights, prob_sum, lse_sq_sum, logits, expert_ids, "sigmoid", True
        )
        # The losses' sums may have no gradient: the kernel then counts theirs as zeros.
        grad_without_losses = torch.ops.lightning_moe.topk_route_backward(
            weights, None, None, logits, expert_ids, "sigmoid", True
        )
    assert grad_without_losses.shape == grad_logits.shape
    assert expert_ids.shape == weights.shape == priorities.shape == (num_tokens, top_k)
    assert expert_ids.dtype == counts.dtype == torch.int64
    assert weights.dtype == priorities.dtype == prob_sum.dtype == lse_sq_sum.dtype == torch.float32
    assert counts.shape == prob_sum.shape == (experts,) and lse_sq_sum.shape == ()
    assert balance_loss.shape == z_loss.shape == () and balance_loss.dtype == z_loss.dtype == torch.float32
    assert grad_logits.shape == (num_tokens, experts) and grad_logits.dtype == torch.float32


def test_fake_implementations_of_router_logits() -> None:
    num_tokens, dim, experts = 5, 12, 3
    with FakeTensorMode():
        x = torch.empty(num_tokens, dim, dtype=torch.bfloat16)
        weight = torch.empty(experts, dim)
        logits = torch.ops.lightning_moe.router_logits(x, weight)
        grad_x = torch.ops.lightning_moe.router_logits_grad_x(logits, weight, torch.bfloat16)
        grad_weight = torch.ops.lightning_moe.router_logits_grad_weight(logits, x)
    assert logits.shape == (num_tokens, experts) and logits.dtype == torch.float32
    assert grad_x.shape == (num_tokens, dim) and grad_x.dtype == torch.bfloat16
    assert grad_weight.shape == (experts, dim) and grad_weight.dtype == torch.float32


def test_fake_implementations_of_the_activation() -> None:
    rows, hidden = 5, 12
    with FakeTensorMode():
        a = torch.empty(rows, hidden, dtype=torch.bfloat16)
        b = torch.empty(rows, hidden, dtype=torch.bfloat16)
        h = torch.ops.lightning_moe.activation(a, b, "silu")
        grad_a, grad_b = torch.ops.lightning_moe.activation_backward(h, a, b, "gelu")
        plain = torch.ops.lightning_moe.activation(a, None, "relu")
        grad_plain, no_gate = torch.ops.lightning_moe.activation_backward(h, a, None, "relu")
    for out in (h, grad_a, grad_b, plain, grad_plain):
        assert out.shape == (rows, hidden) and out.dtype == torch.bfloat16
    assert no_gate.shape == (0,)


def test_fake_implementations_of_the_grouped_linear() -> None:
    rows, experts, d_in, d_out = 9, 3, 64, 128
    with FakeTensorMode():
        x = torch.empty(rows, d_in, dtype=torch.bfloat16)
        w = torch.empty(experts, d_out, d_in, dtype=torch.bfloat16)
        ends = torch.empty(experts, dtype=torch.int32)
        y = torch.ops.lightning_moe.grouped_linear(x, w, ends)
        grad_x = torch.ops.lightning_moe.grouped_linear_input_grad(y, w, ends)
    assert y.shape == (rows, d_out) and y.dtype == torch.bfloat16
    assert grad_x.shape == (rows, d_in) and grad_x.dtype == torch.bfloat16
