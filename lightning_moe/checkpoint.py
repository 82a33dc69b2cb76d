"""Sharded MoE checkpoints: every rank's experts saved once, loadable at any expert-parallel size.

A checkpoint is a directory:

- ``common.pt``: the Lightning checkpoint without the routed experts' weights and optimizer
  state, plus a ``"lightning_moe"`` entry recording the format, the expert-parallel size it was
  written with, each MoE layer's ``num_experts``, the optimizers' parameter order and versions.
- ``experts-RRRRR-of-PPPPP.pt``, one per expert-parallel rank: that rank's experts under their
  *global* indices, and their optimizer state. Only one replica of each expert writes.

Stacked expert tensors (``w1`` etc., expert dimension first) are stored as the slice
``[first, last)`` of the global tensor; experts given as modules are stored under their global
index (``layer.experts.experts.<e>.*``). Loading assembles any range of global experts from the
shards that cover it, so a run can resume on a different number of processes.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_moe.layers.experts import ModuleListExperts
from lightning_moe.layers.moe import MoE

FORMAT_VERSION = 1
COMMON_FILE = "common.pt"
METADATA_KEY = "lightning_moe"


@dataclass(frozen=True)
class ExpertShard:
    """Where one MoE layer's local experts sit: global experts ``[first, last)`` of ``num_experts``."""

    prefix: str  # "<layer>.experts."
    num_experts: int
    first: int
    last: int
    stacked: bool  # True: tensors with the expert dimension first; False: one module per expert


def shard_file(rank: int, size: int) -> str:
    return f"experts-{rank:05d}-of-{size:05d}.pt"


def expert_shards(module: nn.Module) -> list[ExpertShard]:
    """The expert layout of every MoE layer in ``module`` as it is now (sharded or whole)."""
    shards = []
    for name, layer in module.named_modules():
        if isinstance(layer, MoE):
            experts = layer.experts
            first = experts.expert_offset
            prefix = f"{name}.experts." if name else "experts."
            stacked = not isinstance(experts, ModuleListExperts)
            shards.append(ExpertShard(prefix, layer.num_experts, first, first + experts.num_experts, stacked))
    return shards


def _owner(key: str, shards: list[ExpertShard]) -> ExpertShard | None:
    return next((shard for shard in shards if key.startswith(shard.prefix)), None)


def _rebase(key: str, shard: ExpertShard, delta: int) -> str:
    """Shift the expert index of a module-expert key (``<prefix>experts.<e>.…``) by ``delta``."""
    match = re.match(re.escape(shard.prefix) + r"experts\.(\d+)\.(.*)", key)
    if match is None:
        raise ValueError(f"Unexpected expert state key {key!r}.")
    return f"{shard.prefix}experts.{int(match.group(1)) + delta}.{match.group(2)}"


