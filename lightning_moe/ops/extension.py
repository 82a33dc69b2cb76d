"""The one loader of lightning_moe's CUDA extension (the kernels in ``src_cuda/``).

The extension is built lazily, on first use, with ninja through ``torch.utils.cpp_extension.load``,
for the current GPU's architecture only. Builds are cached under ``$LIGHTNING_MOE_CACHE`` (default
``~/.cache/lightning_moe``) in a directory named by a hash of the sources, the torch, CUDA and
Python versions and the architecture, so a changed source or upgraded torch builds afresh and
nothing stale is ever loaded. Each build compiles a copy of the sources kept in its directory, so
installs of the same sources at different paths share it. When several processes start at once
(one per GPU), a file lock lets one build while the others wait, then load the finished build. A
finished build is imported directly, without nvcc or ninja: ``python -m lightning_moe.ops build``
on a machine with the CUDA toolkit serves nodes that lack it.

When the extension cannot be had (no CUDA device, no nvcc or ninja, a failed build, or
``LIGHTNING_MOE_DISABLE_CUDA=1``), :func:`load_extension` returns ``None`` after one warning that
names the cause, and the pure-PyTorch reference ops take over. The two environment variables are
build switches; neither changes what the ops compute.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

EXTENSION_NAME = "lightning_moe_cuda"
BUILD_MESSAGE = "lightning_moe: building CUDA kernels (first use, about a minute)..."
DISABLE_ENV = "LIGHTNING_MOE_DISABLE_CUDA"
CACHE_ENV = "LIGHTNING_MOE_CACHE"
# Marks a build that compiled, linked and imported; a directory without it is rebuilt.
_COMPLETE_MARKER = "BUILD_COMPLETE"
# torch.utils.cpp_extension.load's own lock file in a build directory (its FileBaton).
_TORCH_LOCK_FILE = "lock"
# Where a build directory keeps the copy of the sources it compiles.
_SOURCE_COPY = "src"
_SOURCE_SUFFIXES = frozenset({".cu", ".cuh", ".cpp", ".h"})


class ExtensionUnavailable(RuntimeError):
    """Why the CUDA extension cannot be built or loaded; its message is the cause."""


def source_dir() -> Path:
    """The directory of the CUDA sources: ``src_cuda/`` at the repository root.

    The package reaches it through ``lightning_moe/_cuda_sources``, a link in a source checkout and
    a copy in an installed wheel.
    """
    return (Path(__file__).parents[1] / "_cuda_sources").resolve()


def compiled_sources(directory: Path) -> list[Path]:
    """The translation units to compile: every ``.cu`` and ``.cpp`` file, sorted by name."""
    return sorted([*directory.glob("*.cu"), *directory.glob("*.cpp")])


def _source_files(directory: Path) -> list[Path]:
    """Every file the build reads from ``directory``: translation units and headers, sorted by name."""
    return sorted(p for p in directory.iterdir() if p.suffix in _SOURCE_SUFFIXES)


def cache_root() -> Path:
    """``$LIGHTNING_MOE_CACHE``, or ``~/.cache/lightning_moe``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "lightning_moe"


def cache_key(directory: Path, arch: str) -> str:
    """A hash of everything the build depends on.

    Args:
        directory: The source directory; every ``.cu``, ``.cuh``, ``.cpp`` and ``.h`` file in it
            counts, by name and content.
        arch: Compute capability built for, e.g. ``"9.0"``.

    Returns:
        16 hex digits.
    """
    digest = hashlib.sha256()
    for path in _source_files(directory):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    # The .so links against this torch, this CUDA runtime and this Python's ABI.
    environment = (torch.__version__, str(torch.version.cuda), arch, sys.implementation.cache_tag)
    digest.update(repr(environment).encode())
    return digest.hexdigest()[:16]


def arch_flags(arch: str) -> list[str]:
    """nvcc flags that build machine code for compute capability ``arch`` (e.g. "9.0") only.

    Naming an arch also stops torch from adding flags for every architecture it knows. Compute
    capability 9.0 builds for ``sm_90a``, whose architecture-specific instructions (``wgmma``) the
    grouped GEMM kernels use; its machine code runs on 9.0 devices only, which is all a build for
    the current GPU needs.
    """
    major, minor = arch.split(".")
    suffix = "a" if (major, minor) == ("9", "0") else ""
    return [f"-gencode=arch=compute_{major}{minor}{suffix},code=sm_{major}{minor}{suffix}"]


