"""Kernels of the MoE layer's glue: sorting assignments by expert, permuting rows, combining them.

One op per module (``sort_by_expert``, ``permute``, ``unpermute``), each a ``torch.library`` custom op
on CUDA (kernels in ``src_cuda/``, built on first use by :mod:`lightning_moe.ops.extension`) with a
pure-PyTorch reference in :mod:`lightning_moe.ops.reference` for CPU, for when the extension is
unavailable, and for tests. :mod:`lightning_moe.ops.grouped_mm` runs the experts as grouped GEMMs.
"""

from lightning_moe.ops.extension import cuda_kernels_available, load_extension
from lightning_moe.ops.permute import permute
from lightning_moe.ops.reference import expert_histogram, token_offsets
from lightning_moe.ops.sort_by_expert import sort_by_expert
from lightning_moe.ops.unpermute import unpermute

__all__ = [
    "cuda_kernels_available",
    "expert_histogram",
    "load_extension",
    "permute",
    "sort_by_expert",
    "token_offsets",
    "unpermute",
]
