"""GPU timing shared by the benchmarks of this folder (run as scripts, which puts the folder on
``sys.path``), and the idle time of a profiled GPU timeline."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Gap:
    """A stretch of the GPU's timeline that no device activity covers."""

    microseconds: float
    before: str  # the activity that ran latest into the gap
    after: str  # the activity that starts after it


def idle_gaps(intervals: Iterable[tuple[str, float, float]]) -> list[Gap]:
    """The idle stretches between device activities given as (name, start, end) in microseconds, in
    timeline order: the time between the first start and the last end that no activity covers.
    Activities may overlap or nest (concurrent streams); a gap's ``before`` is the activity that
    ran latest into it."""
    gaps = []
    busy_until: float | None = None
    last = ""
    for name, start, end in sorted(intervals, key=lambda interval: interval[1]):
        if busy_until is not None and start > busy_until:
            gaps.append(Gap(start - busy_until, last, name))
        if busy_until is None or end >= busy_until:
            busy_until, last = end, name
    return gaps


def gaps_by_pair(gaps: Iterable[Gap], steps: int) -> list[tuple[str, str, float, float]]:
    """(before, after, idle microseconds per step, occurrences per step) for each pair of
    activities that gaps lie between, the most idle time first."""
    idle: dict[tuple[str, str], float] = defaultdict(float)
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for gap in gaps:
        idle[gap.before, gap.after] += gap.microseconds
        counts[gap.before, gap.after] += 1
    pairs = [(before, after, total / steps, counts[before, after] / steps) for (before, after), total in idle.items()]
    return sorted(pairs, key=lambda pair: pair[2], reverse=True)
