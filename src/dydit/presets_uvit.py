"""The U-ViT family's typed config and presets (docs/METHOD.md §16, docs/ARCHITECTURE.md §7.4).

:class:`UViTConfig` uses the field names of :class:`~dydit.presets.ModelConfig` where they mean the
same (the workflows read both alike); :meth:`UViTConfig.nnet_kwargs` gives the official
``config.nnet`` (``img_size``, ``in_chans``, ``embed_dim``, ...) back. Together with ``presets`` (which
re-exports it and resolves U-ViT names in ``get_model_config``) this is the only module that knows
U-ViT preset names.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

from dydit import config_checks as checks

# Names this module has always had (before the checks were shared with presets and presets_flux).
from dydit.config_checks import MAX_MLP_RATIO, MAX_PARAMETERS, ROUTER_LAYOUTS, SIZE_LIMITS, shown
from dydit.errors import DyditError

# The most each size may be: dydit's limits for every family (presets.SIZE_LIMITS), far above the
# released U-ViT-H, so a hostile stored config is refused before anything is built.
UVIT_LIMITS: dict[str, int] = SIZE_LIMITS


def check_size(field: str, value: Any, name: str | None = None) -> None:
    """A one-line DyditError unless ``value`` is an integer from 1 to ``UVIT_LIMITS[field]``."""
    name = name or field
    checks.check_type(name, value, int)
    if not 1 <= value <= UVIT_LIMITS[field]:
        raise DyditError(f"{name} must be from 1 to {UVIT_LIMITS[field]:,}, got {shown(value)}")


# A second family of presets, kept in this one block: its own config type, names and lookup. The
# official configs (configs/*.py of baofff/U-ViT) name the same sizes img_size, in_chans, embed_dim,
# ...; :meth:`UViTConfig.nnet_kwargs` gives them back under those names.
UVIT_PREFIX, DYDIT_UVIT_PREFIX = "U-ViT-", "DyDiT-U-ViT-"
# The process a U-ViT was trained with: "vpsde", the continuous VP-SDE (linear beta 0.1 -> 20, the
# network sees 999 t); "sd", Stable Diffusion's discrete scaled-linear betas with t = 1..1000.
UVIT_PROCESSES: tuple[str, ...] = ("vpsde", "sd")
_UVIT_INTS = ("depth", "hidden_size", "num_heads", "patch_size", "input_size", "in_channels")
_UVIT_BOOLS = ("qkv_bias", "mlp_time_embed", "conv", "skip", "use_checkpoint", "dynamic")


@dataclass(frozen=True)
class UViTConfig:
    """Architecture of a U-ViT (docs/METHOD.md §16), with the field names of :class:`ModelConfig`
    where they mean the same (the workflows read both alike).

    ``depth`` is the official one: ``depth // 2`` in-blocks, a mid-block and ``depth // 2`` out-blocks
    with long skips (depth + 1 blocks). ``num_classes`` counts the real classes (0: unconditional);
    a label table with a null row for guidance (official ``num_classes = 1001``) has
    ``class_dropout_prob > 0`` (the official ``p_uncond``). ``process`` names the process it was
    trained with (:data:`UVIT_PROCESSES`).
    """

    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    input_size: int = 32
    in_channels: int = 3
    num_classes: int = 0
    class_dropout_prob: float = 0.0
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    mlp_time_embed: bool = False
    conv: bool = True
    skip: bool = True
    use_checkpoint: bool = False
    process: str = "vpsde"
    dynamic: bool = False
    router_layout: str = "forced_first"

    family = "U-ViT"
    learn_sigma = False  # the network predicts the noise only: C output channels

    def __post_init__(self) -> None:
        for name in _UVIT_INTS:
            check_size(name, getattr(self, name))
        for name in _UVIT_BOOLS:
            checks.check_type(name, getattr(self, name), bool)
        if (
            not isinstance(self.num_classes, int)
            or isinstance(self.num_classes, bool)
            or self.num_classes < 0
        ):
            raise DyditError(
                f"num_classes must be an integer >= 0 (0: unconditional), got {shown(self.num_classes)}"
            )
        if self.num_classes:
            check_size("num_classes", self.num_classes)
        elif self.class_dropout_prob:
            raise DyditError("an unconditional U-ViT (num_classes 0) has no null class: class_dropout_prob 0")
        checks.check_fraction("class_dropout_prob", self.class_dropout_prob)
        ratio = self.mlp_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= MAX_MLP_RATIO:
            raise DyditError(f"mlp_ratio must be a number in (0, {MAX_MLP_RATIO}], got {shown(ratio)}")
        checks.check_divisible("hidden_size", self.hidden_size, "num_heads", self.num_heads)
        checks.check_divisible("input_size", self.input_size, "the patch size", self.patch_size)
        check_size("num_tokens", self.num_tokens, "num_tokens ((input_size / patch_size)^2)")
        if self.mlp_hidden < 1:
            raise DyditError(f"mlp_ratio {self.mlp_ratio} leaves no MLP width")
        checks.check_choice("process", self.process, UVIT_PROCESSES)
        checks.check_choice("router_layout", self.router_layout, ROUTER_LAYOUTS)
        if self.num_parameters > MAX_PARAMETERS:
            raise DyditError(f"this config describes over {MAX_PARAMETERS / 1e9:g} B parameters")

    # What the workflows read (the names of ModelConfig) --------------------------------------
    @property
    def objective(self) -> str:
        """``"flow"`` (a continuous process, run by a :class:`~dydit.flow.Transport`) for the VP-SDE,
        ``"ddpm"`` (a discrete :class:`~dydit.diffusion.GaussianDiffusion`) for Stable Diffusion's."""
        return "flow" if self.process == "vpsde" else "ddpm"

    flow_path = "vp"
    flow_prediction = "noise"
    timestep_freq_shift = 0  # the sinusoidal time features of the official DiT code (width D here)
    mlp_norm_eps = 1e-5  # nn.LayerNorm's default, before attention and the MLP alike

    @property
    def out_channels(self) -> int:
        return self.in_channels

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
    def num_layers(self) -> int:
        """Blocks the method routes: depth // 2 in-blocks, the mid-block, depth // 2 out-blocks."""
        return 2 * (self.depth // 2) + 1

    @property
    def default_sampler(self) -> str:
        """U-ViT's own: DPM-Solver(++) on either process (its pixel configs use Euler–Maruyama)."""
        return "dpm++" if self.process == "vpsde" else "dpm++2m"

    @property
    def label_rows(self) -> int:
        """Rows of the label table: the official ``num_classes`` (0 without one)."""
        return self.num_classes + (self.class_dropout_prob > 0) if self.num_classes else 0

    @property
    def extras(self) -> int:
        """Tokens before the image tokens: the time token, and the class token of a conditional model."""
        return 1 + (self.label_rows > 0)

    @property
    def num_parameters(self) -> int:
        """Parameters of the network (``pos_embed`` included), from the config alone."""
        d, m, pp, c = self.hidden_size, self.mlp_hidden, self.patch_size**2, self.in_channels
        block = 2 * 2 * d + d * 3 * d + 3 * d * self.qkv_bias + d * d + d + d * m + m + m * d + d
        half = self.depth // 2
        skips = half * (2 * d * d + d) if self.skip else 0
        time = (d * 4 * d + 4 * d + 4 * d * d + d) if self.mlp_time_embed else 0
        head = 2 * d + d * pp * c + pp * c + (c * c * 9 + c) * self.conv
        embed = c * pp * d + d + self.label_rows * d + (self.extras + self.num_tokens) * d
        return embed + time + (2 * half + 1) * block + skips + head

    def nnet_kwargs(self) -> dict[str, Any]:
        """The official ``config.nnet`` of this network (``libs.uvit.UViT`` keyword arguments)."""
        return {
            "img_size": self.input_size,
            "patch_size": self.patch_size,
            "in_chans": self.in_channels,
            "embed_dim": self.hidden_size,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "qkv_bias": self.qkv_bias,
            "mlp_time_embed": self.mlp_time_embed,
            "num_classes": self.label_rows or -1,
            "use_checkpoint": self.use_checkpoint,
            "conv": self.conv,
            "skip": self.skip,
        }

    def require_ddpm(self, action: str) -> None:
        if self.objective != "ddpm":
            raise DyditError(
                f"this U-ViT is trained with the continuous VP-SDE: {action} does not apply to it"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UViTConfig:
        d = {k: v for k, v in d.items() if k != "family"}
        checks.check_fields(cls, d, "U-ViT")
        return cls(**d)

    def replace(self, **overrides: Any) -> UViTConfig:
        return checks.replace_fields(self, overrides, "U-ViT")


def _uvit(depth: int, width: int, heads: int, patch: int, size: int, **kw: Any) -> UViTConfig:
    return UViTConfig(depth, width, heads, patch, input_size=size, **kw)


_IMAGENET_LATENT = {"in_channels": 4, "num_classes": 1000, "use_checkpoint": True}
# The official releases (README of baofff/U-ViT), one per config file; docs/METHOD.md §16.1.
UVIT_PRESETS: dict[str, UViTConfig] = {
    f"{UVIT_PREFIX}S/2": _uvit(12, 512, 8, 2, 32),  # CIFAR-10, cifar10_uvit_small.py
    f"{UVIT_PREFIX}S/4": _uvit(12, 512, 8, 4, 64),  # CelebA 64, celeba64_uvit_small.py
    f"{UVIT_PREFIX}M/4": _uvit(16, 768, 12, 4, 64, num_classes=1000, use_checkpoint=True),  # ImageNet 64
    f"{UVIT_PREFIX}L/2": _uvit(20, 1024, 16, 2, 32, class_dropout_prob=0.15, **_IMAGENET_LATENT),  # 256
    f"{UVIT_PREFIX}H/2": _uvit(
        28, 1152, 16, 2, 32, class_dropout_prob=0.1, conv=False, process="sd", **_IMAGENET_LATENT
    ),  # ImageNet 256, imagenet256_uvit_huge.py
    f"{UVIT_PREFIX}H/4": _uvit(
        28, 1152, 16, 4, 64, class_dropout_prob=0.1, conv=False, process="sd", **_IMAGENET_LATENT
    ),  # ImageNet 512, imagenet512_uvit_huge.py
    # Small single-channel networks for 32-pixel data (Fashion-MNIST padded), 10 classes + null.
    f"{UVIT_PREFIX}Ti/2": _uvit(6, 192, 6, 2, 32, in_channels=1, num_classes=10, class_dropout_prob=0.1),
    f"{UVIT_PREFIX}Ti/4": _uvit(6, 192, 6, 4, 32, in_channels=1, num_classes=10, class_dropout_prob=0.1),
}
UVIT_NAMES: tuple[str, ...] = tuple(UVIT_PRESETS)
DYDIT_UVIT_NAMES: tuple[str, ...] = tuple(DYDIT_UVIT_PREFIX + n.removeprefix(UVIT_PREFIX) for n in UVIT_NAMES)


def is_uvit_name(name: object) -> bool:
    """Whether ``name`` names a U-ViT or a DyDiT on one (``U-ViT-S/2``, ``DyDiT-U-ViT-H/2``)."""
    return isinstance(name, str) and (name.startswith(UVIT_PREFIX) or name.startswith(DYDIT_UVIT_PREFIX))


def get_uvit_config(name: str, **overrides: Any) -> UViTConfig:
    """Resolve ``U-ViT-*`` / ``DyDiT-U-ViT-*`` (dynamic) and apply overrides."""
    dynamic = name.startswith(DYDIT_UVIT_PREFIX)
    base = UVIT_PREFIX + name.removeprefix(DYDIT_UVIT_PREFIX) if dynamic else name
    if base not in UVIT_PRESETS:
        close = difflib.get_close_matches(name, UVIT_NAMES + DYDIT_UVIT_NAMES, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise DyditError(
            f"unknown model {name!r}.{hint} U-ViT models: {', '.join(UVIT_NAMES + DYDIT_UVIT_NAMES)}"
        )
    cfg = UVIT_PRESETS[base]
    if dynamic:
        overrides = {"dynamic": True, **overrides}
    return cfg.replace(**overrides) if overrides else cfg


def uvit_preset_name(cfg: UViTConfig) -> str | None:
    """The U-ViT preset of ``cfg``'s architecture (``DyDiT-U-ViT-*`` when dynamic), if any."""
    arch = ("depth", "hidden_size", "num_heads", "patch_size", "input_size", "in_channels", "process")
    for name, p in UVIT_PRESETS.items():
        if all(getattr(p, f) == getattr(cfg, f) for f in arch):
            return DYDIT_UVIT_PREFIX + name.removeprefix(UVIT_PREFIX) if cfg.dynamic else name
    return None
