"""One MoE FFN layer, forward + backward, bf16, on one GPU: the configs of ANCHORS.md section 1.

Shape legend: T tokens, D model dim, F expert hidden, E experts, K top-k.

For each config (T, D, F, E, K) it times, with CUDA events (warm-up, then the median of --iters):

- dense: the dense-equivalent, two plain GEMMs over T*K rows with GELU between (the ceiling); with
  ``--activation swiglu``, three GEMMs with ``silu(x w1) * (x w3)`` between, in eager PyTorch;
- loop: the per-expert loop of HF Mixtral (boolean mask per expert, index, two linears, index_add);
- grouped_mm: argsort by expert, gather, ``torch._grouped_mm`` twice with int32 cumulative offsets,
  scale by the router weight, index_add back (no custom kernels);
- ops: lightning_moe's ops pipeline (``ops.sort_by_expert``, ``ops.permute``, ``GroupedExperts``,
  ``ops.unpermute``), i.e. what ``MoE.forward`` runs once it calls the ops;
- MoE: ``lightning_moe.MoE`` itself (gelu, no bias, topk router, dropless, aux_loss_weight 0).
- MoE-torch-gemm: the same layer with its expert GEMMs on ``torch._grouped_mm`` wherever it would
  take the kernels of ``src_cuda/grouped_gemm*.cu``: what those kernels buy.
- MoE-128: the layer with those kernels' 128-column tiles instead of 256.
- MoE-all: the layer with those kernels at any number of rows per expert (not only up to
  ``lightning_moe.ops.grouped_linear.MAX_ROWS_PER_EXPERT``).
- MoE-simt-router: the layer with its router logits on the SIMT kernels rather than the tensor-core
  ones (``lightning_moe.ops.router_logits.TENSOR_CORE_ROUTER`` off).
- MoE-staged-router: the layer with its tensor-core router forward and weight gradient
  register-staged rather than pipelined and its grad_x one block per output tile (``lightning_moe.ops.router_logits``
  ``PIPELINED_TC_ROUTER`` and ``PERSISTENT_TC_GRAD_X`` off).
- MoE-wgrad-1cta: the layer with its weight gradients on one CTA per SM rather than two
  (``lightning_moe.ops.grouped_linear.WEIGHT_GRAD_CTAS_PER_SM = 1``).
- MoE-wgrad-tiles: the layer with each weight-gradient CTA taking one output tile at a time rather
  than runs of 4 tiles that share an expert's slice of the output gradient
  (``lightning_moe.ops.grouped_linear.WEIGHT_GRAD_RUN_TILES = 1``).
- MoE-2cta: the layer with its forward GEMMs and input gradients on two CTAs per SM too
  (``ROW_CTAS_PER_SM = 2``).
- MoE-tall, MoE-short: the layer with 192-row tiles for its forward GEMMs and input gradients
  where ``grouped_linear.tile_rows`` picks them (``TALL_ROW_TILES``, the default), and without.
- MoE-row-kernels: the layer without the token epilogues (``TOKEN_EPILOGUES = False``): with one
  assignment per token, the combine and the permutation's backward run as row kernels of their own.

``--activation swiglu`` gives the experts of ops and MoE a third projection, gated by the fused
``ops.glu``; loop and grouped_mm are GELU only. FLOPs counted: 3 (fwd + bwd) x 2 GEMMs (3 for
swiglu) x 2*T*K*D*F. Memory: the peak allocated during one step above
what was allocated before it (weights, input, upstream gradient). The last config, one expert with
top-1, compares the layer with the plain dense FFN it would replace.

``--rounds R`` measures all the implementations of a config R times in turn and prints the median
time, the median of the R ratios to dense and their range: drifts of the GPU's speed then touch
dense and the layer alike, and the range shows how far one run's ratio can be trusted.

``--cuda-graphs`` times each step as the replay of a CUDA graph captured from it: the GPU's time
for the step's kernels with no wait for the host to launch them. ``loop`` synchronises with the
host and cannot be captured.

    python benchmarks/moe_layer.py [--configs 1,4,6] [--iters 10] [--rounds 1] [--impls dense,ops,MoE]
        [--activation swiglu] [--cuda-graphs]
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe import MoE, ops
from lightning_moe.layers.experts import GroupedExperts

# The module, not the function of the same name that lightning_moe.ops exports.
grouped_linear_module = importlib.import_module("lightning_moe.ops.grouped_linear")
router_logits_module = importlib.import_module("lightning_moe.ops.router_logits")

ACTIVATIONS = ("gelu", "swiglu")
# The implementations that take --activation swiglu; the others are GELU only.
GATED_IMPLEMENTATIONS = (
    "dense",
    "ops",
    "MoE",
    "MoE-torch-gemm",
    "MoE-128",
    "MoE-all",
    "MoE-simt-router",
    "MoE-staged-router",
    "MoE-wgrad-1cta",
    "MoE-wgrad-tiles",
    "MoE-2cta",
    "MoE-tall",
    "MoE-short",
    "MoE-row-kernels",
)


@dataclass(frozen=True)
class Config:
    tokens: int
    d_model: int
    d_hidden: int
    num_experts: int
    top_k: int

    def flops(self, gemms: int = 2) -> float:
        return 3 * gemms * 2 * self.tokens * self.top_k * self.d_model * self.d_hidden

    def __str__(self) -> str:
        return f"{self.tokens}, {self.d_model}, {self.d_hidden}, {self.num_experts}, {self.top_k}"


CONFIGS = [
    Config(16384, 1024, 4096, 8, 2),
    Config(16384, 2048, 8192, 8, 2),
    Config(32768, 4096, 14336, 8, 2),
    Config(16384, 2048, 1408, 64, 6),
    Config(8192, 1024, 4096, 64, 1),
    Config(16384, 1024, 4096, 1, 1),  # a 1-expert MoE against the dense FFN it replaces
]


def route(logits_TE: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Mixtral routing: float32 softmax over all experts, top-k, weights renormalised."""
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    weights_TK, experts_TK = torch.topk(probs_TE, top_k, dim=-1)
    return weights_TK / weights_TK.sum(dim=-1, keepdim=True), experts_TK


