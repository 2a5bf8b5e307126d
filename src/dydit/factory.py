"""Building models from preset names or configs: ``create_model("DiT-XL/2")``."""

from __future__ import annotations

from typing import Any

from torch import nn

from dydit.presets import FluxConfig, ModelConfig, get_model_config


def build_model(config: ModelConfig | FluxConfig) -> nn.Module:
    """A DiT, or a DyDiT when ``config.dynamic`` is set; a FLUX (or DyFLUX) for a FluxConfig."""
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
    """Build a model from a preset name (``"DiT-XL/2"``, ``"DyDiT-S/2"``, ``"DiT-Ti/2"``, ...).

    Keyword overrides replace fields of the preset's :class:`~dydit.presets.ModelConfig`
    (``input_size``, ``in_channels``, ``num_classes``, ``learn_sigma``, ...).
    """
    return build_model(get_model_config(name, **overrides))
