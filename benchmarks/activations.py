"""The experts' activation kernels against PyTorch's, bf16, on one GPU: time and memory bandwidth.

Shape legend: N rows (assignments), F expert hidden dim.

For each (N, F) it times with CUDA events (warm-up, then the mean of --iters calls) the forward and
the backward of ``lightning_moe.ops.activation`` (``src_cuda/activation.cu``) and of PyTorch's
``F.gelu`` / ``F.silu`` and their backward ops, plus a copy of one tensor as the memory-bound
floor, and prints microseconds, the bandwidth they reach (bytes read and written over time) and
PyTorch's time over ours.

    python benchmarks/activations.py [--iters 20]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_moe.ops.extension import require_extension

# (N, F) of the hidden activations of moe_layer.py's configs 1 and 4: T * K rows of F columns.
SHAPES = ((32768, 4096), (98304, 1408))


def mean_us(function: Callable[[], object], iters: int) -> float:
    for _ in range(3):
        function()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        function()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3


def rows(a: Tensor, grad: Tensor) -> list[tuple[str, int, Callable[[], object], Callable[[], object]]]:
    """(pass, tensors moved, ours, PyTorch's) for each pass compared."""
    kernels = require_extension()
    return [
        ("gelu forward", 2, lambda: kernels.activation_forward(a, None, "gelu"), lambda: F.gelu(a)),
        (
            "gelu backward",
            3,
            lambda: kernels.activation_backward(grad, a, None, "gelu"),
            lambda: torch.ops.aten.gelu_backward(grad, a),
        ),
        ("silu forward", 2, lambda: kernels.activation_forward(a, None, "silu"), lambda: F.silu(a)),
        (
            "silu backward",
            3,
            lambda: kernels.activation_backward(grad, a, None, "silu"),
            lambda: torch.ops.aten.silu_backward(grad, a),
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    print(f"{'(N, F)':<15}{'pass':<15}{'ours us':>9}{'TB/s':>7}{'torch us':>10}{'TB/s':>7}{'torch/ours':>12}")
    for shape in SHAPES:
        a = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        grad = torch.randn_like(a)
        tensor_bytes = a.numel() * a.element_size()
        copy_us = mean_us(a.clone, args.iters)
        print(f"{str(shape):<15}{'copy (floor)':<15}{copy_us:>9.1f}{2 * tensor_bytes / copy_us / 1e6:>7.2f}")
        for name, tensors, ours, theirs in rows(a, grad):
            ours_us, theirs_us = mean_us(ours, args.iters), mean_us(theirs, args.iters)
            moved = tensors * tensor_bytes / 1e6
            print(
                f"{str(shape):<15}{name:<15}{ours_us:>9.1f}{moved / ours_us:>7.2f}"
                f"{theirs_us:>10.1f}{moved / theirs_us:>7.2f}{theirs_us / ours_us:>12.2f}"
            )


if __name__ == "__main__":
    main()
