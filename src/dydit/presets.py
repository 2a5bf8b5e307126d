"""Typed registry of model presets (docs/METHOD.md §1.1).

``MODEL_PRESETS`` maps names such as ``"DiT-XL/2"`` to a :class:`ModelConfig`; ``"DyDiT-XL/2"``
resolves to the same architecture with ``dynamic=True``. Small single-channel presets
(``DiT-Ti/*``, ``DiT-Mi/*``) target 28/32-pixel data such as Fashion-MNIST. ``SiT-{S,B,L,XL}/{2,4,8}``
are the official SiT models: the DiT network trained with flow matching (``objective="flow"``).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Literal

# Field checks and size limits shared with the FLUX and U-ViT configs; re-exported here.
from dydit.config_checks import (
    MAX_MLP_RATIO,
    MAX_PARAMETERS,
    ROUTER_LAYOUTS,
    SIZE_LIMITS,
    check_choice,
    check_divisible,
    check_fields,
    check_fraction,
    check_type,
    replace_fields,
    shown,
)
from dydit.constants import LAYERNORM_EPS, TIMESTEP_FREQ_DIM
from dydit.errors import DyditError

# The FLUX family (issue 24): its config type and presets live in presets_flux, re-exported here.
from dydit.presets_flux import (  # noqa: F401
    DYFLUX_NAMES,
    FLUX_NAMES,
    FLUX_PRESETS,
    FluxConfig,
    flux_preset_name,
    get_flux_config,
    is_flux_name,
)

# The U-ViT family (issue 26): its config type and presets live in presets_uvit, re-exported here.
from dydit.presets_uvit import (  # noqa: F401
    DYDIT_UVIT_NAMES,
    DYDIT_UVIT_PREFIX,
    UVIT_NAMES,
    UVIT_PREFIX,
    UVIT_PRESETS,
    UVIT_PROCESSES,
    UViTConfig,
    get_uvit_config,
    is_uvit_name,
    uvit_preset_name,
)

RouterLayout = Literal["forced_first", "all"]
# What the network was trained for: DDPM epsilon prediction (DiT, DyDiT) or flow matching (SiT).
Objective = Literal["ddpm", "flow"]
OBJECTIVES: tuple[str, ...] = ("ddpm", "flow")
# A flow model's interpolant path and what its network predicts (dydit.flow.transport).
# "vp": the variance-preserving SDE with linear beta 0.1 -> 20 (SiT's VP path; U-ViT's VP-SDE).
FLOW_PATHS: tuple[str, ...] = ("linear", "gvp", "vp")
FLOW_PREDICTIONS: tuple[str, ...] = ("velocity", "noise", "score")
# Sinusoidal timestep features f_k = exp(-ln(10000) k / (128 - shift)): 0 is the official DiT's,
# 1 is diffusers' DiTTransformer2DModel's (``downscale_freq_shift=1``).
TIMESTEP_FREQ_SHIFTS: tuple[int, ...] = (0, 1)

# The type of each ModelConfig field (an int is also a valid float; a bool is never a number).
_FIELD_KINDS: dict[str, type | tuple[type, ...]] = {
    **dict.fromkeys(
        ("depth", "hidden_size", "num_heads", "patch_size", "input_size", "in_channels", "num_classes"), int
    ),
    **dict.fromkeys(("mlp_ratio", "class_dropout_prob", "mlp_norm_eps"), (int, float)),
    **dict.fromkeys(("learn_sigma", "dynamic"), bool),
    **dict.fromkeys(("router_layout", "objective", "flow_path", "flow_prediction"), str),
    "timestep_freq_shift": int,
}


def check_size(field: str, value: int, name: str | None = None) -> None:
    """Raise a one-line DyditError unless ``value`` is an integer from 1 to ``SIZE_LIMITS[field]``.

    ``name`` is what the message calls it (a key of another format, ``num_layers``); default ``field``.
    """
    name = name or field
    check_type(name, value, int)
    if value < 1:
        raise DyditError(f"{name} must be positive, got {shown(value)}")
    limit = SIZE_LIMITS[field]
    if value > limit:
        of = "" if name.startswith(field) else f" for {field}"
        raise DyditError(f"{name} {shown(value)} is over dydit's limit of {limit:,}{of}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a DiT or DyDiT. Serialises to a plain dict with :meth:`to_dict`.

    Two numerical conventions differ between the official DiT code and diffusers'
    ``DiTTransformer2DModel`` and are fields here, so that each checkpoint reproduces the code that
    trained it: ``timestep_freq_shift`` (0 official, 1 diffusers) and ``mlp_norm_eps``, the epsilon
    of the LayerNorm before the MLP (1e-6 official; diffusers' ``norm_eps``, 1e-5 by default).
    ``objective`` records the training objective: ``"ddpm"`` (DiT, DyDiT) or ``"flow"`` (SiT); a
    flow model also records its interpolant ``flow_path`` (``"linear"`` or ``"gvp"``) and what the
    network predicts, ``flow_prediction`` (``"velocity"``, ``"noise"`` or ``"score"``), so that
    sampling never has to guess them. A DDPM model keeps their defaults.
    """

    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    learn_sigma: bool = True
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    dynamic: bool = False
    router_layout: RouterLayout = "forced_first"
    objective: Objective = "ddpm"
    flow_path: str = "linear"
    flow_prediction: str = "velocity"
    timestep_freq_shift: int = 0
    mlp_norm_eps: float = LAYERNORM_EPS

    def __post_init__(self) -> None:
        # Types first: configs also come from JSON in checkpoints and from --model-option KEY=VALUE.
        for name, kind in _FIELD_KINDS.items():
            check_type(name, getattr(self, name), kind)
        if not self.mlp_ratio > 0:  # NaN too; no math.isfinite: it overflows on an int of 309+ digits
            raise DyditError(f"mlp_ratio must be a positive number, got {shown(self.mlp_ratio)}")
        if not self.mlp_ratio <= MAX_MLP_RATIO:  # inf too
            raise DyditError(f"mlp_ratio {shown(self.mlp_ratio)} is over dydit's limit of {MAX_MLP_RATIO}")
        for name in ("depth", "hidden_size", "num_heads", "patch_size", "input_size", "in_channels"):
            check_size(name, getattr(self, name))
        check_size("num_classes", self.num_classes)
        check_divisible("hidden_size", self.hidden_size, "num_heads", self.num_heads)
        check_size("head_dim", self.head_dim, "head_dim (hidden_size / num_heads)")
        check_divisible("image/latent size", self.input_size, "the patch size", self.patch_size)
        check_size("num_tokens", self.num_tokens, "num_tokens ((input_size / patch_size)^2)")
        if self.mlp_hidden < 1:
            raise DyditError(f"mlp_ratio {self.mlp_ratio} leaves no MLP width (hidden_size x mlp_ratio < 1)")
        if self.num_parameters > MAX_PARAMETERS:
            raise DyditError(
                f"this config describes a network of about {self.num_parameters / 1e9:,.1f} B parameters "
                f"(depth {self.depth}, hidden_size {self.hidden_size}, {self.num_tokens} tokens, "
                f"{self.num_classes} classes), over dydit's limit of {MAX_PARAMETERS / 1e9:g} B"
            )
        check_choice("router_layout", self.router_layout, ROUTER_LAYOUTS)
        check_fraction("class_dropout_prob", self.class_dropout_prob)
        if self.hidden_size % 4:
            raise DyditError("hidden_size must be divisible by 4 (2-D sin-cos position embedding)")
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("flow_path", self.flow_path, FLOW_PATHS)
        check_choice("flow_prediction", self.flow_prediction, FLOW_PREDICTIONS)
        if self.objective == "ddpm" and (self.flow_path, self.flow_prediction) != ("linear", "velocity"):
            raise DyditError("flow_path and flow_prediction apply to flow-matching models (objective='flow')")
        if self.timestep_freq_shift not in TIMESTEP_FREQ_SHIFTS:
            raise DyditError(
                f"timestep_freq_shift must be 0 (official DiT) or 1 (diffusers), "
                f"got {shown(self.timestep_freq_shift)}"
            )
        if not 0 < self.mlp_norm_eps < 1:  # NaN and inf too
            raise DyditError(f"mlp_norm_eps must be in (0, 1), got {shown(self.mlp_norm_eps)}")

    def require_ddpm(self, action: str) -> None:
        """Raise a one-line DyditError when ``action`` (something DDPM-only) meets a flow model."""
        if self.objective != "ddpm":
            raise DyditError(
                f"this is a flow-matching (SiT) model: {action} uses the DDPM process, which does not "
                "apply to it"
            )

    # Derived sizes -------------------------------------------------------------------------
    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def num_parameters(self) -> int:
        """Parameters of the dense network (``pos_embed`` included, as DiT counts it; a DyDiT's routers
        add under 1 %), from the config alone: nothing is built."""
        d, m, pp = self.hidden_size, self.mlp_hidden, self.patch_size**2
        embed = self.in_channels * pp * d + d + self.num_tokens * d
        t_embed = TIMESTEP_FREQ_DIM * d + d + d * d + d
        labels = (self.num_classes + (self.class_dropout_prob > 0)) * d
        block = (d * 6 * d + 6 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)
        final = (d * 2 * d + 2 * d) + (d + 1) * pp * self.out_channels
        return embed + t_embed + labels + self.depth * block + final

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        check_fields(cls, d, "model")
        return cls(**d)

    def replace(self, **overrides: Any) -> ModelConfig:
        return replace_fields(self, overrides, "model")


