"""The cast kernel (bfloat16 and float16 to float32) against PyTorch's ``x.float()``, bit for bit,
and :func:`lightning_moe.ops.cast` forward and backward, on a GPU."""

from __future__ import annotations

import pytest
import torch

from lightning_moe import ops
from lightning_moe.ops.cast import to_float
from tests.ops.gpu_checks import GPU_MARKS, poison_float_blocks

pytestmark = GPU_MARKS

NARROW = [torch.bfloat16, torch.float16]
NARROW_IDS = ["bfloat16", "float16"]
# Sizes around the kernel's 8-element vectors (the tail), one past a block of threads, and an
# expert weight stack.
SIZES = [0, 1, 7, 8, 9, 2047, 256 * 8 + 5, 8 * 1408 * 2048]


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
