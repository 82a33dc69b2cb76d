"""Compile ``src_cuda/`` with nvcc and link it against torch, without a GPU.

Checks that the kernels build the way :func:`lightning_moe.ops.load_extension` builds them, on a
machine with no GPU. It needs a CUDA build of torch, nvcc and ninja, but neither a GPU nor
lightning: the loader module is read from its file, not imported with the package. Usage::

    CUDA_HOME=/usr/local/cuda PATH=/opt/cuda-venv/bin:$PATH \\
        /opt/cuda-venv/bin/python tests/ops/compile_check.py [--arch 9.0]

Exits 0 when the extension compiled, linked and imported.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

LOADER = Path(__file__).resolve().parents[2] / "lightning_moe" / "ops" / "extension.py"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="9.0", help="compute capability to build for (default 9.0)")
    parser.add_argument("--keep", type=Path, help="build here and keep it, instead of a temporary directory")
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("lightning_moe_ops_extension", LOADER)
    assert spec is not None and spec.loader is not None
    extension = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extension)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        cache_dir = args.keep or Path(scratch)
        module, build_dir = extension.build_extension(args.arch, cache_dir=cache_dir, verbose=True)
    functions = sorted(name for name in dir(module) if not name.startswith("_"))
    print(
        f"compile check: built and imported {module.__name__} for sm_{args.arch.replace('.', '')} "
        f"in {time.perf_counter() - start:.0f} s; functions: {', '.join(functions)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
