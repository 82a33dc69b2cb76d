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
        x_sorted = torch.ops.lightning_moe.permute(x, inverse, offsets)
        grad_x = torch.ops.lightning_moe.permute_backward(x_sorted, inverse, offsets, torch.bfloat16)
        out = torch.ops.lightning_moe.unpermute(x_sorted, inverse, weights, offsets, torch.float32)
        grad_y, grad_w = torch.ops.lightning_moe.unpermute_backward(out, x_sorted, inverse, weights, offsets)
    assert order.shape == inverse.shape == (assignments,) and counts.shape == (experts,)
    assert x_sorted.shape == (assignments, dim) and x_sorted.dtype == torch.bfloat16
    assert grad_x.shape == (num_tokens, dim) and grad_x.dtype == torch.bfloat16
    assert out.shape == (num_tokens, dim) and out.dtype == torch.float32
    assert grad_y.shape == (assignments, dim) and grad_y.dtype == torch.bfloat16
    assert grad_w.shape == (assignments,) and grad_w.dtype == torch.float32
