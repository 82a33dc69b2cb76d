"""The host time of one MoE layer step's Python and autograd on the CUDA path, measured on a CPU.

    PYTHONPATH=. python benchmarks/host_overhead.py [--experts 64 --top-k 1 --aux-loss-weight 0]

Where experts get a hundred-odd rows each, the host takes about as long to issue a layer's step as
the GPU takes to run it (docs/performance.md), so the layer's Python and autograd overhead sets
its speed. This script runs the layer's CUDA path (the routing op, the sort, the expert GEMMs, the
permutation and combine, through the same wrappers and autograd nodes) on CPU tensors, with every
call into the CUDA extension replaced by an allocation of its output, and prints the median host
microseconds of a forward + backward. The kernels called are the same whatever the Python around
them, so the difference between two source trees is the difference in their overhead, measured
without a GPU. Run it once per tree, alternating, a few times each:

    for tree in ../base .; do PYTHONPATH=$tree python benchmarks/host_overhead.py; done

The stand-ins bypass the checks that need a GPU (device, compute capability, SM count) in
``lightning_moe.ops``; they follow its internal names, so a renamed internal breaks this script,
not the library. On a GPU machine's CPU the times are larger (its launches cost several
microseconds each, which no stand-in here pays) but their difference is what to compare.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from typing import Any

import torch
from torch import Tensor

import lightning_moe.ops
from benchmarks.moe_layer import training_step
from lightning_moe import MoE

WARMUP_STEPS = 50


def _empty(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.empty(*shape, dtype=dtype)


def stand_in_extension(expert_ids_TK: Tensor, num_experts: int) -> types.SimpleNamespace:
    """The extension's functions that a step of the layer calls, each returning an uninitialised
    output of the right shape and dtype; the routing returns ``expert_ids_TK`` and its sort."""
    num_tokens, top_k = expert_ids_TK.shape
    flat = expert_ids_TK.reshape(-1)
    order = torch.argsort(flat, stable=True)
    inverse = order.argsort()
    counts = torch.bincount(flat, minlength=num_experts)
    route_outputs = len(lightning_moe.ops.TopKRoute._fields)  # the op's outputs in the tree measured

    def topk_route_forward(logits: Tensor, *_: Any) -> tuple[Tensor, ...]:
        picks = (expert_ids_TK, _empty(num_tokens, top_k), _empty(num_tokens, top_k), counts)
        sums = (_empty(num_experts), *(_empty(()) for _ in range(route_outputs - 5)))
        return picks + sums

    def activation_backward(grad: Tensor, a: Tensor, gate: Tensor | None, name: str) -> tuple[Tensor, Tensor | None]:
        return torch.empty_like(a), None if gate is None else torch.empty_like(gate)

    return types.SimpleNamespace(
        router_logits_forward=lambda x, w: _empty(x.shape[0], w.shape[0]),
        router_logits_grad_x=lambda g, w, dtype: _empty(g.shape[0], w.shape[1], dtype=dtype),
        router_logits_grad_weight=lambda g, x: _empty(g.shape[1], x.shape[1]),
        router_logits_tc_forward=lambda x, w, *_: _empty(x.shape[0], w.shape[0]),
        router_logits_tc_grad_x=lambda g, w, *_: _empty(g.shape[0], w.shape[1], dtype=torch.bfloat16),
        router_logits_tc_grad_weight=lambda g, x, *_: _empty(g.shape[1], x.shape[1]),
        topk_route_forward=topk_route_forward,
        topk_route_backward=lambda *_: _empty(num_tokens, num_experts),
        sort_by_expert=lambda ids, n: (order, inverse, counts, counts.cumsum(0).int()),
        permute_forward=lambda x, inverse, offsets: _empty(inverse.shape[0], x.shape[1], dtype=x.dtype),
        permute_backward=lambda g, inverse, offsets, dtype: _empty(offsets.shape[0] - 1, g.shape[1], dtype=dtype),
        unpermute_forward=lambda y, inverse, w, offsets, dtype: _empty(offsets.shape[0] - 1, y.shape[1], dtype=dtype),
        unpermute_backward=lambda g, y, inverse, w, offsets: (torch.empty_like(y), torch.empty_like(w)),
        activation_forward=lambda a, gate, name: torch.empty_like(a),
        activation_backward=activation_backward,
        grouped_gemm_available=lambda: True,
        grouped_gemm_rows=lambda a, b, ends, kn, *_: _empty(a.shape[0], b.shape[2 if kn else 1], dtype=a.dtype),
        grouped_gemm_weight_grad=lambda g, x, ends, *_: _empty(ends.shape[0], g.shape[1], x.shape[1], dtype=g.dtype),
        grouped_gemm_rows_to_tokens=lambda a, b, *_: _empty(a.shape[0], b.shape[2], dtype=a.dtype),
        grouped_gemm_rows_and_combine=lambda a, b, *_: (
            _empty(a.shape[0], b.shape[1], dtype=a.dtype),
            _empty(a.shape[0], b.shape[1], dtype=a.dtype),
        ),
    )


def _recording(extension: types.SimpleNamespace, called: set[str]) -> types.SimpleNamespace:
    """``extension`` with each function adding its name to ``called`` when called."""

    def recorded(name: str, function: Any) -> Any:
        def call(*args: Any) -> Any:
            called.add(name)
            return function(*args)

        return call

    return types.SimpleNamespace(**{name: recorded(name, f) for name, f in vars(extension).items()})


def take_the_cuda_path(extension: types.SimpleNamespace) -> None:
    """Point every op of ``lightning_moe.ops`` at ``extension`` for CPU tensors."""

    def always(*args: Any, **kwargs: Any) -> bool:
        return True

    modules = [module for name, module in sys.modules.items() if name.startswith("lightning_moe") and module]
    for module in modules:
        for gate in ("use_cuda_kernels", "grouped_linear_usable", "grouped_mm_usable"):
            if hasattr(module, gate):
                setattr(module, gate, always)
    sys.modules["lightning_moe.ops.extension"].load_extension = lambda: extension  # type: ignore[attr-defined]
    grouped_linear = sys.modules["lightning_moe.ops.grouped_linear"]
    grouped_linear._num_sms = lambda device_index: 132  # type: ignore[attr-defined]
    grouped_linear._check_inputs = lambda *args: None  # type: ignore[attr-defined]
    # A half-precision router weight is widened for the kernels on CUDA only.
    router_logits = sys.modules["lightning_moe.ops.router_logits"]
    router_logits._widened = lambda w: w.float() if w.dtype in (torch.bfloat16, torch.float16) else w  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--d-hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--activation", default="gelu")
    parser.add_argument("--aux-loss-weight", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--check-path", action="store_true", help="fail unless every stand-in kernel is called")
    parser.add_argument("--warmup", type=int, default=WARMUP_STEPS)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(args.tokens, args.experts, generator=generator)
    expert_ids_TK = scores.argsort(dim=1)[:, : args.top_k].contiguous()
    extension = stand_in_extension(expert_ids_TK, args.experts)
    called: set[str] = set()
    if args.check_path:
        extension = _recording(extension, called)
    take_the_cuda_path(extension)
    torch.manual_seed(0)
    layer = MoE(
        d_model=args.d_model,
        num_experts=args.experts,
        top_k=args.top_k,
        d_hidden=args.d_hidden,
        activation=args.activation,
        router="topk",
        aux_loss_weight=args.aux_loss_weight,
    ).to(torch.bfloat16)
    x = torch.randn(args.tokens, args.d_model, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(args.tokens, args.d_model, dtype=torch.bfloat16)
    step = training_step(layer, x, grad)

    for _ in range(args.warmup):
        step()
    if args.check_path:
        step()
        # Every kernel of the step's path ran: the routing, the sort, the expert GEMMs and the rest.
        logits = {"router_logits_tc_forward", "router_logits_forward"}
        expected = {"topk_route_forward", "topk_route_backward", "sort_by_expert", "permute_forward"}
        expected |= {"grouped_gemm_rows", "grouped_gemm_weight_grad", "activation_forward"}
        # One assignment per token: the second GEMM's kernel combines, else the row kernel.
        combines = {"unpermute_forward", "grouped_gemm_rows_and_combine"}
        missing = sorted(expected - called) + ([] if called & logits else ["router logits"])
        missing += [] if called & combines else ["the combine"]
        if missing:
            raise SystemExit(f"the step did not take the CUDA path: {', '.join(missing)} not called")
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(f"host us per step: {statistics.median(times) * 1e6:.1f}")


if __name__ == "__main__":
    main()