class DenseEquivalent(nn.Module):
    """Two GEMMs over the T*K rows, GELU between (three, SwiGLU-gated, for swiglu): the same FLOPs
    as the MoE, no routing."""

    def __init__(self, config: Config, activation: str = "gelu") -> None:
        super().__init__()
        self.top_k = config.top_k
        self.w1 = nn.Linear(config.d_model, config.d_hidden, bias=False)
        self.w2 = nn.Linear(config.d_hidden, config.d_model, bias=False)
        self.w3 = nn.Linear(config.d_model, config.d_hidden, bias=False) if activation == "swiglu" else None

    def forward(self, x_TD: Tensor) -> Tensor:
        if self.w3 is None:
            return self.w2(F.gelu(self.w1(x_TD)))
        return self.w2(F.silu(self.w1(x_TD)) * self.w3(x_TD))


class PerExpertLoop(nn.Module):
    """HF Mixtral's sparse MoE block: a boolean mask per expert, index, two linears, index_add."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.top_k = config.top_k
        self.router = nn.Linear(config.d_model, config.num_experts, bias=False)
        self.w1 = nn.ModuleList(
            nn.Linear(config.d_model, config.d_hidden, bias=False) for _ in range(config.num_experts)
        )
        self.w2 = nn.ModuleList(
            nn.Linear(config.d_hidden, config.d_model, bias=False) for _ in range(config.num_experts)
        )

    def forward(self, x_TD: Tensor) -> Tensor:
        weights_TK, experts_TK = route(self.router(x_TD), self.top_k)
        out_TD = torch.zeros_like(x_TD)
        mask_EKT = F.one_hot(experts_TK, len(self.w1)).permute(2, 1, 0)
        for expert in range(len(self.w1)):
            slot, token = torch.where(mask_EKT[expert])
            y = self.w2[expert](F.gelu(self.w1[expert](x_TD[token])))
            out_TD.index_add_(0, token, (y * weights_TK[token, slot, None]).to(x_TD.dtype))
        return out_TD


class GroupedMMComposition(nn.Module):
    """argsort by expert, gather, two grouped GEMMs, scale by the router weight, index_add back."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.top_k = config.top_k
        self.num_experts = config.num_experts
        self.router = nn.Linear(config.d_model, config.num_experts, bias=False)
        scale = config.d_model**-0.5
        self.w1 = nn.Parameter(torch.randn(config.num_experts, config.d_hidden, config.d_model) * scale)
        self.w2 = nn.Parameter(torch.randn(config.num_experts, config.d_model, config.d_hidden) * scale)

    def forward(self, x_TD: Tensor) -> Tensor:
        weights_TK, experts_TK = route(self.router(x_TD), self.top_k)
        expert_ids = experts_TK.reshape(-1)
        order = torch.argsort(expert_ids, stable=True)
        token_of_row = order // self.top_k
        counts_E = torch.zeros(self.num_experts, dtype=torch.int64, device=x_TD.device)
        counts_E.scatter_add_(0, expert_ids, torch.ones_like(expert_ids))
        offsets_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
        hidden = F.gelu(torch._grouped_mm(x_TD[token_of_row], self.w1.transpose(-2, -1), offs=offsets_E))
        y_ND = torch._grouped_mm(hidden, self.w2.transpose(-2, -1), offs=offsets_E)
        y_ND = y_ND * weights_TK.reshape(-1)[order, None].to(y_ND.dtype)
        return torch.zeros_like(x_TD).index_add_(0, token_of_row, y_ND)


