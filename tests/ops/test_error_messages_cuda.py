"""The CUDA ops' own input checks raise a RuntimeError naming the bad value; they do not crash.

Each call runs in a child process, so a check that brought the process down (as a message that
streamed an integer once did on the GPU machine) fails this test rather than the test session.
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

# (the call, with `ext` the extension and `ids` eight int64 expert ids on the GPU; what it must say)
CASES = {
    "sort_by_expert-num_experts": ("ext.sort_by_expert(ids, 0)", "num_experts must be in [1, 8192], got 0"),
    "sort_by_expert-dims": ("ext.sort_by_expert(ids.view(2, 4), 4)", "expert_ids must have 1 dims, got shape [2, 4]"),
    "capacity_mask-shape": (
        "ext.capacity_mask(ids, torch.zeros(7, device='cuda'), 4, 2)",
        "priorities must have shape [8] like expert_ids, got [7]",
    ),
    "capacity_mask-capacity": (
        "ext.capacity_mask(ids, torch.zeros(8, device='cuda'), 4, -1)",
        "capacity must be >= 0, got -1",
    ),
}


@pytest.mark.parametrize(("call", "message"), CASES.values(), ids=CASES.keys())
def test_a_failed_check_raises_with_its_numbers(call: str, message: str) -> None:
    script = textwrap.dedent(f"""
        import torch
        from lightning_moe.ops.extension import require_extension
        ext = require_extension()
        ids = torch.zeros(8, dtype=torch.int64, device="cuda")
        try:
            {call}
        except RuntimeError as error:
            print(str(error).splitlines()[0])
        else:
            print("no error")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"the check crashed the process (exit {done.returncode}): {done.stderr[-2000:]}"
    assert message in done.stdout, done.stdout
