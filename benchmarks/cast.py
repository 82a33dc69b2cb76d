"""The bfloat16 to float32 cast kernel against PyTorch's ``x.float()``, on one GPU.

For each shape it times (CUDA events, median of --iters calls) ``lightning_moe.ops.cast.to_float``
(``src_cuda/cast.cu``, the backward of ``lightning_moe.ops.cast``) and PyTorch's ``x.float()``, and
a float32 copy of the tensor as the memory-bound floor, and prints microseconds, the bandwidth
reached (bytes read and written over time) and PyTorch's time over ours.

    python benchmarks/cast.py [--iters 50]
"""

from __future__ import annotations

import argparse

import torch
from timing import time_ms

from lightning_moe.ops.cast import to_float

# An expert weight stack of the large GPT of gpt_train.py (8 experts, 4096 x 1024), one of
# moe_layer.py's config 5 (64 experts), and the tokens of a large GPT batch (16384 x 1024).
SHAPES = ((8, 4096, 1024), (64, 4096, 1024), (16384, 1024))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    header = f"{'shape':<18}{'copy us':>9}{'TB/s':>7}{'ours us':>9}{'TB/s':>7}{'torch us':>10}{'TB/s':>7}"
    print(f"{header}{'torch/ours':>12}")
    for shape in SHAPES:
        x = torch.randn(shape, device="cuda")
        narrow = x.bfloat16()
        moved = x.numel() * (2 + 4) / 1e6  # MB read and written by a cast
        copy_us = time_ms(x.clone, args.iters) * 1e3
        ours_us = time_ms(lambda narrow=narrow: to_float(narrow), args.iters) * 1e3
        torch_us = time_ms(narrow.float, args.iters) * 1e3
        print(
            f"{str(shape):<18}{copy_us:>9.1f}{x.numel() * 8 / 1e6 / copy_us:>7.2f}{ours_us:>9.1f}"
            f"{moved / ours_us:>7.2f}{torch_us:>10.1f}{moved / torch_us:>7.2f}{torch_us / ours_us:>12.2f}"
        )


if __name__ == "__main__":
    main()