def split_state(
    checkpoint: dict[str, Any], module: nn.Module, optimizer_param_names: list[list[str]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a Lightning checkpoint into its replicated part and this rank's expert shard.

    Args:
        checkpoint: The checkpoint Lightning dumped on this rank (modified in place).
        module: The LightningModule (for its current expert layout).
        optimizer_param_names: For each optimizer, the parameter name at each state index.

    Returns:
        ``(common, shard)``; the shard holds ``state_dict`` and per-optimizer ``optimizer`` state,
        both keyed by global expert names.
    """
    shards = expert_shards(module)
    state_dict = checkpoint["state_dict"]
    expert_state = {}
    for key in list(state_dict):
        shard = _owner(key, shards)
        if shard is None:
            continue
        global_key = key if shard.stacked else _rebase(key, shard, shard.first)
        expert_state[global_key] = state_dict.pop(key)
    expert_optimizer_states = []
    for opt_state, names in zip(checkpoint.get("optimizer_states", []), optimizer_param_names, strict=False):
        moved = {}
        for index, name in enumerate(names):
            shard = _owner(name, shards)
            if shard is not None and index in opt_state["state"]:
                global_name = name if shard.stacked else _rebase(name, shard, shard.first)
                moved[global_name] = opt_state["state"].pop(index)
        expert_optimizer_states.append(moved)
    shard_meta = [(s.prefix, s.first, s.last) for s in shards]
    return checkpoint, {"state_dict": expert_state, "optimizer": expert_optimizer_states, "ranges": shard_meta}


def checkpoint_metadata(module: nn.Module, expert_parallel_size: int, optimizer_param_names: list[list[str]]) -> dict:
    import lightning

    import lightning_moe

    return {
        "format": FORMAT_VERSION,
        "expert_parallel_size": expert_parallel_size,
        "layers": {shard.prefix: shard.num_experts for shard in expert_shards(module)},
        "optimizer_param_names": optimizer_param_names,
        "versions": {
            "lightning_moe": lightning_moe.__version__,
            "torch": torch.__version__,
            "lightning": lightning.__version__,
        },
    }


def write_atomically(
    path: str | Path, write: Callable[[Path], None], barrier: Callable[[], None], is_leader: bool
) -> None:
    """Write a checkpoint directory so that a crash at any point leaves the previous one whole.

    Every rank calls this. The leader prepares ``<path>.partial``; every rank's ``write`` fills
    it; the leader then swaps it in: ``<path>`` -> ``<path>.old``, ``.partial`` -> ``<path>``,
    then deletes ``.old``. :func:`resolve` falls back to ``.old`` if a crash hit between renames.
    """
    final = Path(path)
    partial, old = final.with_name(final.name + ".partial"), final.with_name(final.name + ".old")
    if is_leader:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    write(partial)
    barrier()
    if is_leader:
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        partial.rename(final)
        shutil.rmtree(old, ignore_errors=True)


def resolve(path: str | Path) -> Path:
    """The checkpoint directory to read: ``path``, or the ``.old`` copy a crash left behind."""
    final = Path(path)
    old = final.with_name(final.name + ".old")
    if not final.exists() and old.exists():
        return old
    if not (final / COMMON_FILE).exists():
        raise FileNotFoundError(f"{final} is not a lightning_moe checkpoint directory (no {COMMON_FILE}).")
    return final


def is_sharded_checkpoint(path: str | Path) -> bool:
    final = Path(path)
    return (final / COMMON_FILE).exists() or (final.with_name(final.name + ".old") / COMMON_FILE).exists()


class ShardReader:
    """Reads the expert shards of a checkpoint directory and assembles any range of experts."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.shards = [
            torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            for p in sorted(directory.glob("experts-*.pt"))
        ]

    def _ranges(self, prefix: str) -> list[tuple[dict, int, int]]:
        found = []
        for shard in self.shards:
            for shard_prefix, first, last in shard["ranges"]:
                if shard_prefix == prefix:
                    found.append((shard, first, last))
        return sorted(found, key=lambda item: item[1])

    def stacked(self, prefix: str, key: str, first: int, last: int, optimizer: int | None = None) -> Any:
        """Global experts ``[first, last)`` of stacked tensor ``key`` (or of its optimizer state)."""
        pieces = []
        for shard, shard_first, shard_last in self._ranges(prefix):
            lo, hi = max(first, shard_first), min(last, shard_last)
            if lo >= hi:
                continue
            source = shard["state_dict"] if optimizer is None else shard["optimizer"][optimizer]
            if key not in source:
                return None
            pieces.append((source[key], lo - shard_first, hi - shard_first))
        if not pieces or sum(hi - lo for _, lo, hi in pieces) != last - first:
            raise ValueError(f"The checkpoint's shards do not cover experts [{first}, {last}) of {prefix!r}.")
        return _concat_slices(pieces)

    def by_global_key(self, key: str, optimizer: int | None = None) -> Any:
        for shard in self.shards:
            source = shard["state_dict"] if optimizer is None else shard["optimizer"][optimizer]
            if key in source:
                return source[key]
        return None


def _concat_slices(pieces: list[tuple[Any, int, int]]) -> Any:
    """Concatenate expert slices of tensors, or of dicts of tensors (optimizer state)."""
    first = pieces[0][0]
    if isinstance(first, dict):
        return {name: _concat_slices([(value[name], lo, hi) for value, lo, hi in pieces]) for name in first}
    if isinstance(first, Tensor) and first.dim() > 0:
        return torch.cat([value[lo:hi] for value, lo, hi in pieces]).clone()
    return first  # scalars such as Adam's step are the same in every shard


def check_compatible(metadata: dict, module: nn.Module) -> None:
    """Raise a ``ValueError`` naming every MoE layer that differs between checkpoint and model."""
    saved = metadata["layers"]
    current = {shard.prefix: shard.num_experts for shard in expert_shards(module)}
    if saved == current:
        return
    problems = [
        f"{p}: checkpoint {saved.get(p)} experts, model {current.get(p)}"
        for p in sorted(set(saved) | set(current))
        if saved.get(p) != current.get(p)
    ]
    raise ValueError(
        "The checkpoint's MoE layers do not match the model's (None = layer missing): "
        + "; ".join(problems)
        + ". Build the model with the same layers and num_experts as the checkpoint."
    )


def load_local(path: str | Path, module: nn.Module, optimizer_param_names: list[list[str]]) -> dict[str, Any]:
    """The Lightning checkpoint for this rank: replicated state plus this rank's experts.

    Args:
        path: A checkpoint directory written at any expert-parallel size.
        module: The LightningModule, already sharded for this run.
        optimizer_param_names: For each optimizer of this run, the parameter name at each index.
    """
    directory = resolve(path)
    checkpoint = torch.load(directory / COMMON_FILE, map_location="cpu", weights_only=False)
    metadata = checkpoint.get(METADATA_KEY)
    if metadata is None or metadata.get("format") != FORMAT_VERSION:
        raise ValueError(f"{directory} was not written by this version of lightning_moe (format {FORMAT_VERSION}).")
    check_compatible(metadata, module)
    reader = ShardReader(directory)
    shards = expert_shards(module)
    state_dict = checkpoint["state_dict"]
    for key in module.state_dict():
        shard = _owner(key, shards)
        if shard is not None:
            state_dict[key] = _read_expert(reader, shard, key, optimizer=None)
    if "optimizer_states" in checkpoint:
        if metadata["optimizer_param_names"] != optimizer_param_names:
            raise ValueError(
                "The checkpoint's optimizers hold other parameters than this run's; configure the same optimizers."
            )
        for index, (opt_state, names) in enumerate(
            zip(checkpoint["optimizer_states"], optimizer_param_names, strict=True)
        ):
            for position, name in enumerate(names):
                shard = _owner(name, shards)
                value = None if shard is None else _read_expert(reader, shard, name, optimizer=index)
                if value is not None:
                    opt_state["state"][position] = value
    return checkpoint


def localize(checkpoint: dict[str, Any], module: nn.Module, optimizer_param_names: list[list[str]]) -> dict[str, Any]:
    """Cut a whole-model checkpoint (one file, all experts) down to this rank's experts, in place."""
    shards = expert_shards(module)
    if "optimizer_states" in checkpoint and not all(shard.stacked for shard in shards):
        raise ValueError(
            "A one-file checkpoint of experts given as modules can only be resumed from a sharded checkpoint; "
            "save it with MoEStrategy, or load only its weights."
        )
    state_dict = checkpoint["state_dict"]
    for key in list(state_dict):
        shard = _owner(key, shards)
        if shard is not None:
            state_dict.update(_localize_entry(key, state_dict.pop(key), shard))
    for opt_state, names in zip(checkpoint.get("optimizer_states", []), optimizer_param_names, strict=False):
        for position, name in enumerate(names):
            shard = _owner(name, shards)
            if shard is not None and shard.stacked and position in opt_state["state"]:
                opt_state["state"][position] = {
                    k: v[shard.first : shard.last] if isinstance(v, Tensor) and v.dim() > 0 else v
                    for k, v in opt_state["state"][position].items()
                }
    return checkpoint


def _localize_entry(key: str, value: Tensor, shard: ExpertShard) -> dict[str, Tensor]:
    if shard.stacked:
        return {key: value[shard.first : shard.last]}
    local_key = _rebase(key, shard, -shard.first)
    match = re.match(re.escape(shard.prefix) + r"experts\.(-?\d+)\.", local_key)
    assert match is not None  # _rebase wrote the key in this form
    index = int(match.group(1))
    return {local_key: value} if 0 <= index < shard.last - shard.first else {}


def _read_expert(reader: ShardReader, shard: ExpertShard, key: str, optimizer: int | None) -> Any:
    if shard.stacked:
        return reader.stacked(shard.prefix, key, shard.first, shard.last, optimizer=optimizer)
    return reader.by_global_key(_rebase(key, shard, shard.first), optimizer=optimizer)


def consolidate_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The full LightningModule state dict of a sharded checkpoint, all experts included.

    The keys and shapes are those of the single-device model's ``state_dict()``, whatever the
    expert-parallel size the checkpoint was written with.
    """
    directory = resolve(path)
    checkpoint = torch.load(directory / COMMON_FILE, map_location="cpu", weights_only=False)
    return _full_state_dict(directory, checkpoint)


def _full_state_dict(directory: Path, checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    reader = ShardReader(directory)
    state = dict(checkpoint["state_dict"])
    for prefix, num_experts in checkpoint[METADATA_KEY]["layers"].items():
        keys = {key for shard in reader.shards for key in shard["state_dict"] if key.startswith(prefix)}
        for key in sorted(keys):
            if re.match(re.escape(prefix) + r"experts\.\d+\.", key):
                state[key] = reader.by_global_key(key)
            else:
                state[key] = reader.stacked(prefix, key, 0, num_experts)
    return state


def write_consolidated(path: str | Path, out: str | Path) -> None:
    """Write a sharded checkpoint as one Lightning checkpoint file with all experts (no optimizer
    state), loadable with ``LightningModule.load_from_checkpoint`` on a single device."""
    directory = resolve(path)
    checkpoint = torch.load(directory / COMMON_FILE, map_location="cpu", weights_only=False)
    checkpoint["state_dict"] = _full_state_dict(directory, checkpoint)
    for key in ("optimizer_states", "lr_schedulers"):
        checkpoint.pop(key, None)
    torch.save(checkpoint, out)
