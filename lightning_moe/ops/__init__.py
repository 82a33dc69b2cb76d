"""Kernels of the MoE layer's glue: sorting assignments by expert, permuting rows, combining them.

One op per module (``sort_by_expert``, ``capacity_mask``, ``permute``, ``unpermute``, ``activation``,
``topk_route``, ``router_logits``), each a
``torch.library`` custom op on CUDA (kernels in ``src_cuda/``, built on first use by
:mod:`lightning_moe.ops.extension`) with a pure-PyTorch reference in :mod:`lightning_moe.ops.reference`
for CPU, for when the extension is unavailable, and for tests. :mod:`lightning_moe.ops.grouped_mm`
runs the experts as grouped GEMMs; :mod:`lightning_moe.ops.topk_route` fuses a token-choice router's
scoring, top-k and loss sums (and, eager, runs them with the router's logits in one autograd node);
:mod:`lightning_moe.ops.router_logits` computes a router's float32 logits and their gradients
without float32 copies of the tokens; :mod:`lightning_moe.ops.activation` fuses
the experts' activation, plain or gated (SwiGLU, GeGLU); :mod:`lightning_moe.ops.grouped_linear` runs the
experts' GEMMs on Hopper tensor-core kernels of its own where experts get few rows each, and
:mod:`lightning_moe.ops.expert_mlp` runs those kernels, a dropless layer's permutation and combine
included, in two autograd nodes (eager);
:mod:`lightning_moe.ops.cast` casts float32 tensors (the expert weights under mixed precision) to
bfloat16 or float16 with a faster cast of their gradients back to float32, and keeps the casts of
the weights an optimizer step updates (:func:`lightning_moe.ops.cast.keep_casts`);
:mod:`lightning_moe.ops.adamw` is the AdamW step of :class:`lightning_moe.optim.AdamW`.
"""

from lightning_moe.ops.activation import activation, glu
from lightning_moe.ops.capacity_mask import capacity_mask
from lightning_moe.ops.cast import cast, fork_cast
from lightning_moe.ops.extension import cuda_kernels_available, load_extension
from lightning_moe.ops.permute import permute
from lightning_moe.ops.reference import expert_histogram, token_offsets
from lightning_moe.ops.router_logits import router_logits
from lightning_moe.ops.sort_by_expert import sort_by_expert, sort_by_expert_with_ends
from lightning_moe.ops.topk_route import TopKRoute, router_topk_route, topk_route
from lightning_moe.ops.unpermute import unpermute

__all__ = [
    "activation",
    "capacity_mask",
    "cast",
    "cuda_kernels_available",
    "expert_histogram",
    "fork_cast",
    "glu",
    "load_extension",
    "permute",
    "router_logits",
    "router_topk_route",
    "sort_by_expert",
    "sort_by_expert_with_ends",
    "token_offsets",
    "TopKRoute",
    "topk_route",
    "unpermute",
]
