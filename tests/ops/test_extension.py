"""The CUDA extension loader: its fallbacks, its single warning, its cache key, its lock."""

from __future__ import annotations

import functools
import importlib.util
import shutil
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from lightning_moe.ops import __main__ as ops_main
from lightning_moe.ops import extension


@pytest.fixture(autouse=True)
def fresh_loader(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A loader with nothing memoised and an empty cache, for this test only; the process's own
    loader stays as it was."""
    monkeypatch.delenv(extension.DISABLE_ENV, raising=False)
    # A finished build in the machine's cache would be imported without a compiler.
    monkeypatch.setenv(extension.CACHE_ENV, str(tmp_path / "empty_cache"))
    monkeypatch.setattr(extension, "load_extension", functools.cache(extension.load_extension.__wrapped__))


def load_and_collect_warnings() -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = extension.load_extension()
    return module, [str(w.message) for w in caught]


PROBE_SOURCE = """
#include <pybind11/pybind11.h>
int answer() { return 42; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", &answer); }
"""


def _toolchain_present(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, present: bool) -> None:
    """A CUDA toolkit (an nvcc under CUDA_HOME) and ninja as far as the loader can tell, or neither."""
    from torch.utils import cpp_extension

    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True, exist_ok=True)
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(nvcc.parents[1]) if present else None)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: present)


def test_disabled_by_environment_returns_none_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(extension.DISABLE_ENV, "1")
    module, messages = load_and_collect_warnings()
    assert module is None
    assert len(messages) == 1
    assert f"{extension.DISABLE_ENV}=1" in messages[0]


def test_without_cuda_returns_none_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    module, messages = load_and_collect_warnings()
    assert module is None
    assert len(messages) == 1
    cause = "built without CUDA" if torch.version.cuda is None else "CUDA is not available"
    assert cause in messages[0]


def test_warning_is_given_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(extension.DISABLE_ENV, "1")
    load_and_collect_warnings()
    module, messages = load_and_collect_warnings()
    assert module is None and messages == []


def test_failed_build_returns_none_naming_the_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_build(arch: str) -> None:
        raise RuntimeError("Error building extension\nnvcc: fatal error: boom")

    monkeypatch.setattr(extension, "_current_arch", lambda: "9.0")
    monkeypatch.setattr(extension, "build_extension", failing_build)
    module, messages = load_and_collect_warnings()
    assert module is None
    assert len(messages) == 1
    assert "the build failed" in messages[0] and "boom" in messages[0]


def test_missing_nvcc_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils import cpp_extension

    monkeypatch.setattr(extension, "_current_arch", lambda: "9.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    module, messages = load_and_collect_warnings()
    assert module is None
    assert len(messages) == 1 and "nvcc was not found" in messages[0]


def test_cpu_tensors_never_trigger_a_build(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden() -> None:
        raise AssertionError("load_extension was called for CPU tensors")

    monkeypatch.setattr(extension, "load_extension", forbidden)
    assert not extension.use_cuda_kernels(torch.zeros(2), torch.zeros(2, dtype=torch.int64))


def test_cache_key_changes_with_the_sources(tmp_path: Path) -> None:
    sources = tmp_path / "src_cuda"
    shutil.copytree(extension.source_dir(), sources)
    key = extension.cache_key(sources, "9.0")
    assert extension.cache_key(sources, "9.0") == key
    assert extension.cache_key(sources, "8.0") != key
    header = sources / "rows.cuh"
    header.write_text(header.read_text() + "\n// changed\n")
    assert extension.cache_key(sources, "9.0") != key


def test_cache_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(extension.CACHE_ENV, str(tmp_path))
    assert extension.cache_root() == tmp_path
    monkeypatch.delenv(extension.CACHE_ENV)
    assert extension.cache_root() == Path.home() / ".cache" / "lightning_moe"


def test_every_kernel_source_is_compiled() -> None:
    names = [path.name for path in extension.compiled_sources(extension.source_dir())]
    assert names == [
        "activation.cu",
        "adamw.cu",
        "bindings.cpp",
        "capacity_mask.cu",
        "cast.cu",
        "grouped_gemm.cu",
        "grouped_gemm_weight_grad.cu",
        "permute.cu",
        "router_logits.cu",
        "router_logits_backward.cu",
        "router_logits_few.cu",
        "router_logits_tc.cu",
        "sort_by_expert.cu",
        "topk_route.cu",
        "topk_route_backward.cu",
        "unpermute.cu",
    ]


def test_wheels_carry_every_kernel_source() -> None:
    """Installed packages find the sources in lightning_moe/_cuda_sources, which package-data fills."""
    tomllib = pytest.importorskip("tomllib")
    root = Path(extension.__file__).resolve().parents[2]
    assert extension.source_dir() == (root / "src_cuda").resolve()
    config = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["lightning_moe"]
    package = root / "lightning_moe"
    shipped = {path.resolve() for pattern in patterns for path in package.glob(pattern)}
    sources = {path.resolve() for path in (root / "src_cuda").iterdir() if path.is_file()}
    assert sources <= shipped, f"not in the wheel: {sorted(p.name for p in sources - shipped)}"


def test_arch_flags_name_only_the_given_arch() -> None:
    assert extension.arch_flags("9.0") == ["-gencode=arch=compute_90a,code=sm_90a"]
    assert extension.arch_flags("8.0") == ["-gencode=arch=compute_80,code=sm_80"]


def test_lock_lets_one_holder_in_at_a_time(tmp_path: Path) -> None:
    lock = tmp_path / "build.lock"
    held = threading.Event()
    released_at: list[float] = []

    def holder() -> None:
        with extension._exclusive_lock(lock):
            held.set()
            time.sleep(0.2)
            released_at.append(time.monotonic())

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait()
    with extension._exclusive_lock(lock):
        acquired_at = time.monotonic()
    thread.join()
    assert acquired_at >= released_at[0]


def test_a_killed_builds_lock_file_does_not_block_the_next_load(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from torch.utils import cpp_extension

    _toolchain_present(monkeypatch, tmp_path, True)
    lock_seen_by_load: list[bool] = []

    def load(*, build_directory: str, **kwargs: object) -> object:
        # torch's load waits while this file exists: it must be gone by the time load runs.
        lock_seen_by_load.append((Path(build_directory) / "lock").exists())
        return object()

    monkeypatch.setattr(cpp_extension, "load", load)
    _, build_dir = extension.build_extension("9.0", cache_dir=tmp_path)  # the first build
    (build_dir / "lock").write_text("")  # what a build killed inside torch's load leaves behind
    _, again = extension.build_extension("9.0", cache_dir=tmp_path)
    assert again == build_dir
    assert lock_seen_by_load == [False, False]


def test_installs_of_the_same_sources_at_two_paths_share_one_build(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from torch.utils import cpp_extension

    checkouts = [tmp_path / "one" / "src_cuda", tmp_path / "two" / "src_cuda"]
    for checkout in checkouts:
        shutil.copytree(extension.source_dir(), checkout)
    _toolchain_present(monkeypatch, tmp_path, True)
    compiled: list[list[str]] = []

    def load(*, sources: list[str], **kwargs: object) -> object:
        # ninja rebuilds when a source's path changes: the paths must be the same for both installs.
        compiled.append(sources)
        for source in sources:  # the copies compile what the originals hold, headers beside them
            assert Path(source).read_bytes() == (checkouts[0] / Path(source).name).read_bytes()
            assert (Path(source).parent / "checks.h").is_file()
        return object()

    monkeypatch.setattr(cpp_extension, "load", load)
    build_dirs = []
    for checkout in [*checkouts, checkouts[0]]:
        monkeypatch.setattr(extension, "source_dir", lambda checkout=checkout: checkout)
        build_dirs.append(extension.build_extension("9.0", cache_dir=tmp_path / "cache")[1])
    assert build_dirs[0] == build_dirs[1] == build_dirs[2]
    assert compiled[0] == compiled[1] == compiled[2]
    assert all(Path(source).parent == build_dirs[0] / "src" for source in compiled[0])
    assert {Path(source).name for source in compiled[0]} == {p.name for p in extension.compiled_sources(checkouts[0])}


@pytest.mark.skipif(shutil.which("c++") is None, reason="builds a small C++ extension")
def test_a_finished_build_loads_without_nvcc_or_ninja(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from torch.utils import cpp_extension

    real_load = cpp_extension.load
    probe = tmp_path / "probe.cpp"
    probe.write_text(PROBE_SOURCE)
    builds: list[str] = []

    def load(*, build_directory: str, **kwargs: object) -> object:
        # A real (C++) extension module built into the build directory, as the CUDA one is.
        builds.append(build_directory)
        return real_load(name="lightning_moe_probe", sources=[str(probe)], build_directory=build_directory)

    monkeypatch.setattr(cpp_extension, "load", load)
    _toolchain_present(monkeypatch, tmp_path, True)
    module, build_dir = extension.build_extension("9.0", cache_dir=tmp_path / "cache")
    assert module.answer() == 42
    # A node without the CUDA toolkit or ninja: the finished build still loads, and nothing is built.
    _toolchain_present(monkeypatch, tmp_path, False)
    again, again_dir = extension.build_extension("9.0", cache_dir=tmp_path / "cache")
    assert again_dir == build_dir and again.answer() == 42
    assert builds == [str(build_dir)]


def _python_module_build(builds: list[str]) -> object:
    """A stand-in for torch's load that "builds" an importable module file into the build directory."""

    def load(*, build_directory: str, **kwargs: object) -> object:
        builds.append(build_directory)
        path = Path(build_directory) / "lightning_moe_cuda.py"
        path.write_text("ANSWER = 42\n")
        spec = importlib.util.spec_from_file_location("lightning_moe_cuda", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.mark.parametrize("lock_file", ["present", "absent"])
def test_a_finished_build_in_a_read_only_cache_loads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, lock_file: str
) -> None:
    from torch.utils import cpp_extension

    builds: list[str] = []
    monkeypatch.setattr(cpp_extension, "load", _python_module_build(builds))
    _toolchain_present(monkeypatch, tmp_path, True)
    _, build_dir = extension.build_extension("9.0", cache_dir=tmp_path / "cache")
    if lock_file == "absent":
        (build_dir / "build.lock").unlink()
    # Read-only from now on (tests may run as root, whom permissions do not stop): no file opens
    # for writing, and there is no toolchain either.
    real_open = open

    def read_only_open(path: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        if any(flag in mode for flag in "wax+"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, mode, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(extension, "open", read_only_open, raising=False)
    _toolchain_present(monkeypatch, tmp_path, False)
    module, again = extension.build_extension("9.0", cache_dir=tmp_path / "cache")
    assert again == build_dir and module.ANSWER == 42  # type: ignore[attr-defined]
    assert builds == [str(build_dir)]


def test_an_uncreatable_build_directory_names_the_fix(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("")
    with pytest.raises(extension.ExtensionUnavailable, match="cannot be created.*LIGHTNING_MOE_CACHE"):
        extension.build_extension("9.0", cache_dir=blocker)


def test_a_damaged_finished_build_is_built_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from torch.utils import cpp_extension

    _toolchain_present(monkeypatch, tmp_path, True)
    builds: list[str] = []

    def load(*, build_directory: str, **kwargs: object) -> object:
        builds.append(build_directory)
        return object()

    monkeypatch.setattr(cpp_extension, "load", load)
    _, build_dir = extension.build_extension("9.0", cache_dir=tmp_path / "cache")
    # A record that names a module file which does not import (cut short, say).
    (build_dir / "lightning_moe_cuda.so").write_bytes(b"not a library")
    marker = build_dir / extension._COMPLETE_MARKER
    marker.write_text(marker.read_text() + "module lightning_moe_cuda lightning_moe_cuda.so\n")
    extension.build_extension("9.0", cache_dir=tmp_path / "cache")
    assert builds == [str(build_dir), str(build_dir)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_build_command_without_gpu_asks_for_an_arch(capsys: pytest.CaptureFixture[str]) -> None:
    assert ops_main.main(["build"]) == 1
    assert "--arch" in capsys.readouterr().err