def build_extension(arch: str, cache_dir: Path | None = None, verbose: bool = False) -> tuple[ModuleType, Path]:
    """Build (or reuse) and import the extension for compute capability ``arch``.

    Needs nvcc and ninja but no GPU: importing the module does not touch the device, so this
    also serves to check that the sources compile. A finished build in the cache is imported
    without either.

    Args:
        arch: Compute capability, e.g. ``"9.0"``.
        cache_dir: Where build directories go; defaults to :func:`cache_root`.
        verbose: Show the compiler's commands and output.

    Returns:
        The module and its build directory.

    Raises:
        ExtensionUnavailable: nvcc or ninja is missing for a build, or the sources are not found.
        Exception: whatever the build raises when compilation fails.
    """
    from torch.utils import cpp_extension

    directory = source_dir()
    sources = compiled_sources(directory) if directory.is_dir() else []
    if not sources:
        raise ExtensionUnavailable(f"the CUDA sources were not found in {directory}")
    build_dir = (cache_dir or cache_root()) / f"{EXTENSION_NAME}-{cache_key(directory, arch)}"
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ExtensionUnavailable(
            f"the build directory {build_dir} cannot be created ({error.strerror}); set {CACHE_ENV} to a "
            "directory this process may write to"
        ) from error
    with _exclusive_lock(build_dir / "build.lock"):
        # A finished build of exactly these sources, torch and arch (the directory's name says so)
        # is imported as it is: no compiler, no ninja, so that a build made ahead of time
        # (`python -m lightning_moe.ops build`) serves nodes without the CUDA toolkit.
        module = _import_finished_build(build_dir)
        if module is not None:
            return module, build_dir
        if cpp_extension.CUDA_HOME is None or shutil.which("nvcc", path=_nvcc_search_path()) is None:
            raise ExtensionUnavailable("nvcc was not found (install the CUDA toolkit or set CUDA_HOME)")
        if not cpp_extension.is_ninja_available():
            raise ExtensionUnavailable("ninja was not found (pip install ninja)")
        # torch's loader holds a lock file of its own in the build directory while it builds and
        # deletes it when done. A process killed meanwhile (a job's time limit, SIGTERM, SIGKILL)
        # leaves it behind, and every later load would wait for it to go, silently and forever.
        # Only the holder of build.lock gets here, so such a file is stale.
        (build_dir / _TORCH_LOCK_FILE).unlink(missing_ok=True)
        complete = (build_dir / _COMPLETE_MARKER).exists()
        if not complete:
            print(BUILD_MESSAGE, file=sys.stderr, flush=True)
        module = cpp_extension.load(
            name=EXTENSION_NAME,
            sources=[str(path) for path in _copy_sources(directory, build_dir / _SOURCE_COPY, refresh=not complete)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", *arch_flags(arch)],
            build_directory=str(build_dir),
            verbose=verbose,
        )
        _mark_complete(build_dir, module, arch)
    return module, build_dir


def _mark_complete(build_dir: Path, module: ModuleType, arch: str) -> None:
    """Record that ``build_dir`` holds a finished build, and which module file it made."""
    lines = [f"{torch.__version__} {torch.version.cuda} {arch}"]
    module_file = getattr(module, "__file__", None)
    if module_file is not None and Path(module_file).parent == build_dir:
        lines.append(f"module {module.__name__} {Path(module_file).name}")
    (build_dir / _COMPLETE_MARKER).write_text("\n".join(lines) + "\n")


def _import_finished_build(build_dir: Path) -> ModuleType | None:
    """The module of the finished build in ``build_dir``, imported from its file; ``None`` when
    there is none, its record names no module file (builds of older versions), or the file does
    not import (a damaged build, which is then built again)."""
    try:
        lines = (build_dir / _COMPLETE_MARKER).read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines[1:]:
        fields = line.split()
        if len(fields) == 3 and fields[0] == "module" and (build_dir / fields[2]).is_file():
            spec = importlib.util.spec_from_file_location(fields[1], build_dir / fields[2])
            if spec is None or spec.loader is None:
                return None
            try:
                module = importlib.util.module_from_spec(spec)  # loads the library
                spec.loader.exec_module(module)
            except (ImportError, OSError):
                return None
            return module
    return None


def _copy_sources(directory: Path, copy: Path, refresh: bool) -> list[Path]:
    """The translation units of ``directory`` as copied into ``copy``; copied afresh if ``refresh``.

    The build compiles these copies rather than the originals. ninja rebuilds whenever a command
    line changes, and the commands name the sources by path, while the build directory is keyed by
    the sources' content. Two installs of the same sources (two checkouts, two environments, an
    editable install and a wheel) then share one build instead of each rebuilding it in turn. A
    finished build keeps its copies as they are: rewriting them would make ninja rebuild.
    """
    originals = _source_files(directory)
    names = [path.name for path in originals]
    if refresh or not copy.is_dir() or [path.name for path in _source_files(copy)] != names:
        copy.mkdir(exist_ok=True)
        for path in originals:
            shutil.copyfile(path, copy / path.name)
    return compiled_sources(copy)


@functools.cache
def load_extension() -> ModuleType | None:
    """The CUDA extension for the current GPU, built on first use; ``None`` when unavailable.

    The result is memoised for the process, so the build, and the warning when there is none,
    happen once.
    """
    try:
        arch = _current_arch()
        module, _ = build_extension(arch)
    except ExtensionUnavailable as cause:
        _warn(str(cause))
        return None
    except Exception as error:  # a compiler or linker failure: fall back, but say why
        _warn(f"the build failed: {_last_lines(str(error))}")
        return None
    return module


def require_extension() -> ModuleType:
    """The loaded extension; for op implementations that run only after :func:`use_cuda_kernels`."""
    module = load_extension()
    if module is None:
        raise RuntimeError("lightning_moe's CUDA extension is not loaded; call the op through its wrapper.")
    return module


@torch.compiler.assume_constant_result
def cuda_kernels_available() -> bool:
    """Whether the CUDA extension is loaded (building it first if needed).

    ``torch.compile`` evaluates this once while tracing and keeps the result as a constant.
    """
    return load_extension() is not None


def cuda_device_index(device: torch.device) -> int:
    """The index of CUDA ``device``, the current device for a bare ``"cuda"``."""
    return device.index if device.index is not None else torch.cuda.current_device()


def use_cuda_kernels(*tensors: Tensor) -> bool:
    """Whether an op on ``tensors`` takes the CUDA kernels: all on CUDA and the extension loaded.

    Checked in this order so that CPU tensors never trigger a build or a warning.
    """
    return all(t.is_cuda for t in tensors) and cuda_kernels_available()


def _current_arch() -> str:
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        raise ExtensionUnavailable(f"{DISABLE_ENV}={os.environ[DISABLE_ENV]} is set")
    if torch.version.cuda is None:
        raise ExtensionUnavailable(f"this torch ({torch.__version__}) is built without CUDA")
    if not torch.cuda.is_available():
        raise ExtensionUnavailable("CUDA is not available (no GPU or driver found)")
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def _nvcc_search_path() -> str:
    from torch.utils import cpp_extension

    cuda_bin = os.path.join(cpp_extension.CUDA_HOME or "", "bin")
    return os.pathsep.join([cuda_bin, os.environ.get("PATH", "")])


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (blocking); the OS releases it if the process dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, concurrent builds of one directory may collide
        yield
        return
    try:
        handle = open(path, "a+")
    except OSError:
        if not path.exists():
            # A directory this process may not write to (a cache prepared for it, read-only): no
            # process can build there, so there is nothing to wait for.
            yield
            return
        handle = open(path)  # flock needs no write access
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _warn(cause: str) -> None:
    warnings.warn(
        f"lightning_moe: CUDA kernels unavailable because {cause}; using the pure-PyTorch ops instead.",
        RuntimeWarning,
        stacklevel=3,
    )


def _last_lines(text: str, count: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-count:])
