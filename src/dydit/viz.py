"""Pictures of samples and of DyDiT's dynamic computation (matplotlib, Agg canvas, no pyplot).

- :func:`sample_grid`: a grid of samples titled with their class labels.
- :func:`flops_profile`: per timestep, the active heads (TDW), active MLP groups (TDW) and kept
  tokens (SDT) of every layer, and the resulting FLOPs ratio (docs/METHOD.md §7.3).
- :func:`router_heatmap`: every head/group router decision, (layer, index) × timestep.
- :func:`token_keep_overlay`: SDT token masks over the sample images.

All functions take plain tensors or arrays (a WidthPlan-like object has ``timesteps`` (T,),
``heads`` (T, L, H) and ``groups`` (T, L, H)), so they work without a trained model. Each returns
the :class:`~matplotlib.figure.Figure` and, given ``path``, also writes it as a PNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dydit.errors import DyditError
from dydit.io import atomic_write, write_with_file

ArrayLike = np.ndarray | torch.Tensor


class WidthPlanLike(Protocol):
    timesteps: ArrayLike  # (T,) original timestep values
    heads: ArrayLike  # (T, L, H) bool: head h of layer l runs at timestep t
    groups: ArrayLike  # (T, L, H) bool: MLP group j of layer l runs at timestep t


def _np(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def to_display(images: ArrayLike) -> np.ndarray:
    """Images to float (B, H, W, C) in [0, 1].

    Float input is NCHW in [-1, 1] (model output); uint8 input is NHWC (ADM ``.npz``) or NCHW.
    """
    x = _np(images)
    if x.ndim != 4:
        raise DyditError(f"images must be a batch (B, C, H, W) or (B, H, W, C), got shape {x.shape}")
    if x.dtype == np.uint8:
        if x.shape[-1] not in (1, 3) and x.shape[1] in (1, 3):
            x = x.transpose(0, 2, 3, 1)
        return x.astype(np.float32) / 255.0
    if x.shape[1] not in (1, 3):
        raise DyditError(f"float images must be (B, C, H, W) with C = 1 or 3, got shape {x.shape}")
    return np.clip((x.transpose(0, 2, 3, 1).astype(np.float32) + 1.0) / 2.0, 0.0, 1.0)


def _show(ax, image: np.ndarray) -> None:
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _finish(fig: Figure, path: str | Path | None, dpi: int = 100) -> Figure:
    if path is not None:
        fmt = Path(path).suffix.lstrip(".") or None  # the temporary name hides the suffix from savefig
        atomic_write(
            path, write_with_file(lambda f: fig.savefig(f, format=fmt, dpi=dpi, bbox_inches="tight"))
        )
    return fig


def _label_text(label: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= label < len(class_names):
        return class_names[label]
    return f"class {label}"


def sample_grid(
    images: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    class_names: Sequence[str] | None = None,
    ncols: int | None = None,
    title: str | None = None,
    path: str | Path | None = None,
) -> Figure:
    """A grid of images, each titled with its class (name when ``class_names`` is given)."""
    x = to_display(images)
    n = len(x)
    if labels is not None and len(_np(labels)) != n:
        raise DyditError(f"{n} images but {len(_np(labels))} labels")
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(1.3 * ncols, 1.45 * nrows + (0.3 if title else 0)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_axis_off()
            continue
        _show(ax, x[i])
        if labels is not None:
            ax.set_title(_label_text(int(_np(labels)[i]), class_names), fontsize=7)
    if title:
        fig.suptitle(title)
    return _finish(fig, path)


def token_keep_fraction(tokens: ArrayLike, num_layers: int) -> np.ndarray:
    """Kept-token fraction (T, L) from fractions (T, L) or masks (T, L, N) / (T, B, L, N)."""
    k = _np(tokens).astype(np.float64)
    if k.ndim == 4:  # (T, B, L, N): a RoutingStats.tokens per sampling step
        k = k.mean(axis=(1, 3))
    elif k.ndim == 3:  # (T, L, N)
        k = k.mean(axis=2)
    if k.ndim != 2 or k.shape[1] != num_layers:
        raise DyditError(
            f"token keep data must be (T, L), (T, L, N) or (T, B, L, N) with L = {num_layers}, "
            f"got shape {_np(tokens).shape}"
        )
    return k


def flops_ratio_per_step(
    heads: np.ndarray, groups: np.ndarray, token_keep: np.ndarray, costs: tuple[float, float]
) -> np.ndarray:
    """ρ(t) = Σ_l [A·|heads_l|/H + M·(|groups_l|/H)·kept_l] / (L·(A + M)) for each of T steps (§7.3)."""
    attn, mlp = costs
    h = heads.mean(axis=2)  # (T, L) fraction of active heads
    g = groups.mean(axis=2)  # (T, L) fraction of active MLP groups
    return (attn * h + mlp * g * token_keep).sum(axis=1) / (heads.shape[1] * (attn + mlp))


def _check_plan(plan: WidthPlanLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t, heads, groups = _np(plan.timesteps), _np(plan.heads).astype(bool), _np(plan.groups).astype(bool)
    if heads.ndim != 3 or groups.ndim != 3 or heads.shape[:2] != groups.shape[:2] or len(t) != len(heads):
        raise DyditError(
            f"a width plan needs timesteps (T,), heads (T, L, H) and groups (T, L, H); got "
            f"{t.shape}, {heads.shape}, {groups.shape}"
        )
    order = np.argsort(t)
    return t[order], heads[order], groups[order]


def flops_profile(
    plan: WidthPlanLike,
    tokens: ArrayLike | None = None,
    *,
    costs: tuple[float, float] | None = None,
    title: str | None = None,
    path: str | Path | None = None,
) -> Figure:
    """Heads, MLP groups and kept tokens of every layer across t, and the FLOPs ratio per step.

    Args:
        plan: width plan; ``tokens``: kept-token data (see :func:`token_keep_fraction`; default all).
        costs: per-layer dense MACs (A, M) of attention and MLP, e.g. ``dydit.flops.layer_costs(N, D)``;
            default (1, 2), their ratio when N ≪ D.
    """
    t, heads, groups = _check_plan(plan)
    steps, layers, _ = heads.shape
    if tokens is None:
        keep = np.ones((steps, layers))
    else:
        keep = token_keep_fraction(tokens, layers)[np.argsort(_np(plan.timesteps))]
    if len(keep) != steps:
        raise DyditError(f"token keep data has {len(keep)} timesteps, the width plan {steps}")
    rho = flops_ratio_per_step(heads, groups, keep, costs or (1.0, 2.0))
    panels = [
        ("active heads", heads.sum(axis=2), heads.shape[2]),
        ("active MLP groups", groups.sum(axis=2), groups.shape[2]),
        ("kept tokens (fraction)", keep, 1.0),
    ]
    fig = Figure(figsize=(10, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    # Two columns: plots and their colour bars, so all four x axes line up.
    grid = fig.add_gridspec(4, 2, width_ratios=[40, 1], height_ratios=[1, 1, 1, 1.1])
    axes = [fig.add_subplot(grid[0, 0])]
    axes += [fig.add_subplot(grid[i, 0], sharex=axes[0]) for i in range(1, 4)]
    extent = (float(t[0]) - 0.5, float(t[-1]) + 0.5, layers - 0.5, -0.5)
    for i, (name, values, vmax) in enumerate(panels):
        ax = axes[i]
        im = ax.imshow(
            values.T, aspect="auto", extent=extent, vmin=0, vmax=vmax, cmap="viridis", interpolation="nearest"
        )
        ax.set_ylabel("layer")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelbottom=False)
        fig.colorbar(im, cax=fig.add_subplot(grid[i, 1]))
    ax = axes[-1]
    ax.plot(t, rho, marker="." if steps < 60 else None, color="tab:red")
    ax.axhline(rho.mean(), color="gray", ls="--", lw=0.8, label=f"mean {rho.mean():.3f}")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("FLOPs ratio\n(attention + MLP)")
    ax.set_xlabel("timestep t")
    ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title or "DyDiT computation per timestep")
    return _finish(fig, path)


def router_heatmap(
    plan: WidthPlanLike,
    *,
    title: str | None = None,
    path: str | Path | None = None,
) -> Figure:
    """Every width-router decision: rows (layer, head) and (layer, group), columns timesteps."""
    t, heads, groups = _check_plan(plan)
    steps, layers, _ = heads.shape
    fig = Figure(figsize=(10, 2 + 0.25 * layers * 2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=False)
    for ax, (name, mask) in zip(axes, (("attention heads", heads), ("MLP groups", groups))):
        units = mask.shape[2]
        rows = mask.transpose(1, 2, 0).reshape(layers * units, steps)  # (L·H, T), layer-major
        ax.imshow(
            rows,
            aspect="auto",
            cmap="Greys",
            vmin=0,
            vmax=1,
            interpolation="nearest",
            extent=(float(t[0]) - 0.5, float(t[-1]) + 0.5, layers * units - 0.5, -0.5),
        )
        for layer in range(1, layers):
            ax.axhline(layer * units - 0.5, color="tab:blue", lw=0.5)
        ax.set_yticks([layer * units + (units - 1) / 2 for layer in range(layers)])
        ax.set_yticklabels([str(layer) for layer in range(layers)], fontsize=7)
        ax.set_ylabel("layer (one row per head/group)")
        ax.set_xlabel("timestep t")
        ax.set_title(f"{name}: {100 * mask.mean():.0f}% on", fontsize=9)
    fig.suptitle(title or "width routers (black = active)")
    return _finish(fig, path)


def token_keep_overlay(
    images: ArrayLike,
    keep: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    class_names: Sequence[str] | None = None,
    ncols: int | None = None,
    title: str | None = None,
    path: str | Path | None = None,
) -> Figure:
    """Samples with their SDT token decisions: skipped tokens shaded red.

    ``keep`` is (B, N) bool/float, or (B, L, N) (averaged over layers, so the shading shows how
    many layers skip a token). N = g² tokens on a g×g grid over the image.
    """
    x = to_display(images)
    k = _np(keep).astype(np.float64)
    if k.ndim == 3:
        k = k.mean(axis=1)
    grid = math.isqrt(k.shape[-1]) if k.ndim == 2 else 0
    if k.ndim != 2 or len(k) != len(x) or grid * grid != k.shape[1]:
        raise DyditError(
            f"keep must be (B, N) or (B, L, N) with B = {len(x)} and N a square, got {_np(keep).shape}"
        )
    height, width = x.shape[1:3]
    if height % grid or width % grid:
        raise DyditError(f"a {grid}x{grid} token grid does not tile {height}x{width} images")
    n = len(x)
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(1.6 * ncols, 1.75 * nrows + (0.3 if title else 0)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    lab = None if labels is None else _np(labels)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_axis_off()
            continue
        _show(ax, x[i])
        skipped = 1.0 - k[i].reshape(grid, grid)
        shade = np.zeros((grid, grid, 4))
        shade[..., 0] = 1.0
        shade[..., 3] = 0.55 * skipped
        ax.imshow(shade, extent=(-0.5, width - 0.5, height - 0.5, -0.5), interpolation="nearest")
        text = f"kept {100 * k[i].mean():.0f}%"
        if lab is not None:
            text = f"{_label_text(int(lab[i]), class_names)}\n{text}"
        ax.set_title(text, fontsize=7)
    fig.suptitle(title or "SDT token keep map (red = skipped by the MLP)")
    return _finish(fig, path)
