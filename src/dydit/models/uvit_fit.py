"""U-ViT state dicts: telling one apart and naming the config fields its shapes contradict.

The U-ViT counterpart of :mod:`dydit.models.fitting` (which also serves U-ViT for the strict key
check itself); docs/METHOD.md §16.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from dydit.models.uvit import UVIT_KEYS
from dydit.presets import UViTConfig

_IN_BLOCK = re.compile(re.escape(UVIT_KEYS["in_block"]) + r"(\d+)\.")


def looks_like_uvit(sd: Mapping[str, Tensor]) -> bool:
    """Whether a state dict has the official U-ViT layout (in-blocks, a mid-block, a patch conv)."""
    return UVIT_KEYS["patch"] in sd and any(k.startswith("mid_block.") for k in sd)


def _shape(sd: Mapping[str, Tensor], key: str) -> tuple[int, ...] | None:
    value = sd.get(key)
    return tuple(value.shape) if isinstance(value, Tensor) else None


def uvit_size_mismatches(cfg: UViTConfig, sd: Mapping[str, Tensor]) -> list[str]:
    """The fields of ``cfg`` that the weights contradict, one phrase each, from a few shapes (nothing
    is built, so a config that lies about its size is caught before anything is allocated)."""

    def phrase(field: str, ours: object, theirs: str) -> str:
        return f"{field} {ours} in the config, {theirs} in the weights"

    out = []
    half = 1 + max((int(m[1]) for k in sd if (m := _IN_BLOCK.match(k))), default=-1)
    if 2 * half != cfg.depth - cfg.depth % 2:
        out.append(phrase("depth", cfg.depth, f"{half} in-blocks"))
    proj = _shape(sd, UVIT_KEYS["patch"])
    if proj is not None and len(proj) == 4:
        if proj[0] != cfg.hidden_size:
            out.append(phrase("hidden_size", cfg.hidden_size, f"width {proj[0]}"))
        if proj[1] != cfg.in_channels:
            out.append(phrase("in_channels", cfg.in_channels, str(proj[1])))
        if proj[2] != cfg.patch_size:
            out.append(phrase("patch_size", cfg.patch_size, str(proj[2])))
    pos = _shape(sd, UVIT_KEYS["positions"])
    if pos is not None and len(pos) == 3 and pos[1] != cfg.extras + cfg.num_tokens:
        ours = f"{cfg.input_size} ({cfg.extras} + {cfg.num_tokens} tokens)"
        out.append(phrase("input_size", ours, f"{pos[1]} tokens"))
    rows = _shape(sd, UVIT_KEYS["labels"])
    if (rows[0] if rows else 0) != cfg.label_rows:
        theirs = f"{rows[0]} label rows" if rows else "no label table"
        out.append(phrase("num_classes", f"{cfg.num_classes} ({cfg.label_rows} label rows)", theirs))
    fc1 = _shape(sd, UVIT_KEYS["mlp_in"])
    if fc1 and fc1[0] != cfg.mlp_hidden:
        out.append(
            phrase("mlp_ratio", f"{cfg.mlp_ratio:g} (MLP width {cfg.mlp_hidden})", f"MLP width {fc1[0]}")
        )
    flags = {
        "mlp_time_embed": UVIT_KEYS["time_mlp"],
        "conv": UVIT_KEYS["conv"],
        "skip": UVIT_KEYS["skip"],
        "qkv_bias": "in_blocks.0.attn.qkv.bias",
    }
    for field, key in flags.items():
        if half and (key in sd) != getattr(cfg, field):
            out.append(
                phrase(
                    field, str(getattr(cfg, field)).lower(), f"{key} {'present' if key in sd else 'absent'}"
                )
            )
    return out
