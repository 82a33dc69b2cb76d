"""The hand-over of a gradient of the tokens between two autograd nodes (lightning_moe.ops.token_grad),
on the CPU: who may join a sum, and the gradients autograd gets in either order of the nodes.

Shape legend: T tokens, D model dim.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from lightning_moe.ops.token_grad import TokenGradSum, join_token_grad_sum, summing_token_grads


def test_only_the_tokens_themselves_join_once_while_the_sum_is_open() -> None:
    x_TD = torch.randn(6, 4, requires_grad=True)
    token_grads = TokenGradSum(x_TD)
    assert join_token_grad_sum(x_TD) is None  # no sum open
    with summing_token_grads(token_grads):
        assert join_token_grad_sum(x_TD * 1) is None  # a function of the tokens
        assert join_token_grad_sum(x_TD.t()) is None
        assert join_token_grad_sum(x_TD) is token_grads
        assert join_token_grad_sum(x_TD) is None  # joined already
    assert token_grads.joined
    late = TokenGradSum(x_TD)
    with summing_token_grads(late):
        pass
    assert not late.join(x_TD), "the tokens are released when the router call ends"


def test_a_non_contiguous_view_does_not_join() -> None:
    x_TD = torch.randn(4, 6).t()
    assert not TokenGradSum(x_TD).join(x_TD)


def test_a_gradient_is_taken_once_and_refused_once_the_sum_is_taken() -> None:
    token_grads = TokenGradSum(torch.zeros(2, 2))
    grad = torch.ones(2, 2)
    assert token_grads.give(grad)
    assert token_grads.take() is grad
    assert token_grads.take() is None
    assert not token_grads.give(grad), "the router's node has run: autograd must add this one"


class _Giver(torch.autograd.Function):
    """Stands for the experts' node: y = 3 x, handing its gradient of x over when it can."""

    handed_over: list[bool] = []

    @staticmethod
    def forward(ctx: Any, x: Tensor, token_grads: TokenGradSum) -> Tensor:
        ctx.token_grads = token_grads
        return 3 * x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        grad_x = 3 * grad
        _Giver.handed_over.append(ctx.token_grads.give(grad_x))
        return (None if _Giver.handed_over[-1] else grad_x), None


class _Taker(torch.autograd.Function):
    """Stands for the router's node: z = 2 x, adding what was handed over into its gradient of x."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, token_grads: TokenGradSum) -> Tensor:
        ctx.token_grads = token_grads
        return 2 * x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        handed_over = ctx.token_grads.take()
        grad_x = 2 * grad
        return (grad_x if handed_over is None else grad_x + handed_over), None


@pytest.mark.parametrize("taker_first", [True, False], ids=["router_made_first", "experts_made_first"])
def test_the_tokens_get_both_gradients_in_either_order_and_on_a_second_backward(
    taker_first: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_Giver, "handed_over", [])
    x = torch.randn(5, 3, requires_grad=True)
    token_grads = TokenGradSum(x)
    if taker_first:  # as in the layer: the giver runs first backward
        z = _Taker.apply(x, token_grads)
        y = _Giver.apply(x, token_grads)
    else:  # the taker runs first backward: nothing to add yet, and the giver's gradient is refused
        y = _Giver.apply(x, token_grads)
        z = _Taker.apply(x, token_grads)
    loss = (y * torch.arange(15.0).view(5, 3)).sum() + z.square().sum()
    expected = 3 * torch.arange(15.0).view(5, 3) + 2 * 2 * (2 * x.detach())
    (grad,) = torch.autograd.grad(loss, x, retain_graph=True)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    (again,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
    # Handed over only where the giver ran first, and only in the first backward.
    assert _Giver.handed_over == ([True, False] if taker_first else [False, False])
