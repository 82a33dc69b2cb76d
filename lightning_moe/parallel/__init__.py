"""Communication for expert parallelism: the device mesh, the token all-to-all, expert sharding,
gradient synchronisation and clipping. The MoE layer itself never imports ``torch.distributed``."""

from lightning_moe.parallel.dispatcher import AllToAllDispatcher
from lightning_moe.parallel.gradients import clip_grad_norm_, gradient_norm, sync_expert_gradients
from lightning_moe.parallel.mesh import EXPERT_AXIS, EXPERT_DATA_AXIS, build_expert_mesh
from lightning_moe.parallel.sharding import expert_parameter_names, shard_experts

__all__ = [
    "EXPERT_AXIS",
    "EXPERT_DATA_AXIS",
    "AllToAllDispatcher",
    "build_expert_mesh",
    "clip_grad_norm_",
    "gradient_norm",
    "expert_parameter_names",
    "shard_experts",
    "sync_expert_gradients",
]
