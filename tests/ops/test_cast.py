"""ops.cast off the GPU: PyTorch's cast, values and gradient."""

from __future__ import annotations

import torch

from lightning_moe import ops


def test_cast_on_cpu_is_torch_cast_with_its_gradient() -> None:
    x = torch.randn(5, 7, dtype=torch.float32, requires_grad=True)
    y = ops.cast(x, torch.bfloat16)
    assert torch.equal(y, x.detach().to(torch.bfloat16))
    grad = torch.randn(5, 7).bfloat16()
    (grad_x,) = torch.autograd.grad(y, x, grad)
    assert grad_x.dtype == torch.float32 and torch.equal(grad_x, grad.float())
    assert ops.cast(x, torch.float32) is x


def test_fork_cast_on_cpu_gives_both_and_sums_their_gradients() -> None:
    x = torch.randn(5, 7, requires_grad=True)
    as_is, cast = ops.fork_cast(x, torch.bfloat16)
    assert torch.equal(as_is, x) and torch.equal(cast, x.detach().bfloat16())
    g1, g2 = torch.randn(5, 7), torch.randn(5, 7).bfloat16()
    (grad_x,) = torch.autograd.grad([as_is, cast], x, [g1, g2])
    assert torch.equal(grad_x, g1 + g2.float())
