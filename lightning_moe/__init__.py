"""lightning_moe: Mixture-of-Experts layers and training for PyTorch Lightning."""

from lightning_moe.layers import MoE
from lightning_moe.module import MoELightningModule
from lightning_moe.routers import Router

__all__ = ["MoE", "MoELightningModule", "Router"]
__version__ = "0.1.0"
