"""``benchmarks/host_overhead.py`` runs the layer's CUDA path on a CPU: its stand-ins follow the
internals of ``lightning_moe.ops``, so a renamed internal must fail here, not on the next use."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize(
    "args",
    [[], ["--experts", "8", "--top-k", "2", "--aux-loss-weight", "0.01"], ["--activation", "swiglu"]],
    ids=["tensor_core_router", "simt_router_with_loss", "gated_experts"],
)
def test_host_overhead_takes_the_cuda_path_on_a_cpu(args: list[str]) -> None:
    script = ROOT / "benchmarks" / "host_overhead.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LIGHTNING_MOE_DISABLE_CUDA": "1"}
    command = [sys.executable, str(script), "--steps", "3", "--check-path", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "host us per step:" in result.stdout
