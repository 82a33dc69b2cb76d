"""GPU timing shared by the kernel benchmarks of this folder (run as scripts, which puts the folder
on ``sys.path``)."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

WARMUP = 5


def time_queued_ms(step: Callable[[], object], iters: int) -> float:
    """Mean milliseconds of ``step`` on the GPU over ``iters`` calls queued back to back after a
    warm-up, as in training: the host prepares each call while the GPU runs the previous one."""
    for _ in range(WARMUP):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def time_ms(step: Callable[[], object], iters: int) -> float:
    """Median milliseconds of ``step`` on the GPU over ``iters`` CUDA-event-timed calls, after a warm-up."""
    for _ in range(WARMUP):
        step()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
