"""Field checks shared by the model config classes (docs/METHOD.md §1.1).

:class:`~dydit.presets.ModelConfig`, :class:`~dydit.presets_uvit.UViTConfig` and
:class:`~dydit.presets_flux.FluxConfig` all take their fields from files (a checkpoint's stored
config, a diffusers ``config.json``) and from the command line (``--model-option KEY=VALUE``), so each
refuses a bad field with a one-line :class:`~dydit.errors.DyditError` before anything is built. The
checks they share live here rather than in ``presets``, because ``presets`` imports the FLUX and
U-ViT modules: they cannot import it back.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from collections.abc import Mapping
from typing import Any, TypeVar

from dydit.errors import DyditError

# The most each size may be (docs/METHOD.md §1.1), for every family built from these fields. Configs
# come from files and from the command line: a hostile or mistyped size is refused before anything is
# built. Every bound is far above the published models (DiT-XL/2: depth 28, width 1152, 16 heads of
# 72, patch 2, 32x32x4 latents, 256 tokens, 675 M parameters; U-ViT-H: depth 28, width 1152, 1024
# tokens).
SIZE_LIMITS: dict[str, int] = {
    "depth": 512,
    "hidden_size": 16384,
    "num_heads": 512,
    "head_dim": 1024,  # hidden_size / num_heads
    "patch_size": 64,
    "input_size": 4096,  # side of the (latent) image
    "in_channels": 1024,
    "num_classes": 1_000_000,
    "num_tokens": 65536,  # (input_size / patch_size)^2
}
MAX_MLP_RATIO = 64
# Parameters of the dense network, estimated from the config alone (``num_parameters``).
MAX_PARAMETERS = 20_000_000_000
ROUTER_LAYOUTS: tuple[str, ...] = ("forced_first", "all")


def _digits(value: int) -> str:
    """An int by its length: Python refuses to print one of more than 4300 digits (a ValueError)."""
    return f"a number of {int(abs(value).bit_length() * math.log10(2)) + 1} digits"


class _ShortRepr(reprlib.Repr):
    """reprlib's cut-short repr, with an int too long to print shown by its length, also inside a
    list or a dict (``axes_dims_rope [10**5000, 2, 2]``): a message must never crash on its value."""

    def repr_int(self, x: int, level: int) -> str:
        try:
            return super().repr_int(x, level)
        except ValueError:
            return _digits(x)


_short = _ShortRepr()
_short.maxstring = _short.maxother = 40
_short.maxlevel = 2
# What check_type says a field must be, by the type (or types) it accepts.
_KIND_NAMES = {int: "an integer", (int, float): "a number", str: "a string", bool: "true or false"}

Config = TypeVar("Config")


def shown(value: Any) -> str:
    """``repr(value)``, cut short: a hostile value (a megabyte string, a nested list) stays one line."""
    try:
        return _short.repr(value)
    except (ValueError, RecursionError):  # an int subclass of more than 4300 digits; a hostile repr
        return _digits(value) if isinstance(value, int) else f"a {type(value).__name__} that cannot be shown"


def check_type(name: str, value: Any, kind: type | tuple[type, ...], label: str = "") -> None:
    """Raise unless ``value`` is of ``kind`` (a key of ``_KIND_NAMES``).

    A bool is never a number (``True`` is an ``int`` to Python, not a depth); an int is also a
    number. ``label`` starts the message (``"FLUX config field "``).
    """
    is_bool = isinstance(value, bool)
    if not (is_bool if kind is bool else isinstance(value, kind) and not is_bool):
        raise DyditError(f"{label}{name} must be {_KIND_NAMES[kind]}, got {shown(value)}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise DyditError(f"{name} must be one of {choices}, got {shown(value)}")


def check_divisible(name: str, value: int, by_name: str, by: int) -> None:
    """Raise unless ``by`` divides ``value``; the message calls them ``name`` and ``by_name``."""
    if value % by:
        raise DyditError(f"{name} {value} is not divisible by {by_name} {by}")


def check_fraction(name: str, value: Any) -> None:
    """Raise unless ``value`` is a number in [0, 1) (a probability that may not be 1)."""
    if not (isinstance(value, int | float) and 0 <= value < 1):
        raise DyditError(f"{name} must be in [0, 1), got {shown(value)}")


def check_fields(cls: type, d: Mapping[str, Any], what: str) -> None:
    """Raise unless the stored config ``d`` names only fields of the dataclass ``cls`` and all of
    those without a default; ``what`` names the config kind in the message (``"U-ViT"``)."""
    fields = dataclasses.fields(cls)
    unknown = set(d) - {f.name for f in fields}
    if unknown:
        raise DyditError(f"unknown {what} config fields: {shown(sorted(map(str, unknown)))}")
    missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in d]
    if missing:
        raise DyditError(f"{what} config lacks the fields {missing}")


def replace_fields(config: Config, overrides: Mapping[str, Any], what: str) -> Config:
    """``config`` with ``overrides``, each a field of it; ``what`` names the options in the message."""
    known = {f.name for f in dataclasses.fields(config)}
    bad = set(overrides) - known
    if bad:
        raise DyditError(f"unknown {what} option(s) {sorted(bad)}; valid: {sorted(known)}")
    return dataclasses.replace(config, **overrides)
