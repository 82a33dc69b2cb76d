"""examples/upcycle_gpt2.py runs a few steps under LightningCLI and logs expert loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parents[2] / "examples" / "upcycle_gpt2.py"


def test_upcycle_gpt2_example_runs(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    args = ["fit", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.logger", "CSVLogger"]
    args += ["--trainer.logger.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"]
    args += ["--model.n_layer", "2", "--model.n_embd", "32", "--model.n_head", "2", "--model.num_experts", "4"]
    args += ["--data.batch_size", "4", "--data.block_size", "16", "--data.train_samples_per_epoch", "64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny tensors: more threads only add contention
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "moefy upcycled 2 feed-forward block(s)" in result.stdout + result.stderr
    (counts,) = tmp_path.rglob("expert_load/counts.jsonl")
    record = json.loads(counts.read_text().splitlines()[-1])
    assert record["step"] == 2 and len(record["tokens_per_expert"]) == 2
    assert list(counts.parent.glob("step_*.png"))
