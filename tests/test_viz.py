"""Pictures from plain tensors: sample grids, FLOPs profile, router heat map, token-keep overlays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from dydit import viz
from dydit.errors import DyditError


@dataclass
class Plan:  # WidthPlan-like
    timesteps: torch.Tensor
    heads: torch.Tensor
    groups: torch.Tensor


def _plan(steps: int = 10, layers: int = 3, heads: int = 4) -> Plan:
    t = torch.linspace(999, 0, steps).long()  # samplers run t downwards; the plots sort it
    g = torch.Generator().manual_seed(0)
    h = torch.rand(steps, layers, heads, generator=g) < 0.7
    h[..., 0] = True
    return Plan(t, h, torch.rand(steps, layers, heads, generator=g) < 0.5)


def _png(path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_sample_grid_with_labels(tmp_path) -> None:
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    fig = viz.sample_grid(
        images, torch.tensor([0, 1, 2, 0, 1, 2]), class_names=["a", "b", "c"], path=tmp_path / "grid.png"
    )
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["a", "b", "c", "a", "b", "c"]
    assert min(_png(tmp_path / "grid.png")) > 50
    # uint8 NHWC (an ADM batch) works too; labels without names show the index.
    fig = viz.sample_grid(np.zeros((3, 8, 8, 3), np.uint8), [4, 5, 6])
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["class 4", "class 5", "class 6"]
    with pytest.raises(DyditError, match="3 images but 2 labels"):
        viz.sample_grid(np.zeros((3, 8, 8, 3), np.uint8), [1, 2])


def test_to_display_layouts() -> None:
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 2, 2)
    np.testing.assert_allclose(viz.to_display(x)[0, ..., 0], [[0, 0.5], [1, 1]])
    nchw = np.full((2, 3, 4, 5), 255, np.uint8)
    assert viz.to_display(nchw).shape == (2, 4, 5, 3)


def test_flops_ratio_matches_hand_computation() -> None:
    heads = np.array([[[1, 1], [1, 0]]], bool)  # T=1, L=2, H=2
    groups = np.array([[[1, 0], [1, 1]]], bool)
    keep = np.array([[1.0, 0.5]])
    a, m = 1.0, 2.0
    expected = (a * 1 + m * 0.5 * 1 + a * 0.5 + m * 1 * 0.5) / (2 * (a + m))
    assert viz.flops_ratio_per_step(heads, groups, keep, (a, m))[0] == pytest.approx(expected)


def test_flops_profile_and_router_heatmap(tmp_path) -> None:
    plan = _plan()
    tokens = torch.rand(10, 2, 3, 16) < 0.8  # (T, B, L, N): RoutingStats.tokens per step
    fig = viz.flops_profile(plan, tokens, costs=(1.0, 2.5), path=tmp_path / "flops.png")
    rho_line = fig.axes[3].lines[0]  # axes: 3 heat maps, the FLOPs curve, then colour bars
    assert np.all(np.diff(rho_line.get_xdata()) > 0)  # timesteps sorted ascending
    assert 0 < rho_line.get_ydata().mean() < 1
    _png(tmp_path / "flops.png")
    viz.flops_profile(plan)  # without token data: all tokens kept
    dense = Plan(plan.timesteps, torch.ones_like(plan.heads), torch.ones_like(plan.groups))
    assert np.allclose(viz.flops_profile(dense).axes[3].lines[0].get_ydata(), 1.0)
    fig = viz.router_heatmap(plan, path=tmp_path / "router.png")
    assert fig.axes[0].images[0].get_array().shape == (3 * 4, 10)  # (layers x heads, timesteps)
    _png(tmp_path / "router.png")
    with pytest.raises(DyditError, match="token keep data"):
        viz.flops_profile(plan, torch.ones(10, 5))
    with pytest.raises(DyditError, match="width plan needs"):
        viz.router_heatmap(Plan(plan.timesteps, plan.heads[:, 0], plan.groups))


def test_token_keep_overlay(tmp_path) -> None:
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    keep = torch.rand(4, 2, 16) < 0.6  # (B, L, N) with a 4x4 token grid
    fig = viz.token_keep_overlay(images, keep, labels=[0, 1, 2, 3], path=tmp_path / "tokens.png")
    assert "kept" in fig.axes[0].get_title()
    _png(tmp_path / "tokens.png")
    with pytest.raises(DyditError, match="N a square"):
        viz.token_keep_overlay(images, torch.ones(4, 15))
    with pytest.raises(DyditError, match="does not tile"):
        viz.token_keep_overlay(images, torch.ones(4, 9))