# (depth, width, heads) of the four DiT sizes, docs/METHOD.md §1.1.
_DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
# Small single-channel sizes for 28/32-pixel data (10 classes, pixel space).
_SMALL_SIZES = {"Ti": (6, 192, 6), "Mi": (8, 256, 8)}

# Preset names: FAMILY-SIZE/PATCH. A DyDiT name routes the DiT preset of the same SIZE/PATCH.
DIT_PREFIX, DYDIT_PREFIX, SIT_PREFIX = "DiT-", "DyDiT-", "SiT-"


def is_dynamic_name(name: str) -> bool:
    """Whether ``name`` names a DyDiT (``DyDiT-S/2``)."""
    return name.startswith(DYDIT_PREFIX)


def is_sit_name(name: str) -> bool:
    """Whether ``name`` names a SiT (``SiT-XL/2``)."""
    return name.startswith(SIT_PREFIX)


def dit_name(name: str) -> str:
    """``DyDiT-S/2`` -> ``DiT-S/2``: the DiT preset a DyDiT name routes (``DyDiT-U-ViT-S/2`` ->
    ``U-ViT-S/2``); other names unchanged."""
    if name.startswith(DYDIT_UVIT_PREFIX):
        return UVIT_PREFIX + name.removeprefix(DYDIT_UVIT_PREFIX)
    return DIT_PREFIX + name.removeprefix(DYDIT_PREFIX) if is_dynamic_name(name) else name


