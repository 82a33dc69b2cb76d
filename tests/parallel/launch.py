"""Run a function on N spawned CPU processes joined in a gloo process group.

Each process gets a fresh interpreter (spawn), the environment Lightning and torchrun use
(MASTER_ADDR, MASTER_PORT on a free port, WORLD_SIZE, RANK, LOCAL_RANK), and tears its process
group down at the end. Results come back through files, exceptions as their tracebacks.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_on_ranks(world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 300.0) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` processes; return each rank's result.

    Raises:
        RuntimeError: with the rank's traceback if a rank failed, or if the ranks did not finish
            within ``timeout`` seconds (a hang).
    """
    port = free_port()
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        processes = [
            context.Process(target=_worker, args=(rank, world_size, port, fn, args, out_dir))
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        errors = [Path(out_dir, f"{rank}.err") for rank in range(world_size)]
        deadline = time.monotonic() + timeout
        # Poll rather than join: once a rank fails, its peers may wait forever in a collective.
        while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
            if any(path.exists() for path in errors):
                break
            time.sleep(0.2)
        hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
        failures = [f"rank {rank}:\n{path.read_text()}" for rank, path in enumerate(errors) if path.exists()]
        if failures:
            raise RuntimeError("\n".join(failures))
        if hung:
            raise RuntimeError(f"ranks {hung} did not finish within {timeout} s")
        return [torch.load(Path(out_dir, f"{rank}.pt"), weights_only=False) for rank in range(world_size)]


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    torch.set_num_threads(1)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir, f"{rank}.pt"))
    except BaseException:
        Path(out_dir, f"{rank}.err").write_text(traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
