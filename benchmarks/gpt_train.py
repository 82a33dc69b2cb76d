"""Training throughput of the built-in GPT: MoE feed-forwards against dense ones of equal active size.

    python benchmarks/gpt_train.py [--size default,large] [--steps 60] [--warmup 20] [--accumulate 1]
        [--profile] [--compile [MODE]]

Both models are :class:`~lightning_moe.models.gpt.MoEGPTModule` trained by a Lightning ``Trainer``
on one GPU under ``bf16-mixed`` on the built-in byte corpus; the dense one has each block's MoE
replaced by one GELU MLP of hidden size ``top_k * d_hidden``, so a token passes through the same
number of feed-forward weights in both. Tokens/s counts the optimizer steps after ``--warmup``.
``--accumulate N`` accumulates the gradients of N batches per optimizer step, so that the work that
grows with the parameter count (the optimizer, clipping, the float32 weights' casts), of which the
MoE model has more, is spread over N times the tokens.
``--compile`` builds both with ``compile_model=True`` (``torch.compile``; the warm-up steps then
include the compilation), ``--compile reduce-overhead`` with that mode (CUDA graphs).
``--profile`` lists each model's largest GPU kernels per step, the GPU's idle time between kernels
(where it waited for the host) and the longest of those gaps.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from timing import idle_gaps
from torch import Tensor, nn

from lightning_moe import ops
from lightning_moe.data import ByteCorpusDataModule
from lightning_moe.models.gpt import CompileMode, MoEGPTModule

SIZES: dict[str, dict[str, Any]] = {
    # The model `lightning-moe fit` trains by default.
    "default": dict(n_layer=4, n_head=4, d_model=128, block_size=128, batch_size=32),
    # The same recipe at a size that fills an H200.
    "large": dict(n_layer=8, n_head=16, d_model=1024, block_size=1024, batch_size=16),
}


class DenseFFN(nn.Module):
    """``Linear -> GELU -> Linear`` with hidden size ``d_hidden``: the dense stand-in for a MoE."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_hidden, bias=False)
        self.down = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(nn.functional.gelu(self.up(x)))


class Throughput(L.Callback):
    """Wall time of the optimizer steps after the first ``warmup``; optionally their GPU kernels."""

    def __init__(self, warmup: int, profile: bool = False) -> None:
        self.warmup = warmup
        self.start = 0.0
        self.end = 0.0
        self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) if profile else None

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup and not self.start:
            torch.cuda.synchronize()
            self.start = time.perf_counter()
            if self.profiler is not None:
                self.profiler.start()

    def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
        torch.cuda.synchronize()
        self.end = time.perf_counter()
        if self.profiler is not None:
            self.profiler.stop()
            steps = trainer.global_step - self.warmup
            kernels = [e for e in self.profiler.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
            kernels.sort(key=lambda e: e.device_time_total, reverse=True)
            total = sum(e.device_time_total for e in kernels) / 1e3 / steps
            wall = (self.end - self.start) * 1e3 / steps
            print(f"  kernels {total:.1f} ms/step of {wall:.1f} ms/step wall; the largest:")
            for event in kernels[:15]:
                print(
                    f"  {event.device_time_total / 1e3 / steps:8.3f} ms {event.count // steps:4d}x  {event.key[:100]}"
                )
            with tempfile.TemporaryDirectory() as directory:
                trace = Path(directory) / "trace.json"
                self.profiler.export_chrome_trace(str(trace))
                idle_ms, gaps = trace_idle_gaps(json.loads(trace.read_text())["traceEvents"])
            print(f"  GPU idle between kernels: {idle_ms / steps:.2f} ms/step; by length of gap:")
            for low, high in ((2, 4), (4, 8), (8, 20), (20, 100), (100, float("inf"))):
                within = [gap[0] for gap in gaps if low < gap[0] <= high]
                count, total_ms = len(within) / steps, sum(within) / 1e3 / steps
                print(f"  {low:>5}-{high:<5} us: {count:7.1f} gaps, {total_ms:6.2f} ms/step")
            by_next: dict[str, list[float]] = {}
            for gap_us, _, after in gaps:
                by_next.setdefault(after[:60], []).append(gap_us)
            print("  the kernels that waited longest in all (ms/step, gaps/step):")
            for name, waits in sorted(by_next.items(), key=lambda item: -sum(item[1]))[:8]:
                print(f"  {sum(waits) / 1e3 / steps:8.3f} {len(waits) / steps:6.1f}  {name}")
            print("  the longest gaps, us:")
            for gap_us, before, after in gaps[:8]:
                print(f"  {gap_us:8.0f}  {before[:60]} -> {after[:60]}")


def trace_idle_gaps(events: list[dict[str, Any]], min_us: float = 2.0) -> tuple[float, list[tuple[float, str, str]]]:
    """The GPU's idle time (ms) between the kernels, copies and fills of a Chrome trace, in gaps
    longer than ``min_us``, and those gaps (us, the one before, the one after), longest first.

    Gaps show where the GPU waited for the host: after a synchronisation, or where the host issues
    work more slowly than the GPU runs it.
    """
    work = [
        (e["name"], e["ts"], e["ts"] + e["dur"])
        for e in events
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    ]
    gaps = sorted((gap for gap in idle_gaps(work) if gap.microseconds > min_us), key=lambda gap: -gap.microseconds)
    return sum(gap.microseconds for gap in gaps) / 1e3, [(gap.microseconds, gap.before, gap.after) for gap in gaps]


def tokens_per_second(
    size: dict[str, Any],
    dense: bool,
    steps: int,
    warmup: int,
    profile: bool = False,
    compile_model: bool | CompileMode = False,
    accumulate: int = 1,
) -> float:
    L.seed_everything(0, verbose=False)
    model_args = {k: v for k, v in size.items() if k != "batch_size"}
    module = MoEGPTModule(num_experts=8, top_k=2, warmup_steps=10, compile_model=compile_model, **model_args)
    if dense:
        d_model = size["d_model"]
        for block in module.model.blocks:
            block.moe = DenseFFN(d_model, 2 * 4 * d_model)
    data = ByteCorpusDataModule(block_size=size["block_size"], batch_size=size["batch_size"])
    timer = Throughput(warmup, profile)
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=warmup + steps,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=data)
    return steps * accumulate * size["batch_size"] * size["block_size"] / (timer.end - timer.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="default,large")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--accumulate", type=int, default=1, help="batches per optimizer step (default 1)")
    parser.add_argument("--profile", action="store_true", help="list each model's largest GPU kernels and idle gaps")
    parser.add_argument(
        "--compile",
        nargs="?",
        const=True,
        default=False,
        metavar="MODE",
        help="torch.compile both models, in MODE if given (e.g. reduce-overhead: CUDA graphs)",
    )
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA kernels: {ops.cuda_kernels_available()}")
    print(f"{'size':<10}{'dense tok/s':>14}{'MoE tok/s':>14}{'MoE/dense':>11}")
    for name in args.size.split(","):
        run = (args.steps, args.warmup, args.profile, args.compile, args.accumulate)
        dense = tokens_per_second(SIZES[name], True, *run)
        moe = tokens_per_second(SIZES[name], False, *run)
        print(f"{name:<10}{dense:>14,.0f}{moe:>14,.0f}{moe / dense:>11.2f}", flush=True)


if __name__ == "__main__":
    main()
