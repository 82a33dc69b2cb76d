import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parents[1] / "examples"


def test_plain_pytorch_example_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "plain_pytorch.py"), "--steps", "3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "step    3" in result.stdout
    assert "tokens per expert" in result.stdout
