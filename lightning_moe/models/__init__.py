"""Ready-made models built from MoE layers."""

from lightning_moe.models.gpt import MoEGPT, MoEGPTModule

__all__ = ["MoEGPT", "MoEGPTModule"]
