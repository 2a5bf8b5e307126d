"""Fitting a state dict into a model strictly, with errors that name every mismatch.

These helpers know models and state-dict shapes, not files: reading files and picking a model for
them is :mod:`dydit.checkpoint`'s job.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from dydit.errors import CheckpointError
from dydit.presets import DIT_NAMES, MODEL_PRESETS, dydit_name

# Sub-module names that exist in DyDiT but not in DiT (docs/METHOD.md §12).
ROUTER_KEY_MARKERS: tuple[str, ...] = (".attn_rate.", ".mlp_rate.", ".token_selection.")


def has_routers(sd: Mapping[str, Tensor]) -> bool:
    """Whether a state dict holds any DyDiT router weights."""
    return any(m in k for k in sd for m in ROUTER_KEY_MARKERS)


def guess_preset(sd: Mapping[str, Tensor]) -> str | None:
    """Name the DiT (or DyDiT) preset whose shapes match a state dict (depth, width, patch), if one does.

    Shapes cannot tell a SiT from the DiT of the same size; the DiT name is returned.
    """
    try:
        width = sd["pos_embed"].shape[-1]
        patch = sd["x_embedder.proj.weight"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    except (KeyError, ValueError, IndexError):
        return None
    for name in DIT_NAMES:
        cfg = MODEL_PRESETS[name]
        if (cfg.depth, cfg.hidden_size, cfg.patch_size) == (depth, width, patch):
            return dydit_name(name) if has_routers(sd) else name
    return None


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
