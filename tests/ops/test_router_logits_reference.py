"""Router logits: float32 under any input dtype and autocast, without keeping a float32 copy."""

from __future__ import annotations

import importlib

import pytest
import torch

from lightning_moe.ops.router_logits import router_logits
from lightning_moe.routers import build_router

# The module, not the function that lightning_moe.ops exports under the same name.
logits_module = importlib.import_module("lightning_moe.ops.router_logits")


def test_gradients_match_float64_autograd() -> None:
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(router_logits, (x, weight))


def test_bfloat16_tokens_give_the_float32_product_and_gradients() -> None:
    x = torch.randn(9, 6).bfloat16().requires_grad_()
    weight = torch.randn(4, 6, requires_grad=True)
    grad = torch.randn(9, 4)
    logits = router_logits(x, weight)
    logits.backward(grad)
    x_ref = x.detach().float().requires_grad_()
    weight_ref = weight.detach().clone().requires_grad_()
    expected = x_ref @ weight_ref.t()
    expected.backward(grad)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad, x_ref.grad.bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(weight.grad, weight_ref.grad, rtol=0, atol=0)


def test_autocast_does_not_lower_the_precision() -> None:
    x = torch.randn(9, 6).bfloat16()
    weight = torch.randn(4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = router_logits(x, weight)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, x.float() @ weight.t(), rtol=0, atol=0)


@pytest.mark.parametrize("router", ["topk", "sigmoid", "gshard", "expert_choice"])
def test_no_float32_copy_of_the_tokens_is_kept_for_backward(router: str) -> None:
    num_tokens, d_model = 64, 32
    module = build_router(router, d_model, 8, 2)
    x = torch.randn(num_tokens, d_model).bfloat16().requires_grad_()
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append((tensor.dtype, tuple(tensor.shape)))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(x)
    assert (torch.float32, (num_tokens, d_model)) not in saved


def test_cpu_inputs_take_the_reference_function() -> None:
    x = torch.randn(9, 6).bfloat16().requires_grad_()
    logits = router_logits(x, torch.randn(4, 6, requires_grad=True))
    assert type(logits.grad_fn).__name__ == "_RouterLogitsBackward"


def test_inputs_the_kernels_accept_take_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def kernels(x_TD: torch.Tensor, weight_ED: torch.Tensor) -> torch.Tensor:
        calls.append((x_TD.shape, weight_ED.shape))
        return x_TD.float() @ weight_ED.t()

    monkeypatch.setattr(logits_module, "kernels_accept", lambda x_TD, weight_ED: True)
    monkeypatch.setattr(logits_module, "_kernel_router_logits", kernels)
    logits = router_logits(torch.randn(9, 6).bfloat16(), torch.randn(4, 6))
    assert calls == [((9, 6), (4, 6))] and logits.shape == (9, 4)
