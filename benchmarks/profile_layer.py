"""Where one MoE layer's forward + backward spends its GPU time: the top CUDA kernels, per step.

    python benchmarks/profile_layer.py [--configs 1,5] [--impls MoE,ops] [--top 15] [--host] [--python]
        [--gaps]

Uses the configs and implementations of ``benchmarks/moe_layer.py``; prints, for each, the GPU
time per step of the kernels that take the most, and the host time per step (the Python and
launch overhead, which hides behind the GPU when it is shorter than the GPU time; the median of
steps each issued to an idle GPU). ``--host`` adds the host ops of torch's profiler; ``--python``
the Python functions that take the most host time of their own over the steps (``cProfile``).
``--gaps`` adds where the GPU sat idle between the profiled steps' kernels (and copies): the idle
time per step, and the kernel pairs with the most idle time between them. A spin kernel holds the
GPU while the host queues the profiled steps, so that the idle time is the GPU's own between
queued kernels, as in ``benchmarks/moe_layer.py``'s timed steps once the host runs ahead, and not
time spent waiting for the host, which the profiler slows. Where the host time per step printed
is below the kernels' time, a step timed with CUDA events is its kernels' time plus that idle time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.moe_layer import CONFIGS, IMPLEMENTATIONS, Config, training_step
from benchmarks.timing import gaps_by_pair, idle_gaps

HOST_STEPS = 10
# The spin kernel that holds the GPU for --gaps: cycles per millisecond of the host's time per
# step (about 2 GHz clocks), and its name in the profiler, which leaves it out of both tables.
HOLD_CYCLES_PER_MS = 2_000_000
HOLD_KERNEL = "spin_kernel"


def is_layer_kernel(device_type: torch.autograd.DeviceType, name: str) -> bool:
    """Whether a profiled event is the layer's device work: on the GPU, and not the --gaps hold."""
    return device_type == torch.autograd.DeviceType.CUDA and HOLD_KERNEL not in name


def print_gaps(prof: profile, steps: int, top: int) -> None:
    """Print the idle time per step between the device activities that ``prof`` recorded."""
    activities = [
        (event.name, event.time_range.start, event.time_range.end)
        for event in prof.events()
        if is_layer_kernel(event.device_type, event.name)
    ]
    gaps = idle_gaps(activities)
    print(f"  GPU idle between activities: {sum(gap.microseconds for gap in gaps) / steps:.1f} us/step; most, by pair:")
    for before, after, microseconds, count in gaps_by_pair(gaps, steps)[:top]:
        print(f"  {microseconds:8.1f} us {count:4.1f}x  {before[:55]}  ->  {after[:55]}")


def profile_one(config: Config, name: str, args: argparse.Namespace) -> None:
    """Print the GPU kernels (and with ``--host`` the host ops) of one implementation's step."""
    torch.manual_seed(0)
    module = IMPLEMENTATIONS[name](config).to("cuda", torch.bfloat16)
    rows = config.tokens * config.top_k if name == "dense" else config.tokens
    x = torch.randn(rows, config.d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)

    step = training_step(module, x, grad)

    for _ in range(3):
        step()
    # The host's time to issue one step, the GPU idle at its start (so that no launch waits for the
    # queue): the median of HOST_STEPS such steps.
    host_times = []
    for _ in range(HOST_STEPS):
        torch.cuda.synchronize()
        host_start = time.perf_counter()
        step()
        host_times.append((time.perf_counter() - host_start) * 1e3)
    host_ms = statistics.median(host_times)
    torch.cuda.synchronize()
    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.host else [])
    with profile(activities=activities) as prof:
        if args.gaps:
            # Held for four times the host's unprofiled time for the steps: the host queues them all.
            torch.cuda._sleep(int(HOLD_CYCLES_PER_MS * host_ms * args.steps * 4))
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if is_layer_kernel(e.device_type, e.key)]
    kernels.sort(key=lambda e: e.device_time_total, reverse=True)
    total_ms = sum(e.device_time_total for e in kernels) / 1e3 / args.steps
    print(f"\n== {name} ({config}): kernels {total_ms:.3f} ms/step, host {host_ms:.3f} ms/step")
    for event in kernels[: args.top]:
        ms = event.device_time_total / 1e3 / args.steps
        print(f"  {ms:8.3f} ms {event.count // args.steps:4d}x  {event.key[:110]}")
    if args.gaps:
        print_gaps(prof, args.steps, args.top)
    if args.python:
        with cProfile.Profile() as python_profile:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
        print(f"  Python functions, most own time over {args.steps} steps:")
        pstats.Stats(python_profile).sort_stats("tottime").print_stats(args.top)
    if args.host:
        host_ops = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        host_ops.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
        calls = sum(e.count for e in host_ops if e.key.startswith("aten::")) // args.steps
        print(f"  host: {calls} aten calls/step; most self time:")
        for event in host_ops[: args.top]:
            ms = event.self_cpu_time_total / 1e3 / args.steps
            print(f"  {ms:8.3f} ms {event.count // args.steps:4d}x  {event.key[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="1,4,5,6")
    parser.add_argument("--impls", default="MoE")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--host", action="store_true", help="also list the ops that take the most host time")
    parser.add_argument("--python", action="store_true", help="also list the Python functions that take the most")
    parser.add_argument("--gaps", action="store_true", help="also list where the GPU sat idle between kernels")
    args = parser.parse_args()
    for index in args.configs.split(","):
        for name in args.impls.split(","):
            profile_one(CONFIGS[int(index) - 1], name, args)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
