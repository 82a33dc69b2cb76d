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

With ``--passes`` it times instead each pass alone (forward, grad_x, grad_weight, in microseconds)
on the SIMT kernels (``src_cuda/router_logits*.cu``) and on the one-launch tensor-core kernels
(``src_cuda/router_logits_tc.cu``), and forward + backward through ``router_logits`` with
``TENSOR_CORE_ROUTER`` off and on, for the configs the tensor-core kernels take. ``--staged``
runs the tensor-core forward's 32-expert blocks and grad_weight register-staged rather than
pipelined, and grad_x one block per output tile (``PIPELINED_TC_ROUTER`` and
``PERSISTENT_TC_GRAD_X`` off).

    python benchmarks/router_logits.py [--iters 20] [--passes [--staged]]
"""

from __future__ import annotations

import argparse
import functools
import importlib
from collections.abc import Callable

import torch
from timing import time_ms
from torch import Tensor

from lightning_moe import ops
from lightning_moe.ops.extension import require_extension
from lightning_moe.ops.reference import router_logits as reference_router_logits

# The module, not the function of the same name that lightning_moe.ops exports.
router_logits_module = importlib.import_module("lightning_moe.ops.router_logits")

CONFIGS = [(16384, 1024, 8), (16384, 2048, 64), (8192, 1024, 64), (16384, 1024, 1), (32768, 4096, 8)]
# The --passes table: the mid-size routers the tensor-core kernels are for, and both ends.
PASS_CONFIGS = [
    (8192, 1024, 64),
    (4096, 1024, 64),
    (16384, 1024, 64),
    (16384, 2048, 64),
    (16384, 1024, 8),
    (8192, 2048, 128),
    (8192, 1024, 256),
    (1024, 1024, 64),
]


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


def measure_passes(num_tokens: int, dim: int, num_experts: int, iters: int, generator: torch.Generator) -> str:
    """One row of the --passes table: each pass alone in microseconds, SIMT kernels then tensor cores,
    and forward + backward through router_logits with TENSOR_CORE_ROUTER off and on."""
    x_TD = torch.randn(num_tokens, dim, device="cuda", generator=generator).bfloat16().requires_grad_()
    weight_ED = (torch.randn(num_experts, dim, device="cuda", generator=generator) / dim**0.5).requires_grad_()
    grad_TE = torch.randn(num_tokens, num_experts, device="cuda", generator=generator)
    config = f"{num_tokens}, {dim}, {num_experts}"
    if not router_logits_module.tensor_core_accepts(x_TD, weight_ED):
        return f"{config:>20} | the tensor-core kernels do not take it"
    ext, x, weight = require_extension(), x_TD.detach(), weight_ED.detach()
    passes = [
        (
            lambda: ext.router_logits_forward(x, weight),
            lambda: ext.router_logits_tc_forward(x, weight, router_logits_module.PIPELINED_TC_ROUTER),
        ),
        (
            lambda: ext.router_logits_grad_x(grad_TE, weight, torch.bfloat16),
            lambda: ext.router_logits_tc_grad_x(grad_TE, weight, router_logits_module.PERSISTENT_TC_GRAD_X),
        ),
        (
            lambda: ext.router_logits_grad_weight(grad_TE, x),
            lambda: ext.router_logits_tc_grad_weight(grad_TE, x, router_logits_module.PIPELINED_TC_ROUTER),
        ),
    ]
    cells = [f"{1000 * time_ms(simt, iters):6.1f} {1000 * time_ms(tc, iters):6.1f}" for simt, tc in passes]
    both, default = [], router_logits_module.TENSOR_CORE_ROUTER
    for enabled in (False, True):
        router_logits_module.TENSOR_CORE_ROUTER = enabled
        both.append(time_ms(functools.partial(forward_backward, ops.router_logits, x_TD, weight_ED, grad_TE), iters))
    router_logits_module.TENSOR_CORE_ROUTER = default
    return f"{config:>20} | {' | '.join(cells)} | {1000 * both[0]:8.1f} {1000 * both[1]:8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20, help="timed iterations; the median is printed")
    parser.add_argument("--passes", action="store_true", help="time each pass alone, SIMT against tensor cores")
    parser.add_argument(
        "--staged", action="store_true", help="the tensor-core forward and grad_x as before their pipelining"
    )
    args = parser.parse_args()
    assert ops.load_extension() is not None, "the CUDA extension did not build; see the warning"
    router_logits_module.PIPELINED_TC_ROUTER = router_logits_module.PERSISTENT_TC_GRAD_X = not args.staged
    if args.passes:
        main_passes(args.iters)
        return
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 tokens, float32 weight")
    print(f"{'T, D, E':>20} | {'forward ms':>17} | {'forward + backward ms':>21} | {'speed-up':>8} | max rel diff")
    print(f"{'':>20} | {'kernels':>8} {'torch':>8} | {'kernels':>10} {'torch':>10} | {'':>8} |")
    generator = torch.Generator(device="cuda").manual_seed(0)
    for num_tokens, dim, num_experts in CONFIGS:
        print(measure(num_tokens, dim, num_experts, args.iters, generator), flush=True)


def main_passes(iters: int) -> None:
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 tokens, float32 weight; "
        "microseconds, SIMT kernels | tensor cores"
    )
    print(f"{'T, D, E':>20} | {'forward':>13} | {'grad_x':>13} | {'grad_weight':>13} | {'fwd + bwd, tc off / on':>17}")
    generator = torch.Generator(device="cuda").manual_seed(0)
    for num_tokens, dim, num_experts in PASS_CONFIGS:
        print(measure_passes(num_tokens, dim, num_experts, iters, generator), flush=True)


if __name__ == "__main__":
    main()