class OpsPipeline(nn.Module):
    """lightning_moe's ops between the same router and GroupedExperts: MoE.forward's steps."""

    def __init__(self, config: Config, activation: str = "gelu") -> None:
        super().__init__()
        self.top_k = config.top_k
        self.num_experts = config.num_experts
        self.router = nn.Linear(config.d_model, config.num_experts, bias=False)
        self.experts = GroupedExperts(config.num_experts, config.d_model, config.d_hidden, activation)

    def forward(self, x_TD: Tensor) -> Tensor:
        weights_TK, experts_TK = route(self.router(x_TD), self.top_k)
        token_ids = torch.arange(x_TD.shape[0], device=x_TD.device).repeat_interleave(self.top_k)
        _, inverse, tokens_per_expert = ops.sort_by_expert(experts_TK.reshape(-1), self.num_experts)
        offsets = ops.token_offsets(token_ids, x_TD.shape[0])
        x_ND = ops.permute(x_TD, token_ids, inverse, offsets)
        y_ND = self.experts(x_ND, tokens_per_expert)
        weights = weights_TK.reshape(-1)
        return ops.unpermute(y_ND, token_ids, inverse, weights, x_TD.shape[0], x_TD.dtype, offsets)


def lightning_moe_layer(config: Config, activation: str = "gelu") -> nn.Module:
    return MoE(
        config.d_model,
        config.num_experts,
        top_k=config.top_k,
        d_hidden=config.d_hidden,
        activation=activation,
        router="topk",
        capacity_factor=None,
        aux_loss_weight=0.0,
    )


