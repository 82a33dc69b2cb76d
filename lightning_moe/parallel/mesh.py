"""The device mesh of expert parallelism: mesh axis names and sizes live here only.

The world of W ranks is a 2-D mesh (expert_data, expert) of shape (W / EP, EP). The ranks of one
expert-parallel group are contiguous (global ranks ``[i * EP, (i + 1) * EP)``), so on machines of
EP or more GPUs the all-to-all of a group stays inside one machine, and the expert-data-parallel
groups (the ranks holding the same experts) span the machines.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

EXPERT_AXIS = "expert"
EXPERT_DATA_AXIS = "expert_data"


def check_expert_parallel_size(expert_parallel_size: int, world_size: int) -> None:
    """Raise a ``ValueError`` naming the fix when EP cannot tile the world."""
    if expert_parallel_size < 1:
        raise ValueError(f"expert_parallel_size must be at least 1, got {expert_parallel_size}.")
    if expert_parallel_size > world_size:
        raise ValueError(
            f"expert_parallel_size={expert_parallel_size} is larger than the {world_size} processes of this run; "
            f"use at most {world_size}, or launch more processes (devices x num_nodes)."
        )
    if world_size % expert_parallel_size:
        raise ValueError(
            f"expert_parallel_size={expert_parallel_size} does not divide the world size {world_size}; "
            f"choose a divisor of {world_size}."
        )


def build_expert_mesh(device_type: str, world_size: int, expert_parallel_size: int) -> DeviceMesh:
    """The (expert_data, expert) mesh over all ranks; the process group must be initialised.

    Args:
        device_type: "cuda" or "cpu".
        world_size: Number of ranks W.
        expert_parallel_size: EP, dividing W.
    """
    check_expert_parallel_size(expert_parallel_size, world_size)
    return init_device_mesh(
        device_type,
        (world_size // expert_parallel_size, expert_parallel_size),
        mesh_dim_names=(EXPERT_DATA_AXIS, EXPERT_AXIS),
    )
