"""Every Python code block in README.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(code: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # Lightning writes lightning_logs/ into the working directory
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})


def test_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 2