def dydit_name(name: str) -> str:
    """``DiT-S/2`` -> ``DyDiT-S/2``; a DyDiT name unchanged. (Any other name gets the prefix too,
    which names no preset: :func:`get_model_config` then says so.)"""
    return name if is_dynamic_name(name) else DYDIT_PREFIX + name.removeprefix(DIT_PREFIX)


MODEL_PRESETS: dict[str, ModelConfig] = {}
for _size, (_depth, _width, _heads) in _DIT_SIZES.items():
    for _p in (2, 4, 8):
        MODEL_PRESETS[f"{DIT_PREFIX}{_size}/{_p}"] = ModelConfig(_depth, _width, _heads, _p)
for _size, (_depth, _width, _heads) in _SMALL_SIZES.items():
    for _p in (2, 4):
        MODEL_PRESETS[f"{DIT_PREFIX}{_size}/{_p}"] = ModelConfig(
            _depth, _width, _heads, _p, input_size=32, in_channels=1, num_classes=10
        )
DIT_NAMES: tuple[str, ...] = tuple(MODEL_PRESETS)
# SiT (Ma et al. 2024): the same twelve networks; the released SiT-XL/2 keeps DiT's 8 output channels.
for _size, (_depth, _width, _heads) in _DIT_SIZES.items():
    for _p in (2, 4, 8):
        MODEL_PRESETS[f"{SIT_PREFIX}{_size}/{_p}"] = ModelConfig(_depth, _width, _heads, _p, objective="flow")
