"""The cast kernel (bfloat16 and float16 to float32) against PyTorch's ``x.float()``, bit for bit,
and :func:`lightning_moe.ops.cast` forward and backward, on a GPU."""

from __future__ import annotations

import pytest
import torch

from lightning_moe import MoE, ops
from lightning_moe.ops.cast import _ForkCastFunction, to_float
from tests.ops.gpu_checks import GPU_MARKS, poison_float_blocks

pytestmark = GPU_MARKS

NARROW = [torch.bfloat16, torch.float16]
NARROW_IDS = ["bfloat16", "float16"]
# Sizes around the kernel's 8-element vectors (the tail), one past a block of threads, and an
# expert weight stack.
SIZES = [0, 1, 7, 8, 9, 2047, 256 * 8 + 5, 8 * 1408 * 2048]


def assert_same_floats(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal bits, NaNs only matching as NaNs (an addition's NaN payload is the hardware's)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))


def random_bits(size: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Every 16-bit pattern equally likely: normal, subnormal, zero, infinite and NaN values alike."""
    bits = torch.randint(-(2**15), 2**15, (size,), generator=generator, dtype=torch.int16)
    return bits.cuda().view(dtype)


@pytest.mark.parametrize("dtype", NARROW, ids=NARROW_IDS)
@pytest.mark.parametrize("size", SIZES)
def test_kernel_gives_the_bits_of_torch(size: int, dtype: torch.dtype, generator: torch.Generator) -> None:
    x = random_bits(size, dtype, generator)
    poison_float_blocks()
    got = ops.load_extension().cast_to_float(x)
    want = x.float()
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("dtype", NARROW, ids=NARROW_IDS)
@pytest.mark.parametrize("size", SIZES)
def test_kernel_adds_as_torch_adds(size: int, dtype: torch.dtype, generator: torch.Generator) -> None:
    x = random_bits(size, dtype, generator)
    addend = torch.randn(size, generator=generator).mul(100.0).cuda()
    poison_float_blocks()
    got = ops.load_extension().cast_to_float(x, addend)
    assert_same_floats(got, addend + x.float())


@pytest.mark.parametrize("dtype", NARROW, ids=NARROW_IDS)
def test_cast_forward_and_gradient_are_torch_cast(dtype: torch.dtype, generator: torch.Generator) -> None:
    x = torch.randn(8, 1408, 257, generator=generator).cuda().requires_grad_()
    y = ops.cast(x, dtype)
    assert y.dtype == dtype and torch.equal(y, x.detach().to(dtype))
    grad = torch.randn(y.shape, generator=generator).to("cuda", dtype)
    poison_float_blocks()
    (grad_x,) = torch.autograd.grad(y, x, grad)
    assert grad_x.dtype == torch.float32 and torch.equal(grad_x, grad.float())


@pytest.mark.parametrize("layout", ["misaligned_view", "strided", "float32"])
def test_to_float_takes_what_the_kernel_does_not(layout: str, generator: torch.Generator) -> None:
    base = torch.randn(4, 33, generator=generator).cuda()
    x = {
        "misaligned_view": base.bfloat16().flatten()[1:],  # 2 bytes past a 16-byte boundary
        "strided": base.bfloat16().t(),
        "float32": base,
    }[layout]
    assert torch.equal(to_float(x), x.float())


def test_the_kernel_refuses_a_misaligned_start() -> None:
    x = torch.randn(33, device="cuda").bfloat16()[1:]
    with pytest.raises(RuntimeError, match="16-byte boundary"):
        ops.load_extension().cast_to_float(x)


@pytest.mark.parametrize("used", ["both", "as_is", "cast"])
def test_fork_cast_sums_the_gradients_as_autograd_does(used: str, generator: torch.Generator) -> None:
    x = torch.randn(300, 1024, generator=generator).cuda().requires_grad_()
    as_is, cast = ops.fork_cast(x, torch.bfloat16)
    assert torch.equal(as_is, x) and torch.equal(cast, x.detach().bfloat16())
    grads = [torch.randn(x.shape, generator=generator).cuda(), torch.randn(x.shape, generator=generator).cuda()]
    grads[1] = grads[1].bfloat16()
    outputs, reference_outputs = [as_is, cast], [x, x.to(torch.bfloat16)]
    keep = {"both": [0, 1], "as_is": [0], "cast": [1]}[used]
    poison_float_blocks()
    (got,) = torch.autograd.grad([outputs[i] for i in keep], x, [grads[i] for i in keep])
    (want,) = torch.autograd.grad([reference_outputs[i] for i in keep], x, [grads[i] for i in keep])
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_layer_under_autocast_forks_the_tokens_and_gets_the_same_gradients(monkeypatch, generator) -> None:
    torch.manual_seed(0)
    layer = MoE(256, 8, top_k=2, d_hidden=512).cuda()
    x = torch.randn(4, 128, 256, generator=generator).cuda()
    grad = torch.randn(x.shape, generator=generator).cuda()
    calls = []
    fork = _ForkCastFunction.apply
    monkeypatch.setattr(_ForkCastFunction, "apply", lambda *a: calls.append(1) or fork(*a))
    results = []
    for forked in (True, False):
        if not forked:  # the two consumers as autograd sees them without the fork: a cast, then an add
            monkeypatch.setattr(ops, "fork_cast", lambda t, dtype: (t, t.to(dtype)))
        x_in = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(x_in)
        results.append(torch.autograd.grad(out, [x_in, layer.router.weight, layer.experts.w1], grad))
    assert calls == [1]
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", NARROW, ids=NARROW_IDS)
@pytest.mark.parametrize("size", SIZES)
def test_square_sums_are_those_of_the_cast(size: int, dtype: torch.dtype, generator: torch.Generator) -> None:
    x = (torch.randn(size, generator=generator) * 3.0).cuda().to(dtype)
    poison_float_blocks()
    got, partials = ops.load_extension().cast_to_float_square_sums(x)
    assert torch.equal(got.view(torch.int32), x.float().view(torch.int32))
    assert partials.dtype == torch.float32 and partials.dim() == 1 and not partials.isnan().any()
    oracle = x.double().square().sum()
    torch_error = (x.float().square().sum().double() - oracle).abs()
    assert (partials.double().sum() - oracle).abs() <= 2 * torch_error + 1e-6 * oracle
    again = ops.load_extension().cast_to_float_square_sums(x)[1]
    assert torch.equal(again, partials)  # the same bits on every run


def test_clipping_norm_from_the_kept_casts_square_sums_is_the_gradients_norm() -> None:
    from lightning_moe.ops.cast import _KEPT_CASTS, gradient_norm
    from lightning_moe.optim import AdamW

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), MoE(256, 8, top_k=2, d_hidden=512)).cuda()
    AdamW(model.parameters())  # registers the weights' kept casts
    x = torch.randn(1024, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x).float().square().mean()
    loss.backward()
    experts = model[1].experts
    assert all(_KEPT_CASTS[w].gradient_square_sums(w) is not None for w in (experts.w1, experts.w2))
    params = list(model.parameters())
    want = torch.nn.utils.get_total_norm([p.grad for p in params]).double()
    oracle = torch.cat([p.grad.double().flatten() for p in params]).norm()
    assert (gradient_norm(params).double() - oracle).abs() <= 2 * (want - oracle).abs() + 1e-6 * oracle
