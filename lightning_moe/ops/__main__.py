"""``python -m lightning_moe.ops build [--arch 9.0]``: build the CUDA extension ahead of first use.

Builds into the cache that :func:`lightning_moe.ops.load_extension` reads and prints where. With
``--arch`` it builds for that compute capability without needing a GPU (to check that the sources
compile, or to prepare a cache for another machine with the same torch and Python, which then
loads it without nvcc or ninja).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from lightning_moe.ops import extension


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_moe.ops", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build the CUDA extension into the cache and print where")
    build.add_argument("--arch", help="compute capability, e.g. 9.0 (default: the current GPU's)")
    build.add_argument("--cache-dir", type=Path, help=f"default: ${extension.CACHE_ENV} or ~/.cache/lightning_moe")
    build.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    args = parser.parse_args(argv)
    arch = args.arch
    if arch is None:
        if not torch.cuda.is_available():
            print("lightning_moe: no GPU found; pass --arch (e.g. --arch 9.0) to build without one.", file=sys.stderr)
            return 1
        arch = "{}.{}".format(*torch.cuda.get_device_capability())
    start = time.perf_counter()
    try:
        _, build_dir = extension.build_extension(arch, cache_dir=args.cache_dir, verbose=args.verbose)
    except Exception as error:
        print(f"lightning_moe: the CUDA build failed: {error}", file=sys.stderr)
        return 1
    print(
        f"lightning_moe: CUDA kernels for sm_{arch.replace('.', '')} ready in {build_dir} "
        f"({time.perf_counter() - start:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
