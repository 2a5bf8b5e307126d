"""Networks: DiT (static) and DyDiT (dynamic width and tokens)."""

from dydit.models.dit import DiT, DiTBlock, FinalLayer
from dydit.models.dydit import DyDiT, DyDiTBlock, RoutingStats, WidthPlan, execution
from dydit.models.sliced import SlicedDyDiT, engine

__all__ = [
    "DiT",
    "DiTBlock",
    "DyDiT",
    "DyDiTBlock",
    "FinalLayer",
    "RoutingStats",
    "SlicedDyDiT",
    "WidthPlan",
    "engine",
    "execution",
]
