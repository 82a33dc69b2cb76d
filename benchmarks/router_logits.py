"""Router logits, forward + backward, bf16 tokens, on one GPU: the CUDA kernels against PyTorch.

Shape legend: T tokens, D model dim, E experts.

For each config (T, D, E) it times, with CUDA events (warm-up, then the median of --iters), the
forward alone and forward + backward (both gradients, returned by ``torch.autograd.grad`` so that
no accumulation is timed) of

- kernels: ``lightning_moe.ops.router_logits`` (``src_cuda/router_logits.cu``);
- reference: ``lightning_moe.ops.reference.router_logits``, i.e. ``x.float() @ w.t()``
  forward and float32 copies of x again in the backward, what routers ran before the kernels;

and prints both, the speed-up of forward + backward, and the largest difference between the two
logits relative to their largest magnitude.

    python benchmarks/router_logits.py [--iters 20]
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

import torch
from timing import time_ms
from torch import Tensor

from lightning_moe import ops
from lightning_moe.ops.reference import router_logits as reference_router_logits

CONFIGS = [(16384, 1024, 8), (16384, 2048, 64), (8192, 1024, 64), (16384, 1024, 1), (32768, 4096, 8)]


def forward_backward(
    function: Callable[[Tensor, Tensor], Tensor], x_TD: Tensor, weight_ED: Tensor, grad_TE: Tensor
) -> tuple[Tensor, ...]:
    logits = function(x_TD, weight_ED)
    return torch.autograd.grad(logits, (x_TD, weight_ED), grad_TE)


def measure(num_tokens: int, dim: int, num_experts: int, iters: int, generator: torch.Generator) -> str:
    """One row of the table for the config (T, D, E)."""
    x_TD = torch.randn(num_tokens, dim, device="cuda", generator=generator).bfloat16().requires_grad_()
    weight_ED = (torch.randn(num_experts, dim, device="cuda", generator=generator) / dim**0.5).requires_grad_()
    grad_TE = torch.randn(num_tokens, num_experts, device="cuda", generator=generator)
    times = []
    for function in (ops.router_logits, reference_router_logits):
        times.append(time_ms(functools.partial(function, x_TD, weight_ED), iters))
        times.append(time_ms(functools.partial(forward_backward, function, x_TD, weight_ED, grad_TE), iters))
    kernel_forward, kernel_both, torch_forward, torch_both = times
    with torch.no_grad():
        expected = reference_router_logits(x_TD, weight_ED)
        difference = (ops.router_logits(x_TD, weight_ED) - expected).abs().max() / expected.abs().max()
    config = f"{num_tokens}, {dim}, {num_experts}"
    return (
        f"{config:>20} | {kernel_forward:8.3f} {torch_forward:8.3f} | {kernel_both:10.3f} {torch_both:10.3f} | "
        f"{torch_both / kernel_both:7.2f}x | {difference.item():.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20, help="timed iterations; the median is printed")
    args = parser.parse_args()
    assert ops.load_extension() is not None, "the CUDA extension did not build; see the warning"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 tokens, float32 weight")
    print(f"{'T, D, E':>20} | {'forward ms':>17} | {'forward + backward ms':>21} | {'speed-up':>8} | max rel diff")
    print(f"{'':>20} | {'kernels':>8} {'torch':>8} | {'kernels':>10} {'torch':>10} | {'':>8} |")
    generator = torch.Generator(device="cuda").manual_seed(0)
    for num_tokens, dim, num_experts in CONFIGS:
        print(measure(num_tokens, dim, num_experts, args.iters, generator), flush=True)


if __name__ == "__main__":
    main()
