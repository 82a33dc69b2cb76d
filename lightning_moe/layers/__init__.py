"""Model maths: the MoE layer, its experts and the steps between router and experts."""

from lightning_moe.layers.experts import GroupedExperts, ModuleListExperts
from lightning_moe.layers.moe import MoE, TokenDispatcher

__all__ = ["GroupedExperts", "MoE", "ModuleListExperts", "TokenDispatcher"]
