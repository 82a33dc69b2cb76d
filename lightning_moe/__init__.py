"""lightning_moe: Mixture-of-Experts layers and training for PyTorch Lightning."""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_moe.conversion import moefy
from lightning_moe.layers import MoE
from lightning_moe.module import MoELightningModule
from lightning_moe.routers import Router
from lightning_moe.strategy import MoEStrategy

# Lightning only registers its own strategies; this makes `Trainer(strategy="moe")` work.
if MoEStrategy.strategy_name not in StrategyRegistry:
    MoEStrategy.register_strategies(StrategyRegistry)

__all__ = ["MoE", "MoELightningModule", "MoEStrategy", "Router", "moefy"]
__version__ = "0.1.0"
