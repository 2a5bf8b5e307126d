"""The equal-compute comparison: benchmarks/frontier.py and the demo report's verdict line."""

from __future__ import annotations

import json

import pytest
from conftest import load_benchmark

from dydit.apps.demo_report import equal_compute_verdict


@pytest.fixture(scope="module")
def frontier():
    return load_benchmark("frontier")


def dense(steps: int, fid: float, per_step: float = 1e8) -> dict:
    return dict(label="DiT (dense)", kind="dense", steps=steps, macs_per_image=steps * per_step,
                seconds_per_image=0.01 * steps, FID=fid)  # fmt: skip


def dydit(steps: int, fid: float, rho: float = 0.5, per_step: float = 1e8) -> dict:
    return dict(label="DyDiT λ=0.5", kind="dydit", steps=steps, macs_per_image=rho * steps * per_step,
                seconds_per_image=0.006 * steps, FID=fid)  # fmt: skip


POINTS = [dense(4, 131.0), dense(5, 105.0), dense(10, 82.0), dense(20, 82.0)]


def test_equal_compute_interpolates_the_dense_curve_in_macs(frontier):
    eq = frontier.equal_compute(dydit(10, 100.0), POINTS)  # 5 dense steps' worth of compute
    assert eq["dense_steps"] == 5 and eq["dense_fid"] == 105.0
    assert eq["frontier_fid"] == pytest.approx(105.0)
    assert eq["delta_fid"] == pytest.approx(-5.0) and eq["verdict"] == "DyDiT wins"
    eq = frontier.equal_compute(dydit(15, 100.0), POINTS)  # 7.5 steps: between 5 (105) and 10 (82)
    assert eq["frontier_fid"] == pytest.approx(105.0 + (82.0 - 105.0) * 0.5)
    assert eq["dense_steps"] == 8 and "dense_fid" not in eq  # 8 dense steps were not measured
    assert eq["verdict"] == "fewer dense steps win" and eq["delta_fid"] == pytest.approx(100.0 - 93.5)


def test_points_outside_the_measured_range_get_no_interpolated_frontier(frontier):
    eq = frontier.equal_compute(dydit(6, 150.0), POINTS)  # 3 dense steps: below the measured curve
    assert "frontier_fid" not in eq and eq["dense_steps"] == 3
    assert "verdict" not in eq  # nothing measured to compare with


def test_render_writes_the_table_and_both_plots(frontier, tmp_path):
    result = {"points": [*POINTS, dydit(10, 100.0), dydit(20, 95.0)], "machine": "test cpu", "torch": "x"}
    frontier.render(json.loads(json.dumps(result)), tmp_path)
    table = (tmp_path / "frontier.md").read_text()
    assert "| DyDiT λ=0.5 | 10 |" in table and "DyDiT wins" in table and "fewer dense steps win" in table
    for png in ("frontier_macs.png", "frontier_time.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_demo_verdict_names_the_winner_at_equal_compute():
    assert equal_compute_verdict(95.0, 82.0, 20, 10).startswith("at equal compute fewer dense steps win")
    assert equal_compute_verdict(100.0, 105.0, 10, 5).startswith("at equal compute DyDiT wins")
    assert "no FID" in equal_compute_verdict(None, 82.0, 20, 10)


def test_cache_points_are_compared_with_the_dense_frontier(frontier, tmp_path):
    cache = dict(dense(10, 90.0), label="DiT (dense) + teacache:0.1", kind="dense+cache", macs_per_image=6e8)
    both = dict(dydit(10, 120.0), label="DyDiT λ=0.5 + fbcache:0.1", kind="dydit+cache", macs_per_image=4.5e8)
    assert frontier.equal_compute(cache, POINTS)["verdict"] == "dense + cache wins"  # 90 vs 100.4
    assert frontier.equal_compute(both, POINTS)["verdict"] == "fewer dense steps win"  # 120 vs 118
    assert frontier.equal_compute({**both, "FID": 110.0}, POINTS)["verdict"] == "DyDiT + cache wins"
    frontier.render({"points": [*POINTS, cache, both, dydit(10, 100.0)]}, tmp_path)
    table = (tmp_path / "frontier.md").read_text()
    assert "| DiT (dense) + teacache:0.1 | 10 |" in table and "dense + cache wins" in table
    assert table.index("teacache") < table.index("DyDiT λ=0.5 |") < table.index("fbcache")


def test_a_cache_point_knows_its_sampling_run(frontier):
    from dydit.apps.demo import DemoConfig
    from dydit.models.cache import StepCache
    from dydit.models.dit import DiT
    from dydit.presets import ModelConfig

    model = DiT(ModelConfig(depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=1))
    fn = frontier.cached_model(model.eval(), "teacache:0.2", DemoConfig(steps=7, sampler="dpm++2m"), None)
    assert isinstance(fn, StepCache) and fn._run.evaluations == 7 and fn.settings.threshold == 0.2


def test_rows_name_the_dense_model_by_its_family(frontier):
    from dydit.presets import get_model_config

    names = {n: frontier.family_name(get_model_config(n)) for n in ("DiT-Ti/4", "SiT-Ti/4", "U-ViT-Ti/4")}
    assert names == {"DiT-Ti/4": "DiT", "SiT-Ti/4": "SiT", "U-ViT-Ti/4": "U-ViT"}
