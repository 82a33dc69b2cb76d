"""The AdamW step of :class:`lightning_moe.optim.AdamW` against torch's fused AdamW, on one GPU, on the
parameters of a GPT of ``gpt_train.py``.

Each variant is one training step's work that grows with the parameter count: the optimizer step
with clipping's gradient divisor set (as ``MoELightningModule`` clips), and, under bf16 mixed
precision, the cast of each expert weight stack to bfloat16 for the next forward pass:

- ``torch fused + casts``: ``torch.optim.AdamW(fused=True)``, then ``w.to(torch.bfloat16)`` of each
  expert weight (what training did before ``lightning_moe.optim.AdamW``);
- ``ours, casts kept``: ``lightning_moe.optim.AdamW``, whose step writes the expert weights' bf16
  copies, which the forward pass takes (no cast);
- ``ours + casts``: ``lightning_moe.optim.AdamW(keep_casts=False)``, then the casts;
- ``torch fused``, ``ours``: the steps alone.

It prints each variant's milliseconds (CUDA events around --iters calls queued back to back, as in
training, where the host prepares a step while the GPU runs the backward pass), the bandwidth of
the bytes it must move, and its time over the first variant's.

    python benchmarks/adamw.py [--size large] [--iters 30]
"""

from __future__ import annotations

import argparse

import torch
from gpt_train import SIZES
from timing import time_queued_ms

from lightning_moe import ops
from lightning_moe.models.gpt import MoEGPTModule
from lightning_moe.optim import AdamW


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="large", choices=sorted(SIZES))
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    config = {k: v for k, v in SIZES[args.size].items() if k != "batch_size"}
    module = MoEGPTModule(**config).cuda()
    params = list(module.parameters())
    experts = [p for p in params if p.dim() == 3]  # the experts' stacked weights
    for p in params:
        p.grad = torch.randn_like(p)
    numel = sum(p.numel() for p in params)
    expert_numel = sum(p.numel() for p in experts)
    print(f"{args.size} GPT: {numel / 1e6:.1f} M parameters, {expert_numel / 1e6:.1f} M of them in expert weights")

    def optimizer(kind: str) -> torch.optim.Optimizer:
        clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for c, p in zip(clone, params, strict=True):
            c.grad = p.grad
        if kind == "torch":
            opt: torch.optim.Optimizer = torch.optim.AdamW(clone, lr=1e-4, betas=(0.9, 0.95), fused=True)
        else:
            opt = AdamW(clone, lr=1e-4, betas=(0.9, 0.95), keep_casts=kind == "kept")
            if kind == "kept":
                with torch.enable_grad():  # the layers' first casts, which the step then keeps current
                    for c in clone:
                        if c.dim() == 3:
                            ops.cast(c, torch.bfloat16)
        opt.grad_scale = torch.tensor(1.5, device="cuda")  # type: ignore[attr-defined]
        return opt

    def with_casts(opt: torch.optim.Optimizer):
        weights = [p for group in opt.param_groups for p in group["params"] if p.dim() == 3]

        def step() -> None:
            opt.step()
            for w in weights:
                w.detach().to(torch.bfloat16)

        return step

    # Bytes each must move: the step reads parameter, gradient and moments and writes parameter and
    # moments (torch's fused step also writes the divided gradient); a cast reads 4 and writes 2.
    casts = expert_numel * 6
    variants = {
        "torch fused + casts": (lambda: with_casts(optimizer("torch")), numel * 32 + casts),
        "ours, casts kept": (lambda: optimizer("kept").step, numel * 28 + expert_numel * 2),
        "ours + casts": (lambda: with_casts(optimizer("plain")), numel * 28 + casts),
        "torch fused": (lambda: optimizer("torch").step, numel * 32),
        "ours": (lambda: optimizer("plain").step, numel * 28),
    }
    print(f"{'variant':<22}{'ms':>8}{'TB/s':>7}{'vs first':>10}")
    first = None
    for name, (make, moved) in variants.items():
        step = make()
        ms = time_queued_ms(step, args.iters)
        del step
        torch.cuda.empty_cache()
        first = first or ms
        print(f"{name:<22}{ms:>8.3f}{moved / ms / 1e9:>7.2f}{ms / first:>10.3f}")


if __name__ == "__main__":
    main()
