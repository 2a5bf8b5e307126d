"""Building models from preset names or configs: ``create_model("DiT-XL/2")``."""

from __future__ import annotations

from typing import Any

from torch import nn

from dydit.presets import (
    FluxConfig,
    ModelConfig,
    UViTConfig,
    get_model_config,
    get_uvit_config,
    is_uvit_name,
)


def build_model(config: ModelConfig | UViTConfig | FluxConfig) -> nn.Module:
    """A DiT (or U-ViT, or FLUX), or a DyDiT on it when ``config.dynamic`` is set."""
    if isinstance(config, UViTConfig):
        return build_uvit(config)
    if isinstance(config, FluxConfig):  # FLUX family (issue 24)
        if config.dynamic:
            from dydit.models.dydit import DyDiT

            return DyDiT(config)
        from dydit.models.flux import Flux

        return Flux(config)
    if config.dynamic:
        from dydit.models.dydit import DyDiT

        return DyDiT(config)
    from dydit.models.dit import DiT

    return DiT(config)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a model from a preset name (``"DiT-XL/2"``, ``"DyDiT-S/2"``, ``"U-ViT-H/2"``, ...).

    Keyword overrides replace fields of the preset's :class:`~dydit.presets.ModelConfig`
    (``input_size``, ``in_channels``, ``num_classes``, ``learn_sigma``, ...).
    """
    if is_uvit_name(name):
        return build_uvit(get_uvit_config(name, **overrides))
    return build_model(get_model_config(name, **overrides))


# U-ViT (docs/METHOD.md §16) ------------------------------------------------------------------------
def build_uvit(config: UViTConfig) -> nn.Module:
    """A U-ViT, or a DyDiT on it (routers added to every block) when ``config.dynamic`` is set."""
    from dydit.models.uvit import UViT

    if not config.dynamic:
        return UViT(config)
    from dydit.models.dydit import DyDiT

    return DyDiT(config)
