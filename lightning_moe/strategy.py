"""``MoEStrategy``: expert-parallel x data-parallel training as a Lightning strategy.

The world of W ranks is a mesh (expert_data, expert) of shape (W / EP, EP). Every MoE layer keeps
``num_experts / EP`` experts per rank and exchanges tokens over its expert-parallel group;
everything else is replicated and synchronised by DDP. Expert gradients are synchronised by hand
over the ranks that hold the same experts, so that every gradient equals the single-process
gradient of the global batch, and clipping by norm uses the norm of the whole model.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Generator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from lightning_moe import checkpoint as checkpoint_io
from lightning_moe.parallel.dataloader import EvenBatches
from lightning_moe.parallel.gradients import clip_grad_norm_, gradient_norm, sync_expert_gradients
from lightning_moe.parallel.mesh import EXPERT_AXIS, EXPERT_DATA_AXIS, build_expert_mesh
from lightning_moe.parallel.sharding import (
    expert_parameter_names,
    local_expert_range,
    moe_layers,
    shard_experts,
    unshard_experts,
)


class MoEStrategy(DDPStrategy):
    """Train MoE models with their experts spread over the processes.

    Args:
        expert_parallel_size: Ranks that share the experts of a layer (EP). Must divide the world
            size and every layer's ``num_experts``. Defaults to the whole world.
        **kwargs: Passed to :class:`~lightning.pytorch.strategies.DDPStrategy`
            (``process_group_backend``, ``start_method``, ``timeout``, DDP options).
    """

    strategy_name = "moe"

    def __init__(self, expert_parallel_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if expert_parallel_size is not None and (
            isinstance(expert_parallel_size, bool) or not isinstance(expert_parallel_size, int)
        ):
            raise TypeError(f"expert_parallel_size must be an int or None, got {expert_parallel_size!r}.")
        if expert_parallel_size is not None and expert_parallel_size < 1:
            raise ValueError(f"expert_parallel_size must be at least 1, got {expert_parallel_size}.")
        self._requested_expert_parallel_size = expert_parallel_size
        self._device_mesh: DeviceMesh | None = None
        self._expert_params: list[nn.Parameter] = []

    @property
    def expert_parallel_size(self) -> int:
        """EP: the number of ranks the experts of one layer are spread over."""
        return self._requested_expert_parallel_size or self.world_size

    @property
    def device_mesh(self) -> DeviceMesh:
        """The (expert_data, expert) mesh; available once the processes are initialised."""
        if self._device_mesh is None:
            raise RuntimeError("The device mesh exists only after the processes are initialised.")
        return self._device_mesh

    @property
    def expert_group(self) -> dist.ProcessGroup:
        """This rank's expert-parallel group."""
        return self.device_mesh.get_group(EXPERT_AXIS)

    @property
    def expert_data_group(self) -> dist.ProcessGroup:
        """The ranks that hold the same experts as this one."""
        return self.device_mesh.get_group(EXPERT_DATA_AXIS)

    @override
    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _MultiProcessingLauncher):  # spawn / fork
            self._launcher = _MoEMultiProcessingLauncher(self, start_method=self._launcher._start_method)

    def gather_experts(self) -> None:
        """Give every rank all experts of every MoE layer again (a collective), e.g. to hand the
        whole trained model back to the process that started the workers."""
        assert self.lightning_module is not None
        if self.expert_parallel_size > 1:
            for _, layer in moe_layers(self.lightning_module):
                unshard_experts(layer, self.expert_group)

    def destroy_process_groups(self) -> None:
        """Destroy every process group once all ranks reach this point (a barrier), and wait for
        their worker threads to finish.

        Call it when a process is done with distributed training, as PyTorch asks of a finished
        run; the spawn and fork launchers call it as each worker ends. A gloo group's worker threads
        release the tensors of its last collectives; left running into the interpreter's exit, one
        could free a tensor after the interpreter is gone, and the process would abort. The device
        mesh holds the groups too, so it is dropped (with the reference cycles through it), and a
        group that nothing else holds is freed here, its threads joined. MoE layers whose experts
        are sharded hold their expert-parallel group until :meth:`gather_experts` (which the
        launchers call first) or until they are freed.
        """
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        self._device_mesh = None
        if self.lightning_module is not None:
            self.lightning_module._device_mesh = None
        gc.collect()

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        self._device_mesh = build_expert_mesh(self.root_device.type, self.world_size, self.expert_parallel_size)
        # Like ModelParallelStrategy: `configure_model` can read `self.device_mesh`.
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh

    @override
    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        # Modules built in `configure_model` start on the meta device, so no rank ever holds all
        # experts; `setup` shards the experts, then materialises what is left.
        empty_init_context = torch.device("meta") if empty_init is not False else nullcontext()
        with empty_init_context, self.precision_plugin.tensor_init_context():
            yield

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.lightning_module is not None
        self._shard_experts(self.lightning_module)
        super().setup(trainer)
        if self.expert_parallel_size > 1:
            # Lightning clips through the precision plugin; the norm must count every rank's experts.
            self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_norm  # type: ignore[method-assign]

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        def closure_then_sync_experts() -> Any:
            result = closure()
            self._sync_expert_gradients()
            return result

        return super().optimizer_step(optimizer, closure_then_sync_experts, model, **kwargs)

    @override
    def process_dataloader(self, dataloader: Any) -> Any:
        dataloader = super().process_dataloader(dataloader)
        if self.expert_parallel_size == 1:
            return dataloader
        # Each forward exchanges tokens collectively: every rank must run the same number of them.
        return EvenBatches(dataloader, self.root_device, self.global_rank)

    def _shard_experts(self, module: pl.LightningModule) -> None:
        layers = list(moe_layers(module))
        _check_ranks_agree(layers, self.world_size)
        if not layers:
            rank_zero_warn("MoEStrategy found no MoE layer in the model; it trains as plain DDP.")
        expert_parallel_size = self.expert_parallel_size
        expert_rank = self.device_mesh.get_local_rank(EXPERT_AXIS)
        for _, layer in layers:
            local_expert_range(layer.num_experts, expert_rank, expert_parallel_size)  # raises on a bad EP
        for _, layer in layers:
            already_sharded = layer.experts.num_experts != layer.num_experts
            if expert_parallel_size > 1 and not already_sharded:
                shard_experts(layer, expert_rank, expert_parallel_size, self.expert_group)
        _materialize_distributed_module(module, self.root_device)
        names = expert_parameter_names(module) if expert_parallel_size > 1 else []
        # DDP neither buckets nor broadcasts these: each rank keeps and syncs its own experts.
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
        parameters = dict(module.named_parameters())
        self._expert_params = [parameters[name] for name in names]

    def _sync_expert_gradients(self) -> None:
        if self._expert_params:
            sync_expert_gradients(self._expert_params, self.expert_data_group, self.world_size)

    def gradient_norm(self, optimizer: Optimizer, norm_type: float = 2.0) -> Tensor:
        """The norm of the gradient of ``optimizer``'s parameters over the whole model, as one
        process would compute it: each rank's experts counted once, combined over the
        expert-parallel group (call it on every rank). Gradient clipping by norm uses it."""
        replicated, experts = self._replicated_and_expert_params(optimizer)
        group = self.expert_group if experts else None
        return gradient_norm(replicated, experts, group, norm_type)

    def _clip_grad_by_norm(self, optimizer: Optimizer, clip_val: float) -> None:
        replicated, experts = self._replicated_and_expert_params(optimizer)
        clip_grad_norm_(replicated, experts, float(clip_val), self.expert_group)

    def _replicated_and_expert_params(self, optimizer: Optimizer) -> tuple[list[Tensor], list[Tensor]]:
        expert_ids = {id(p) for p in self._expert_params}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return [p for p in params if id(p) not in expert_ids], [p for p in params if id(p) in expert_ids]

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # A checkpoint is read after sharding, so each rank loads only the experts it holds.
        return True

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Write ``filepath`` as a sharded checkpoint directory (see :mod:`lightning_moe.checkpoint`).

        Every rank must call this (``Trainer.save_checkpoint`` and ``ModelCheckpoint`` do).
        """
        if storage_options is not None:
            raise TypeError("MoEStrategy writes checkpoints itself and takes no `storage_options`.")
        assert self.lightning_module is not None
        names = self._optimizer_param_names()
        common, shard = checkpoint_io.split_state(checkpoint, self.lightning_module, names)
        common[checkpoint_io.METADATA_KEY] = checkpoint_io.checkpoint_metadata(
            self.lightning_module, self.expert_parallel_size, names
        )
        writes_experts = self.device_mesh.get_local_rank(EXPERT_DATA_AXIS) == 0
        expert_rank = self.device_mesh.get_local_rank(EXPERT_AXIS)

        def write(directory: Path) -> None:
            if self.is_global_zero:
                torch.save(common, directory / checkpoint_io.COMMON_FILE)
            if writes_experts:
                torch.save(shard, directory / checkpoint_io.shard_file(expert_rank, self.expert_parallel_size))

        checkpoint_io.write_atomically(filepath, write, self.barrier, self.is_global_zero)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        assert self.lightning_module is not None
        names = self._optimizer_param_names()
        if checkpoint_io.is_sharded_checkpoint(checkpoint_path):
            return checkpoint_io.load_local(checkpoint_path, self.lightning_module, names)
        # A one-file checkpoint holds every expert (e.g. a consolidated one): keep this rank's.
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        return checkpoint_io.localize(checkpoint, self.lightning_module, names)

    def _optimizer_param_names(self) -> list[list[str]]:
        assert self.lightning_module is not None
        name_of = {id(param): name for name, param in self.lightning_module.named_parameters()}
        return [[name_of[id(p)] for group in opt.param_groups for p in group["params"]] for opt in self.optimizers]

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="Expert-parallel x data-parallel MoE training (lightning_moe)"
        )


class _MoEMultiProcessingLauncher(_MultiProcessingLauncher):
    """Lightning's spawn/fork launcher, returning the whole model (all experts) to the main process."""

    @override
    def _collect_rank_zero_results(self, trainer: pl.Trainer, results: Any) -> Any:
        # The worker ends after this: its experts need not be sharded again.
        assert isinstance(self._strategy, MoEStrategy)
        self._strategy.gather_experts()
        return super()._collect_rank_zero_results(trainer, results)

    @override
    def _wrapping_function(self, *args: Any, **kwargs: Any) -> None:
        super()._wrapping_function(*args, **kwargs)
        # The worker process ends here: its process groups go now, not at the interpreter's exit.
        assert isinstance(self._strategy, MoEStrategy)
        self._strategy.destroy_process_groups()


def _check_ranks_agree(layers: list, world_size: int) -> None:
    """Raise on every rank, before any exchange could hang, if the ranks' MoE layers differ."""
    signature = [(name, type(layer.router).__name__, layer.num_experts, layer.top_k) for name, layer in layers]
    if world_size == 1 or not dist.is_initialized():
        return
    signatures: list[Any] = [None] * world_size
    dist.all_gather_object(signatures, signature)
    for rank, other in enumerate(signatures):
        if other != signatures[0]:
            raise ValueError(
                f"The ranks disagree on the MoE layers (name, router, num_experts, top_k): rank 0 has "
                f"{signatures[0]}, rank {rank} has {other}. Build the same model on every rank."
            )
