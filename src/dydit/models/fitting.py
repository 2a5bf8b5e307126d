"""Fitting a state dict into a model strictly, with errors that name every mismatch.

These helpers know models and state-dict shapes, not files: reading files and picking a model for
them is :mod:`dydit.checkpoint`'s job.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor, nn

from dydit.errors import CheckpointError
from dydit.models.dit import KEYS
from dydit.presets import DIT_NAMES, MODEL_PRESETS, ModelConfig, dydit_name

# Sub-module names that exist in DyDiT but not in DiT (docs/METHOD.md §12).
ROUTER_KEY_MARKERS: tuple[str, ...] = (".attn_rate.", ".mlp_rate.", ".token_selection.")
_BLOCK_KEY = re.compile(re.escape(KEYS["block"]) + r"(\d+)\.")


def has_routers(sd: Mapping[str, Tensor]) -> bool:
    """Whether a state dict holds any DyDiT router weights."""
    return any(m in k for k in sd for m in ROUTER_KEY_MARKERS)


def guess_preset(sd: Mapping[str, Tensor]) -> str | None:
    """Name the DiT (or DyDiT) preset whose shapes match a state dict (depth, width, patch), if one does.

    Shapes cannot tell a SiT from the DiT of the same size; the DiT name is returned.
    """
    try:
        width = sd[KEYS["positions"]].shape[-1]
        patch = sd[KEYS["patch"]].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith(KEYS["block"]))
    except (KeyError, ValueError, IndexError):
        return None
    for name in DIT_NAMES:
        cfg = MODEL_PRESETS[name]
        if (cfg.depth, cfg.hidden_size, cfg.patch_size) == (depth, width, patch):
            return dydit_name(name) if has_routers(sd) else name
    return None


def _shape(sd: Mapping[str, Tensor], key: str, ndim: int) -> tuple[int, ...] | None:
    value = sd.get(key)
    return tuple(value.shape) if isinstance(value, Tensor) and value.dim() == ndim else None


def size_mismatches(
    cfg: ModelConfig, sd: Mapping[str, Tensor], names: Mapping[str, str] | None = None
) -> list[str]:
    """The sizes of ``cfg`` that the weights contradict, one phrase each, read from a few shapes.

    Nothing is built: a config that lies about its weights (depth 1000 for a 2-block file) is caught
    before a model of its size is allocated. Shapes absent from ``sd`` are left to strict loading.
    ``names`` renames fields in the phrases (a diffusers ``config.json`` says ``num_layers``).
    """

    def phrase(field: str, ours: str, theirs: str) -> str:
        return f"{(names or {}).get(field, field)} {ours} in the config, {theirs} in the weights"

    out = []
    blocks = {int(m[1]) for k in sd if (m := _BLOCK_KEY.match(k))}
    depth = 1 + max(blocks, default=-1)
    if depth != cfg.depth:
        out.append(phrase("depth", str(cfg.depth), f"{depth} blocks"))
    proj = _shape(sd, KEYS["patch"], 4)
    pos = _shape(sd, KEYS["positions"], 3)
    width = proj[0] if proj else pos[2] if pos else None
    wide = width is not None and width != cfg.hidden_size
    if wide:
        out.append(phrase("hidden_size", str(cfg.hidden_size), f"width {width}"))
    patch = proj is not None and proj[2] != cfg.patch_size
    if patch:
        out.append(phrase("patch_size", str(cfg.patch_size), str(proj[2])))
    channels = proj is not None and proj[1] != cfg.in_channels
    if channels:
        out.append(phrase("in_channels", str(cfg.in_channels), str(proj[1])))
    if pos and pos[1] != cfg.num_tokens:
        out.append(phrase("input_size", f"{cfg.input_size} ({cfg.num_tokens} tokens)", f"{pos[1]} tokens"))
    rows = _shape(sd, KEYS["labels"], 2)
    want = cfg.num_classes + (cfg.class_dropout_prob > 0)
    if rows and rows[0] != want:
        ours = f"{cfg.num_classes} ({want} label rows)"
        out.append(phrase("num_classes", ours, f"{rows[0]} label rows"))
    final = _shape(sd, KEYS["output"], 2)
    pp = cfg.patch_size**2
    if final and not (channels or patch) and final[0] != pp * cfg.out_channels:
        ours = f"{str(cfg.learn_sigma).lower()} ({cfg.out_channels} output channels)"
        out.append(phrase("learn_sigma", ours, f"{final[0] / pp:g} output channels"))
    fc1 = _shape(sd, KEYS["mlp_in"], 2)
    if fc1 and not wide and fc1[0] != cfg.mlp_hidden:
        ours = f"{cfg.mlp_ratio:g} (MLP width {cfg.mlp_hidden})"
        out.append(phrase("mlp_ratio", ours, f"MLP width {fc1[0]}"))
    return out


def describe_mismatch(model: nn.Module, sd: Mapping[str, Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mis-shaped) keys of ``sd`` relative to ``model``'s state dict."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    misshaped = sorted(
        f"{k} (checkpoint {tuple(sd[k].shape)}, model {tuple(own[k].shape)})"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    )
    return missing, unexpected, misshaped


def _abbrev(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def mismatch_message(
    model: nn.Module, sd: Mapping[str, Tensor], allow_missing: tuple[str, ...] = ()
) -> str | None:
    """One line naming every mismatch of ``sd`` against ``model`` (None when it fits strictly)."""
    missing, unexpected, misshaped = describe_mismatch(model, sd)
    missing = [k for k in missing if not any(s in k for s in allow_missing)]
    if not (missing or unexpected or misshaped):
        return None
    parts = []
    if missing:
        parts.append(f"missing keys: {_abbrev(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_abbrev(unexpected)}")
    if misshaped:
        parts.append(f"mis-shaped keys: {_abbrev(misshaped, 3)}")
    guess = guess_preset(sd)
    hint = f"; the checkpoint looks like {guess}" if guess else ""
    return "checkpoint does not fit the model: " + "; ".join(parts) + hint


def fit_state_dict(
    model: nn.Module, sd: Mapping[str, Tensor], allow_missing: tuple[str, ...] = ()
) -> list[str]:
    """Load ``sd`` into ``model`` strictly, or raise a CheckpointError naming every mismatch.

    Keys of the model that contain one of ``allow_missing`` substrings may be absent from ``sd``
    (they keep their initialisation); those keys are returned.
    """
    problem = mismatch_message(model, sd, allow_missing)
    if problem:
        raise CheckpointError(problem)
    tolerated = [k for k in model.state_dict() if k not in sd]
    model.load_state_dict(dict(sd), strict=False)
    return tolerated