SIT_NAMES: tuple[str, ...] = tuple(n for n in MODEL_PRESETS if is_sit_name(n))
# ... and the small single-channel sizes trained with flow matching (SiT-Ti/4 for Fashion-MNIST).
for _size, (_depth, _width, _heads) in _SMALL_SIZES.items():
    for _p in (2, 4):
        MODEL_PRESETS[f"{SIT_PREFIX}{_size}/{_p}"] = MODEL_PRESETS[f"{DIT_PREFIX}{_size}/{_p}"].replace(
            objective="flow"
        )
SMALL_SIT_NAMES: tuple[str, ...] = tuple(n for n in MODEL_PRESETS if is_sit_name(n) and n not in SIT_NAMES)
MODEL_NAMES: tuple[str, ...] = (
    DIT_NAMES + tuple(dydit_name(n) for n in DIT_NAMES) + SIT_NAMES + SMALL_SIT_NAMES
)


def get_model_config(name: str, **overrides: Any) -> ModelConfig | FluxConfig | UViTConfig:
    """Resolve a preset name (``DiT-XL/2``, ``DyDiT-S/2``, ``SiT-XL/2``, ``U-ViT-H/2``, ...) and apply
    overrides."""
    if is_flux_name(name):  # FLUX family (issue 24): FLUX.1-dev, DyFLUX-lite-8B, FLUX-tiny, ...
        return get_flux_config(name, **overrides)
    if is_uvit_name(name):  # U-ViT family (issue 26): U-ViT-H/2, DyDiT-U-ViT-S/2, ...
        return get_uvit_config(name, **overrides)
    dynamic = is_dynamic_name(name)
    base = dit_name(name)
    if base not in MODEL_PRESETS:
        close = difflib.get_close_matches(name, MODEL_NAMES, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise DyditError(f"unknown model {name!r}.{hint} Valid models: {', '.join(MODEL_NAMES)}")
    cfg = MODEL_PRESETS[base]
    if dynamic:
        overrides = {"dynamic": True, **overrides}
    return cfg.replace(**overrides) if overrides else cfg


def preset_name(cfg: ModelConfig) -> str | None:
    """The preset whose architecture (depth, width, heads, patch) and objective match ``cfg``, if any.

    A DyDiT of a DDPM preset is named ``DyDiT-*``; a dynamic flow model has no preset name. A U-ViT
    config gets its U-ViT preset's name (:func:`uvit_preset_name`), a FLUX config its FLUX preset's
    (:func:`flux_preset_name`).
    """
    if isinstance(cfg, UViTConfig):
        return uvit_preset_name(cfg)
    if isinstance(cfg, FluxConfig):
        return flux_preset_name(cfg)
    if cfg.dynamic and cfg.objective != "ddpm":
        return None
    for name, p in MODEL_PRESETS.items():
        if (p.depth, p.hidden_size, p.num_heads, p.patch_size, p.objective) == (
            cfg.depth,
            cfg.hidden_size,
            cfg.num_heads,
            cfg.patch_size,
            cfg.objective,
        ):
            return dydit_name(name) if cfg.dynamic else name
    return None


def config_from_dict(d: dict[str, Any]) -> ModelConfig | UViTConfig:
    """A stored model config of any family (a U-ViT's says ``"family": "U-ViT"``, a FLUX's ``"FLUX"``)."""
    if d.get("family") == FluxConfig.family:
        return FluxConfig.from_dict(d)
    return UViTConfig.from_dict(d) if d.get("family") == UViTConfig.family else ModelConfig.from_dict(d)
