"""lightning_moe: Mixture-of-Experts layers and training for PyTorch Lightning."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_moe.layers import MoE
from lightning_moe.routers import Router

if TYPE_CHECKING:
    from lightning_moe.module import MoELightningModule

__all__ = ["MoE", "MoELightningModule", "Router"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lightning takes seconds to import; users of the bare layer should not pay for it.
    if name == "MoELightningModule":
        from lightning_moe.module import MoELightningModule

        return MoELightningModule
    raise AttributeError(f"module 'lightning_moe' has no attribute {name!r}")
