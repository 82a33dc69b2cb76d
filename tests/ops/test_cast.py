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


def test_a_kept_cast_is_reused_until_the_parameter_changes() -> None:
    # _KeptCast is what ops.cast consults for parameters registered with keep_casts (on CUDA);
    # its rules hold on any device.
    from lightning_moe.ops.cast import _KeptCast

    w = torch.nn.Parameter(torch.randn(4, 6))
    kept = _KeptCast()
    first = kept.cast(w, torch.bfloat16)
    assert torch.equal(first, w.detach().bfloat16())
    again = kept.cast(w, torch.bfloat16)
    assert again.data_ptr() == first.data_ptr()  # the kept copy, not a new cast
    grad = torch.randn(4, 6).bfloat16()
    (grad_w,) = torch.autograd.grad(again, w, grad)
    assert grad_w.dtype == torch.float32 and torch.equal(grad_w, grad.float())

    with torch.no_grad():
        w.mul_(2)  # an in-place change bumps the version: cast afresh
    changed = kept.cast(w, torch.bfloat16)
    assert changed.data_ptr() != first.data_ptr() and torch.equal(changed, w.detach().bfloat16())

    w.data = torch.randn(4, 6)  # new storage, same version: cast afresh
    replaced = kept.cast(w, torch.bfloat16)
    assert torch.equal(replaced, w.detach().bfloat16())
    assert kept.cast(w, torch.float16).dtype == torch.float16  # another dtype: cast afresh


def test_kept_casts_are_offered_to_the_optimizer_and_forgotten_on_request() -> None:
    from lightning_moe.ops.cast import _KEPT_CASTS, forget_casts, keep_casts, kept_cast, mark_casts_current

    w = torch.nn.Parameter(torch.randn(3, 5))
    assert kept_cast(w) is None  # not registered
    keep_casts([w])
    assert kept_cast(w) is None  # registered, nothing cast yet
    copy = _KEPT_CASTS[w].cast(w, torch.bfloat16)
    assert kept_cast(w).data_ptr() == copy.data_ptr()
    with torch.no_grad():  # what an optimizer step does: update both, then mark them current
        w.add_(1.0)
        kept_cast(w).copy_(w)
    mark_casts_current([w])
    assert _KEPT_CASTS[w].cast(w, torch.bfloat16).data_ptr() == copy.data_ptr()
    forget_casts([w])
    assert kept_cast(w) is None
    assert torch.equal(_KEPT_CASTS[w].cast(w, torch.bfloat16), w.detach().bfloat16())


def test_the_gradient_norm_takes_the_square_sums_of_the_kept_casts_backward() -> None:
    from lightning_moe.ops.cast import _KEPT_CASTS, gradient_norm, keep_casts

    kept, plain = torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(7))
    keep_casts([kept])
    loss = (_KEPT_CASTS[kept].cast(kept, torch.bfloat16).float() * torch.randn(6, 5)).sum() + plain.square().sum()
    loss.backward()
    assert _KEPT_CASTS[kept].gradient_square_sums(kept) is not None  # the backward's sums are current
    want = torch.nn.utils.get_total_norm([kept.grad, plain.grad])
    torch.testing.assert_close(gradient_norm([kept, plain]), want, rtol=1e-6, atol=0)

    kept.grad.mul_(3.0)  # an in-place change of the gradient voids the sums
    assert _KEPT_CASTS[kept].gradient_square_sums(kept) is None
    torch.testing.assert_close(gradient_norm([kept, plain]), torch.nn.utils.get_total_norm([kept.grad, plain.grad]))

    # A second backward accumulates into the gradient in place: its sums no longer describe it.
    kept.grad = None
    for _ in range(2):
        (_KEPT_CASTS[kept].cast(kept, torch.bfloat16).float() * torch.randn(6, 5)).sum().backward()
    assert _KEPT_CASTS[kept].gradient_square_sums(kept) is None
    torch.testing.assert_close(gradient_norm([kept]), kept.grad.norm())

    kept.grad = None
    (_KEPT_CASTS[kept].cast(kept, torch.bfloat16).float().sum()).backward()
    with torch.no_grad():
        kept.add_(1.0)  # an optimizer step: the sums were of the previous step's gradient
    assert _KEPT_CASTS[kept].gradient_square_sums(kept) is None
