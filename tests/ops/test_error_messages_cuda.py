"""The CUDA ops' own input checks raise a RuntimeError naming the bad value; they do not crash.

The calls run in one child process, so a check that brought the process down (as a message that
streamed an integer once did on the GPU machine) fails its case, and those after it, rather than
the test session.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from lightning_moe.ops.extension import load_extension
from tests.ops.gpu_checks import GPU_MARKS

pytestmark = [
    *GPU_MARKS,
    pytest.mark.skipif(not torch.cuda.is_available() or load_extension() is None, reason="needs the CUDA extension"),
]

# (the call, with `ext` the extension, `ids` eight int64 expert ids on the GPU and `zeros(*shape,
# dtype=torch.float32)` a zero tensor on the GPU; what it must say)
CASES = {
    "sort_by_expert-num_experts": ("ext.sort_by_expert(ids, 0)", "num_experts must be in [1, 8192], got 0"),
    "sort_by_expert-dims": ("ext.sort_by_expert(ids.view(2, 4), 4)", "expert_ids must have 1 dims, got shape [2, 4]"),
    "capacity_mask-shape": (
        "ext.capacity_mask(ids, zeros(7), 4, 2)",
        "priorities must have shape [8] like expert_ids, got [7]",
    ),
    "capacity_mask-capacity": (
        "ext.capacity_mask(ids, zeros(8), 4, -1)",
        "capacity must be >= 0, got -1",
    ),
    "router_logits_forward-experts": (
        "ext.router_logits_forward(zeros(4, 8), zeros(300, 8))",
        "weight must have 1 to 256 rows (experts), got 300",
    ),
    "router_logits_tc_forward-x_dtype": (
        "ext.router_logits_tc_forward(zeros(4, 64), zeros(8, 64))",
        "x must have dtype BFloat16, got Float",
    ),
    "router_logits_tc_forward-experts": (
        "ext.router_logits_tc_forward(zeros(4, 64, dtype=bf16), zeros(12, 64))",
        "weight's rows (experts) must be a multiple of 8 from 8 to 256 for the tensor-core router kernels, got 12",
    ),
    "router_logits_tc_forward-dim": (
        "ext.router_logits_tc_forward(zeros(4, 96, dtype=bf16), zeros(8, 96))",
        "x's columns (D) must be a positive multiple of 64 for the tensor-core router kernels, got 96",
    ),
    "router_logits_tc_forward-dims_differ": (
        "ext.router_logits_tc_forward(zeros(4, 64, dtype=bf16), zeros(8, 128))",
        "weight must have D = 64 columns like x, got 128",
    ),
    "router_logits_tc_forward-offset": (
        "ext.router_logits_tc_forward(zeros(257, dtype=bf16)[1:].view(4, 64), zeros(8, 64))",
        "x must start on a 16-byte boundary",
    ),
    "router_logits_tc_forward-contiguous": (
        "ext.router_logits_tc_forward(zeros(4, 64, dtype=bf16), zeros(64, 8).t())",
        "weight must be contiguous",
    ),
    "router_logits_tc_grad_x-experts_differ": (
        "ext.router_logits_tc_grad_x(zeros(4, 8), zeros(16, 64))",
        "weight must have E = 8 rows like grad_logits' columns, got 16",
    ),
    "router_logits_tc_grad_x-dim": (
        "ext.router_logits_tc_grad_x(zeros(4, 8), zeros(8, 100))",
        "weight's columns (D) must be a positive multiple of 64 for the tensor-core router kernels, got 100",
    ),
    "router_logits_tc_grad_x-grad_dims": (
        "ext.router_logits_tc_grad_x(zeros(8), zeros(8, 64))",
        "grad_logits must have 2 dims, got shape [8]",
    ),
    "router_logits_tc_grad_weight-tokens_differ": (
        "ext.router_logits_tc_grad_weight(zeros(4, 8), zeros(5, 64, dtype=bf16))",
        "x must have T = 4 rows like grad_logits, got 5",
    ),
    "router_logits_tc_grad_weight-experts": (
        "ext.router_logits_tc_grad_weight(zeros(4, 264), zeros(4, 64, dtype=bf16))",
        "grad_logits' columns (experts) must be a multiple of 8 from 8 to 256 for the tensor-core router kernels,"
        " got 264",
    ),
    "router_logits_tc_grad_weight-x_dtype": (
        "ext.router_logits_tc_grad_weight(zeros(4, 8), zeros(4, 64))",
        "x must have dtype BFloat16, got Float",
    ),
    "router_logits_tc_grad_weight-device": (
        "ext.router_logits_tc_grad_weight(torch.zeros(4, 8), zeros(4, 64, dtype=bf16))",
        "grad_logits must be a CUDA tensor",
    ),
}


@pytest.fixture(scope="module")
def outcomes() -> tuple[dict[str, str], str]:
    """Every case's call, in order, in one child process: the first line of what each raised (or
    "no error"), by case name, and the child's stderr. The child loads the extension once for all
    of them; a call that brings it down leaves that case and the ones after it without an outcome."""
    calls = "".join(f"run({name!r}, lambda: {call})\n" for name, (call, _) in CASES.items())
    script = (
        textwrap.dedent("""
        import torch
        from lightning_moe.ops.extension import require_extension
        ext = require_extension()
        ids = torch.zeros(8, dtype=torch.int64, device="cuda")

        def zeros(*shape, dtype=torch.float32):
            return torch.zeros(*shape, dtype=dtype, device="cuda")

        bf16 = torch.bfloat16

        def run(name, call):
            try:
                call()
            except RuntimeError as error:
                outcome = str(error).splitlines()[0]
            else:
                outcome = "no error"
            print(name, outcome, sep="\t", flush=True)
    """)
        + calls
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    results = dict(line.split("\t", 1) for line in done.stdout.splitlines() if "\t" in line)
    return results, f"exit {done.returncode}: {done.stderr[-2000:]}"


@pytest.mark.parametrize("name", CASES.keys())
def test_a_failed_check_raises_with_its_numbers(name: str, outcomes: tuple[dict[str, str], str]) -> None:
    results, child = outcomes
    assert name in results, f"the process died at or before this check ({child})"
    assert CASES[name][1] in results[name], results[name]
