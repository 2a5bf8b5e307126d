"""DyDiT checkpoints (docs/METHOD.md §12): the router layout a state dict was saved with, and loading a
DiT or DyDiT state dict into a DyDiT strictly (a DiT's weights leave exactly the routers fresh).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from dydit.errors import CheckpointError
from dydit.models.dydit import DyDiT
from dydit.models.fitting import ROUTER_KEY_MARKERS, fit_state_dict, has_routers


def detect_router_layout(sd: Mapping[str, Tensor], num_heads: int) -> str | None:
    """Router layout of a state dict from its width-router shapes; None when it has no width routers.

    H - 1 outputs: ``"forced_first"`` (current release); H outputs: ``"all"`` (Dec-2024 release).
    """
    suffixes = ("attn_rate.router.weight", "mlp_rate.router.weight")
    outputs = {v.shape[0] for k, v in sd.items() if k.endswith(suffixes)}
    if not outputs:
        return None
    if len(outputs) > 1:
        raise CheckpointError(f"width routers disagree on their output count: {sorted(outputs)}")
    k = outputs.pop()
    if k == num_heads - 1:
        return "forced_first"
    if k == num_heads:
        return "all"
    raise CheckpointError(
        f"width routers have {k} outputs, which fits neither layout for {num_heads} heads "
        f"(forced_first: {num_heads - 1}, all: {num_heads}); is the checkpoint for another model size?"
    )


def check_layout(requested: str | None, detected: str | None) -> None:
    """Raise CheckpointError when a requested router layout contradicts the checkpoint's."""
    if requested is not None and detected is not None and requested != detected:
        raise CheckpointError(
            f"router layout {requested!r} was requested, but the checkpoint's width routers have "
            f"{'H-1' if detected == 'forced_first' else 'H'} outputs (layout {detected!r})"
        )


def with_router_layout(cfg: Any, sd: Mapping[str, Tensor], source: str, overrides: dict[str, Any]) -> Any:
    """``cfg`` made a DyDiT with the router layout its router weights say (a ``router_layout`` in
    ``overrides`` must agree), then the other ``overrides`` applied; for any family's config."""
    overrides = dict(overrides)
    requested = overrides.pop("router_layout", None)
    if has_routers(sd):
        if overrides.get("dynamic") is False:
            raise CheckpointError(f"{source} holds DyDiT router weights; it loads as a DyDiT only")
        try:
            detected = detect_router_layout(sd, cfg.num_heads)
        except CheckpointError:
            detected = None  # strict loading reports the mismatch in full
        check_layout(requested, detected)
        cfg = cfg.replace(dynamic=True, router_layout=detected or requested or cfg.router_layout)
    elif requested is not None:
        cfg = cfg.replace(router_layout=requested)
    return cfg.replace(**overrides) if overrides else cfg


def load_dydit_state_dict(model: DyDiT, sd: Mapping[str, Tensor], layout: str | None = None) -> list[str]:
    """Load ``sd`` (a DyDiT or a plain DiT state dict) into ``model`` strictly.

    A plain DiT state dict may lack exactly the router keys, which keep their initialisation; the
    keys left initialised are returned (empty for a DyDiT checkpoint). ``layout`` forces a router
    layout and must agree with the checkpoint. Any other mismatch raises CheckpointError.
    """
    sd = dict(sd)
    try:
        detected = detect_router_layout(sd, model.config.num_heads)
    except CheckpointError:
        fit_state_dict(model, sd)  # reports every mismatch and names the model the file looks like
        raise
    check_layout(layout, detected)
    wanted = detected or layout
    if wanted is not None and wanted != model.router_layout:
        raise CheckpointError(
            f"the model uses router layout {model.router_layout!r} but the checkpoint needs {wanted!r}; "
            f"build the model with router_layout={wanted!r}"
        )
    return fit_state_dict(model, sd, allow_missing=ROUTER_KEY_MARKERS if detected is None else ())
