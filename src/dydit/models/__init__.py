"""Networks: DiT (static) and DyDiT (dynamic width and tokens)."""

from dydit.models.dit import DiT, DiTBlock, FinalLayer

__all__ = ["DiT", "DiTBlock", "FinalLayer"]