class _Settings(torch.autograd.Function):
    """Identity whose backward sets module globals: brackets a layer's backward with settings."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, module: Any, settings: dict[str, Any]) -> Tensor:
        ctx.module, ctx.settings = module, settings
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        for name, value in ctx.settings.items():
            setattr(ctx.module, name, value)
        return grad, None, None


class KernelChoice(nn.Module):
    """lightning_moe's layer with module ``target``'s globals (by default
    ``lightning_moe.ops.grouped_linear``'s) set to ``settings`` for its forward and its backward."""

    def __init__(
        self, config: Config, activation: str = "gelu", target: Any = grouped_linear_module, **settings: Any
    ) -> None:
        super().__init__()
        self.moe = lightning_moe_layer(config, activation)
        self.target, self.settings = target, settings

    def forward(self, x_TD: Tensor) -> Tensor:
        saved = {name: getattr(self.target, name) for name in self.settings}
        for name, value in self.settings.items():
            setattr(self.target, name, value)
        try:
            # Backward runs the output's _Settings first (ours) and the input's last (restore).
            y_TD = self.moe(_Settings.apply(x_TD, self.target, saved))
        finally:
            for name, value in saved.items():
                setattr(self.target, name, value)
        return _Settings.apply(y_TD, self.target, self.settings)


ALL_ROWS = 1 << 30
IMPLEMENTATIONS: dict[str, Callable[..., nn.Module]] = {
    "dense": DenseEquivalent,
    "loop": PerExpertLoop,
    "grouped_mm": GroupedMMComposition,
    "ops": OpsPipeline,
    "MoE": lightning_moe_layer,
    "MoE-torch-gemm": functools.partial(KernelChoice, MAX_ROWS_PER_EXPERT=0),
    "MoE-128": functools.partial(KernelChoice, TILE_N=128),
    "MoE-all": functools.partial(KernelChoice, MAX_ROWS_PER_EXPERT=ALL_ROWS),
    "MoE-simt-router": functools.partial(KernelChoice, target=router_logits_module, TENSOR_CORE_ROUTER=False),
    "MoE-staged-router": functools.partial(
        KernelChoice, target=router_logits_module, PIPELINED_TC_ROUTER=False, PERSISTENT_TC_GRAD_X=False
    ),
    "MoE-wgrad-1cta": functools.partial(KernelChoice, WEIGHT_GRAD_CTAS_PER_SM=1),
    "MoE-wgrad-tiles": functools.partial(KernelChoice, WEIGHT_GRAD_RUN_TILES=1),
    "MoE-2cta": functools.partial(KernelChoice, ROW_CTAS_PER_SM=2),
    "MoE-tall": functools.partial(KernelChoice, TALL_ROW_TILES=True),
    "MoE-short": functools.partial(KernelChoice, TALL_ROW_TILES=False),
    "MoE-row-kernels": functools.partial(KernelChoice, TOKEN_EPILOGUES=False),
}


@dataclass
class Result:
    milliseconds: float
    peak_gib: float


# Batches of timed steps at most, per implementation, while they add up to under --min-ms.
MAX_BATCHES = 50


def training_step(module: nn.Module, x: Tensor, grad: Tensor) -> Callable[[], None]:
    """One forward + backward of ``module`` on ``x`` with upstream gradient ``grad``, as a training
    step makes it: the gradients of the parameters and of ``x`` are set to None first, so that no
    step accumulates into an earlier one's."""
    params = list(module.parameters())

    def step() -> None:
        for param in params:
            param.grad = None
        x.grad = None
        module(x).backward(grad)

    return step


def graphed(step: Callable[[], None]) -> Callable[[], None]:
    """The replay of a CUDA graph captured from one call of ``step`` (after three on a side stream,
    which the capture needs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def measure(
    module: nn.Module, x: Tensor, grad: Tensor, warmup: int, iters: int, min_ms: float, cuda_graphs: bool = False
) -> Result:
    """Median fwd+bwd time over at least ``iters`` steps, and over at least ``min_ms`` of steps, after
    at least ``warmup`` steps and ``min_ms`` of them; and one step's peak extra memory. The
    time-based minimums keep short steps (a millisecond or two) from being timed before the GPU's
    clocks settle, or over too few steps for their median to hold still. With ``cuda_graphs`` the
    warm-up and timed steps are replays of a graph captured from the step."""
    step = training_step(module, x, grad)
    params = list(module.parameters())
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    for param in params:
        param.grad = None
    x.grad = None
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak_gib = (torch.cuda.max_memory_allocated() - before) / 2**30
    run = graphed(step) if cuda_graphs else step
    warmup_start = time.perf_counter()
    while (time.perf_counter() - warmup_start) * 1e3 < min_ms:
        run()
        torch.cuda.synchronize()
    # Steps are queued back to back, as in training, with one sync at the end of each batch of
    # ``iters``: each step's time is what the GPU spends on it, including any wait for the host to
    # launch its kernels.
    times: list[float] = []
    for _ in range(MAX_BATCHES):
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            run()
            end.record()
        torch.cuda.synchronize()
        times += [start.elapsed_time(end) for start, end in events]
        if sum(times) >= min_ms:
            break
    return Result(statistics.median(times), peak_gib)


def run_config(
    config: Config, names: list[str], warmup: int, iters: int, min_ms: float, activation: str, cuda_graphs: bool
) -> dict[str, Result]:
    results = {}
    for name in names:
        torch.manual_seed(0)
        factory = IMPLEMENTATIONS[name]
        module = factory(config, activation) if name in GATED_IMPLEMENTATIONS else factory(config)
        module = module.to("cuda", torch.bfloat16)
        rows = config.tokens * config.top_k if name == "dense" else config.tokens
        # Fresh random inputs (never zeros: they run faster than real data).
        x = torch.randn(rows, config.d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn_like(x)
        results[name] = measure(module, x, grad, warmup, iters, min_ms, cuda_graphs)
        del module, x, grad
        gc.collect()
        torch.cuda.empty_cache()
    return results


def print_table(config: Config, rounds: list[dict[str, Result]], activation: str) -> None:
    """One row per implementation: median time over the rounds, TFLOP/s, the median of the rounds'
    ratios to dense (and their range, with several rounds) and the largest peak memory."""
    gemms = 3 if activation == "swiglu" else 2
    spread = len(rounds) > 1
    print(f"\nconfig (T, D, F, E, K) = ({config})" + ("" if activation == "gelu" else f", {activation}"))
    print(
        f"{'impl':<12}{'ms':>10}{'TFLOP/s':>10}{'vs dense':>10}"
        + (f"{'range':>12}" if spread else "")
        + f"{'peak GiB':>10}"
    )
    for name in rounds[0]:
        milliseconds = statistics.median(result[name].milliseconds for result in rounds)
        peak_gib = max(result[name].peak_gib for result in rounds)
        tflops = config.flops(gemms) / milliseconds / 1e9
        ratios = [result["dense"].milliseconds / result[name].milliseconds for result in rounds if "dense" in result]
        ratio = f"{statistics.median(ratios):.2f}" if ratios else "-"
        span = f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "-"
        print(
            f"{name:<12}{milliseconds:>10.2f}{tflops:>10.0f}{ratio:>10}"
            + (f"{span:>12}" if spread else "")
            + f"{peak_gib:>10.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="all", help="1-based config numbers, e.g. 1,4,6 (default: all)")
    parser.add_argument("--impls", help="comma-separated implementations (default: all that take the --activation)")
    parser.add_argument("--activation", default="gelu", choices=ACTIVATIONS, help="expert activation (default gelu)")
    parser.add_argument("--iters", type=int, default=10, help="timed steps per implementation (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument(
        "--min-ms",
        type=float,
        default=50.0,
        help="warm up, and time, for at least this many milliseconds of steps too (default 50)",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="measure every implementation this many times, in turn (median)"
    )
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="time replays of a CUDA graph of each step (no host launches)"
    )
    args = parser.parse_args()
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}.")
    if args.iters < 1 or args.min_ms < 0:
        raise SystemExit(f"--iters must be at least 1 and --min-ms not negative, got {args.iters} and {args.min_ms}.")
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/moe_layer.py needs a CUDA GPU.")
    chosen = CONFIGS if args.configs == "all" else [CONFIGS[int(i) - 1] for i in args.configs.split(",")]
    available = list(IMPLEMENTATIONS) if args.activation == "gelu" else list(GATED_IMPLEMENTATIONS)
    names = available if args.impls is None else [name for name in args.impls.split(",") if name]
    unknown = set(names) - set(available)
    if unknown:
        choices = ", ".join(available)
        raise SystemExit(f"--impls {sorted(unknown)} not with --activation {args.activation}; choose from {choices}")
    if args.cuda_graphs and "loop" in names:
        raise SystemExit(
            "--cuda-graphs: loop synchronises with the host and cannot be captured; leave it out of --impls"
        )
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA kernels: {ops.cuda_kernels_available()}")
    for config in chosen:
        rounds = [
            run_config(config, names, args.warmup, args.iters, args.min_ms, args.activation, args.cuda_graphs)
            for _ in range(args.rounds)
        ]
        print_table(config, rounds, args.activation)


if __name__ == "__main__":
    main()
