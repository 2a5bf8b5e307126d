"""The FLUX family's typed config and presets (docs/METHOD.md §15, docs/ARCHITECTURE.md §7.2).

:class:`FluxConfig` names its architecture fields exactly as diffusers' ``FluxTransformer2DModel``
config does (``num_layers`` double-stream blocks, ``num_single_layers`` single-stream blocks, ...),
so that :meth:`FluxConfig.from_diffusers` and :meth:`FluxConfig.to_diffusers` map a ``config.json``
both ways. It adds what dydit needs beside the architecture: ``sample_size`` (the latent side the
FLOPs tables and the FLOPs ratio are computed at: 128 latents = 1024 px with FLUX's 8x VAE),
``max_text_length`` (the longest text sequence the model accepts: T5's ``max_sequence_length``,
512 for FLUX.1-dev) and the dynamic fields (``dynamic``: routers exist; ``width_routing``: TDW
width routers beside DyFLUX's token routers; ``router_layout``).

A text-to-image model trained here (docs/METHOD.md §17.6) adds dydit-only fields too: ``pack`` (the
side of the square of latent pixels packed into one token; FLUX packs 2x2, the pixel-space t2i model
4x4), ``text_encoder`` (the config dict of the :class:`~dydit.models.text_encoder.TextEncoder` the
model owns and trains: its vocabulary, width, depth, ...), ``caption_dropout`` (the probability a
training caption is replaced by the empty one, for classifier-free guidance) and the default
sampling recipe ``recipe_sampler`` / ``recipe_steps`` / ``recipe_guidance`` that ``dydit sample``
uses when no flag says otherwise. A config dict carries ``"family": "FLUX"`` so that a stored config
is read back as a FluxConfig (:func:`dydit.presets.config_from_dict`).

Together with ``presets`` this is the only module that knows preset names; ``presets`` re-exports
it and ``presets.get_model_config`` resolves FLUX names here.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

from dydit.config_checks import (
    ROUTER_LAYOUTS,
    check_choice,
    check_fields,
    check_fraction,
    check_type,
    replace_fields,
    shown,
)
from dydit.errors import DyditError

# The most each FLUX size may be: far above the published models (FLUX.1: 19 + 38 blocks, 24 heads
# of 128, 4096-wide T5 embeddings), so a hostile config.json is refused before anything is built.
FLUX_LIMITS: dict[str, int] = {
    "patch_size": 16,
    "in_channels": 4096,
    "out_channels": 4096,
    "num_layers": 256,
    "num_single_layers": 512,
    "attention_head_dim": 1024,
    "num_attention_heads": 256,
    "joint_attention_dim": 65536,
    "pooled_projection_dim": 65536,
    "sample_size": 4096,
    "max_text_length": 65536,
    "pack": 16,
    "recipe_steps": 1000,
}
# The diffusers config keys of the architecture (in diffusers' order); all other keys of a
# config.json (``_class_name``, ``_diffusers_version``, ``_name_or_path``, ...) are ignored.
DIFFUSERS_FIELDS: tuple[str, ...] = (
    "patch_size",
    "in_channels",
    "out_channels",
    "num_layers",
    "num_single_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "pooled_projection_dim",
    "guidance_embeds",
    "axes_dims_rope",
)
FLUX_CLASS_NAME = "FluxTransformer2DModel"


def _check_int(name: str, value: Any) -> None:
    check_type(name, value, int, "FLUX config field ")
    if not 1 <= value <= FLUX_LIMITS[name]:
        raise DyditError(f"FLUX config field {name} must be in [1, {FLUX_LIMITS[name]}], got {shown(value)}")


@dataclass(frozen=True)
class FluxConfig:
    """Architecture of a FLUX transformer (diffusers' field names) and of its DyFLUX.

    ``inner_dim`` = heads x head_dim; both block types use ``mlp_ratio`` 4 (diffusers' fixed value).
    """

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    sample_size: int = 128
    max_text_length: int = 512
    dynamic: bool = False
    width_routing: bool = True
    router_layout: str = "forced_first"
    pack: int = 2
    text_encoder: dict[str, Any] | None = None
    caption_dropout: float = 0.0
    recipe_sampler: str = "euler"
    recipe_steps: int = 28
    recipe_guidance: float = 1.0

    family = "FLUX"  # not a field: the marker of a stored config dict

    def __post_init__(self) -> None:
        if not isinstance(self.axes_dims_rope, (list, tuple)) or len(self.axes_dims_rope) != 3:
            raise DyditError(f"axes_dims_rope must be a list of 3 integers, got {shown(self.axes_dims_rope)}")
        object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        if self.text_encoder is not None:
            if not isinstance(self.text_encoder, dict):
                raise DyditError(
                    f"FLUX config field text_encoder must be a dict, got {shown(self.text_encoder)}"
                )
            object.__setattr__(self, "text_encoder", dict(self.text_encoder))
        check_fraction("caption_dropout", self.caption_dropout)
        check_type("recipe_sampler", self.recipe_sampler, str, "FLUX config field ")
        if not self.recipe_sampler:
            raise DyditError("FLUX config field recipe_sampler must name a sampler, got ''")
        if not isinstance(self.recipe_guidance, (int, float)) or not self.recipe_guidance >= 1:
            raise DyditError(f"recipe_guidance must be >= 1, got {shown(self.recipe_guidance)}")
        for name in FLUX_LIMITS:
            value = getattr(self, name)
            if name == "out_channels" and value is None:
                continue
            _check_int(name, value)
        for name in ("guidance_embeds", "dynamic", "width_routing"):
            check_type(name, getattr(self, name), bool, "FLUX config field ")
        axes = self.axes_dims_rope
        if not axes or not all(
            isinstance(a, int) and not isinstance(a, bool) and a > 0 and a % 2 == 0 for a in axes
        ):
            raise DyditError(f"axes_dims_rope must be positive even integers, got {shown(list(axes))}")
        if sum(axes) != self.attention_head_dim:
            raise DyditError(
                f"axes_dims_rope {shown(list(axes))} must sum to attention_head_dim {self.attention_head_dim}"
            )
        check_choice("router_layout", self.router_layout, ROUTER_LAYOUTS)
        if self.in_channels % self.pack**2:
            raise DyditError(f"in_channels {self.in_channels} must be a multiple of pack^2 = {self.pack**2}")
        if self.sample_size % (self.pack * self.patch_size):
            raise DyditError(
                f"sample_size {self.sample_size} must be a multiple of {self.pack * self.patch_size}"
            )
        if self.num_parameters > 40_000_000_000:
            raise DyditError(
                f"this FLUX config has about {self.num_parameters / 1e9:.0f} B parameters, over 40 B"
            )

    # Derived sizes -----------------------------------------------------------------------------
    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden(self) -> int:
        return 4 * self.inner_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def latent_channels(self) -> int:
        """Channels of the latent image x (B, C, H, W) before the packing: in_channels / pack^2."""
        return self.in_channels // self.pack**2

    @property
    def num_tokens(self) -> int:
        """Image tokens at ``sample_size``: (sample_size / pack)^2 after packing pack x pack latents."""
        return (self.sample_size // (self.pack * self.patch_size)) ** 2

    @property
    def time_shift_mu(self) -> float:
        """FLUX's resolution-dependent time shift μ (FluxPipeline's ``calculate_shift``): linear in the
        image-token count from 0.5 at 256 tokens to 1.15 at 4096 (docs/METHOD.md §17.6)."""
        slope = (1.15 - 0.5) / (4096 - 256)
        return 0.5 + slope * (self.num_tokens - 256)

    # What the training loop and the samplers read from any model config -------------------------
    @property
    def objective(self) -> str:
        return "flow"

    @property
    def learn_sigma(self) -> bool:
        return False

    @property
    def num_classes(self) -> int:
        return 0

    @property
    def input_size(self) -> int:
        return self.sample_size

    @property
    def depth(self) -> int:
        """All blocks: double-stream then single-stream."""
        return self.num_layers + self.num_single_layers

    @property
    def num_parameters(self) -> int:
        """Parameters of the dense network, from the config alone (12.0 B for FLUX.1-dev)."""
        d, m = self.inner_dim, self.mlp_hidden
        hd = self.attention_head_dim
        double = 2 * (d * 6 * d + 6 * d) + 2 * 4 * (d * d + d) + 4 * hd + 2 * (2 * d * m + m + d)
        single = (d * 3 * d + 3 * d) + 3 * (d * d + d) + 2 * hd + (d * m + m) + ((d + m) * d + d)
        embed = 256 * d + d + d * d + d
        embed *= 2 if self.guidance_embeds else 1
        embed += self.pooled_projection_dim * d + d + d * d + d
        embed += self.joint_attention_dim * d + d + self.in_channels * d + d
        out = self.patch_size**2 * self.output_channels
        final = d * 2 * d + 2 * d + d * out + out
        return self.num_layers * double + self.num_single_layers * single + embed + final

    # Serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["axes_dims_rope"] = list(self.axes_dims_rope)
        out["family"] = self.family
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FluxConfig:
        d = {k: v for k, v in d.items() if k != "family"}
        check_fields(cls, d, "FLUX")
        return cls(**d)

    @classmethod
    def from_diffusers(cls, config: dict[str, Any], **extra: Any) -> FluxConfig:
        """A FluxConfig from a diffusers ``FluxTransformer2DModel`` config.json dict.

        Only the architecture keys are read (``_class_name``, ``_diffusers_version`` and other keys are
        ignored); a missing key takes diffusers' default. ``extra`` sets dydit's own fields
        (``sample_size``, ``max_text_length``, ``dynamic``, ...).
        """
        if not isinstance(config, dict):
            raise DyditError(f"a diffusers config must be a JSON object, got {type(config).__name__}")
        name = config.get("_class_name", FLUX_CLASS_NAME)
        if name != FLUX_CLASS_NAME:
            raise DyditError(f"this config describes a {name!r}, not a {FLUX_CLASS_NAME}")
        fields = {k: config[k] for k in DIFFUSERS_FIELDS if k in config}
        if isinstance(fields.get("axes_dims_rope"), list):
            fields["axes_dims_rope"] = tuple(fields["axes_dims_rope"])
        return cls(**fields, **extra)

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers config dict (``_class_name`` included) of this architecture."""
        out: dict[str, Any] = {"_class_name": FLUX_CLASS_NAME}
        for k in DIFFUSERS_FIELDS:
            value = getattr(self, k)
            out[k] = list(value) if k == "axes_dims_rope" else value
        return out

    def replace(self, **overrides: Any) -> FluxConfig:
        return replace_fields(self, overrides, "model")


# Presets --------------------------------------------------------------------------------------------
DYFLUX_PREFIX, FLUX_PREFIX = "DyFLUX-", "FLUX-"
_TINY = dict(
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=4,
    axes_dims_rope=(4, 6, 6),
    in_channels=16,
    joint_attention_dim=32,
    pooled_projection_dim=24,
    sample_size=16,
    max_text_length=16,
)
T2I_SHAPE: dict[str, Any] = dict(
    num_layers=2, num_single_layers=4, heads=4, head_dim=32, axes=(8, 12, 12), text_width=128
)
FLUX_PRESETS: dict[str, FluxConfig] = {
    "FLUX.1-dev": FluxConfig(guidance_embeds=True),
    "FLUX.1-schnell": FluxConfig(guidance_embeds=False, max_text_length=256),
    # Freepik's FLUX.1-lite-8B: FLUX.1-dev with 8 double-stream blocks, guidance embeddings kept
    # (the base of the released DyFLUX, built there with guidance_embeds=True, num_layers=8).
    "FLUX.1-lite-8B": FluxConfig(num_layers=8, guidance_embeds=True),
    # Tiny CPU models (tests, examples), with and without a guidance embedding.
    "FLUX-tiny": FluxConfig(guidance_embeds=True, **_TINY),
    "FLUX-tiny-schnell": FluxConfig(guidance_embeds=False, **_TINY),
    # The CPU benchmark shape (issue 24): 4 double + 8 single blocks, width 256, 256 image tokens
    # (32x32 latents) and 32 text tokens.
    "FLUX-bench": FluxConfig(
        num_layers=4,
        num_single_layers=8,
        attention_head_dim=32,
        num_attention_heads=8,
        axes_dims_rope=(8, 12, 12),
        in_channels=16,
        joint_attention_dim=64,
        pooled_projection_dim=32,
        guidance_embeds=True,
        sample_size=32,
        max_text_length=32,
    ),
    # The text-to-image model trained here (issue 25, docs/METHOD.md §17.6): pixel space 64x64x3 packed
    # 4x4 (256 tokens of 48 values), its own text encoder (vocabulary from the training data, filled
    # in by the training run), true classifier-free guidance (caption dropout 0.1, no guidance
    # embedding), Euler on FLUX's shifted time grid by default.
    "FLUX-t2i": FluxConfig(
        num_layers=T2I_SHAPE["num_layers"],
        num_single_layers=T2I_SHAPE["num_single_layers"],
        attention_head_dim=T2I_SHAPE["head_dim"],
        num_attention_heads=T2I_SHAPE["heads"],
        axes_dims_rope=T2I_SHAPE["axes"],
        in_channels=48,
        pack=4,
        joint_attention_dim=T2I_SHAPE["text_width"],
        pooled_projection_dim=T2I_SHAPE["text_width"],
        guidance_embeds=False,
        sample_size=64,
        max_text_length=16,
        text_encoder={"depth": 2, "heads": 4, "max_length": 16},
        caption_dropout=0.1,
        recipe_sampler="euler",
        recipe_steps=28,
        recipe_guidance=4.0,
    ),
    # Its tiny twin (tests, ``dydit demo t2i --fast``): the same pixel space, packing and encoder kind.
    "FLUX-t2i-tiny": FluxConfig(
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        axes_dims_rope=(4, 6, 6),
        in_channels=48,
        pack=4,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=False,
        sample_size=64,
        max_text_length=16,
        text_encoder={"depth": 1, "heads": 2, "max_length": 16},
        caption_dropout=0.1,
        recipe_sampler="euler",
        recipe_steps=4,
        recipe_guidance=2.0,
    ),
}
# Every dense preset has its DyFLUX twin: DyFLUX-<name without its FLUX prefix>.
DYFLUX_NAMES: dict[str, str] = {}
for _name in list(FLUX_PRESETS):
    _dy = DYFLUX_PREFIX + _name.removeprefix("FLUX.1-").removeprefix(FLUX_PREFIX)
    DYFLUX_NAMES[_dy] = _name
FLUX_NAMES: tuple[str, ...] = (*FLUX_PRESETS, *DYFLUX_NAMES)


def is_flux_name(name: str) -> bool:
    return name in FLUX_PRESETS or name in DYFLUX_NAMES


def get_flux_config(name: str, **overrides: Any) -> FluxConfig:
    """Resolve a FLUX preset name (``FLUX.1-dev``, ``DyFLUX-lite-8B``, ``FLUX-tiny``) with overrides."""
    if name in DYFLUX_NAMES:
        overrides = {"dynamic": True, **overrides}
        name = DYFLUX_NAMES[name]
    if name not in FLUX_PRESETS:
        close = difflib.get_close_matches(name, FLUX_NAMES, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise DyditError(f"unknown FLUX model {name!r}.{hint} Valid: {', '.join(FLUX_NAMES)}")
    cfg = FLUX_PRESETS[name]
    return cfg.replace(**overrides) if overrides else cfg


def flux_preset_name(cfg: FluxConfig) -> str | None:
    """The preset whose architecture matches ``cfg`` (its DyFLUX name when dynamic), if any."""
    for name, p in FLUX_PRESETS.items():
        if all(getattr(p, k) == getattr(cfg, k) for k in DIFFUSERS_FIELDS):
            if not cfg.dynamic:
                return name
            return next(dy for dy, base in DYFLUX_NAMES.items() if base == name)
    return None
