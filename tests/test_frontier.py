"""The equal-compute comparison: benchmarks/frontier.py and the demo report's verdict line."""

from __future__ import annotations

import json

import pytest
from conftest import load_benchmark

from dydit.apps.demo_report import equal_compute_verdict
from dydit.errors import DyditError


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


def test_the_lower_envelope_keeps_only_points_that_beat_every_cheaper_one(frontier):
    worse_later = dense(20, 90.0)  # dearer and worse than 10 steps: off the envelope
    tie = dict(dense(12, 82.0), label="same FID, dearer")  # equal to 10 steps' 82: the cheaper stays
    twin = dict(dense(10, 85.0), label="same MACs, worse")  # 10 steps' compute, worse FID
    no_fid = {k: v for k, v in dense(3, 0.0).items() if k != "FID"}
    points = [worse_later, tie, dense(10, 82.0), twin, dense(5, 105.0), dense(4, 131.0), no_fid]
    envelope = frontier.lower_envelope(points)
    assert [(p["steps"], p["FID"]) for p in envelope] == [(4, 131.0), (5, 105.0), (10, 82.0)]
    fids = [p["FID"] for p in envelope]
    assert all(a > b for a, b in zip(fids, fids[1:]))  # strictly decreasing
    for p in points[:-1]:  # every point is at or above the envelope at its compute
        assert p["FID"] >= min(e["FID"] for e in envelope if e["macs_per_image"] <= p["macs_per_image"])
    by_time = frontier.lower_envelope(points, key="seconds_per_image")
    assert [p["steps"] for p in by_time] == [4, 5, 10]


def kind(point: dict, kind: str, label: str, macs: float) -> dict:
    return dict(point, kind=kind, label=label, macs_per_image=macs)


BUDGET_POINTS = [
    *POINTS,  # dense: 0.4, 0.5, 1.0 and 2.0 GMACs at FID 131, 105, 82, 82
    dydit(6, 150.0),  # 0.3 GMACs
    dydit(10, 100.0),  # 0.5 GMACs
    dydit(20, 95.0),  # 1.0 GMACs
    kind(dydit(10, 100.0), "dydit+cache", "DyDiT λ=0.5 + teacache:0.1", 4.5e8),  # ties 10 steps, cheaper
    kind(dense(10, 90.0), "dense+cache", "DiT (dense) + teacache:0.1", 6e8),
    kind(dense(3, 1.0), "control", "control", 3e8),  # the best FID of all, but neither side's
]


def test_budget_verdicts_take_each_sides_best_point_within_the_budget(frontier):
    rows = {r["budget"]: r for r in frontier.budget_verdicts(BUDGET_POINTS, (0.2, 0.3, 0.5, 0.7, 1.0))}
    assert rows[0.2]["verdict"] == "no point within budget" and rows[0.2]["best_kind"] is None
    r = rows[0.3]  # only the 0.3-GMAC DyDiT fits; the control does not count
    assert r["verdict"] == "no dense point within budget" and r["gap"] is None
    assert r["DyDiT-based"]["FID"] == 150.0 and r["dense-based"] is None and r["best_kind"] == "dydit"
    r = rows[0.5]  # the dense 5 steps sit exactly on the budget; DyDiT + cache ties DyDiT 10 steps, cheaper
    assert r["dense-based"]["steps"] == 5 and r["DyDiT-based"]["kind"] == "dydit+cache"
    assert r["best"]["dydit"]["steps"] == 10 and r["best"]["dense+cache"] is None
    assert r["gap"] == pytest.approx(-5.0) and r["verdict"] == "DyDiT-based wins by 5.0 FID"
    assert r["best_kind"] == "dydit+cache"
    r = rows[0.7]  # dense + cache (90 at 0.6) beats the dense 5 steps and every DyDiT
    assert r["dense-based"]["kind"] == "dense+cache" and r["best"]["dense"]["steps"] == 5
    assert r["gap"] == pytest.approx(10.0) and r["verdict"] == "dense-based wins by 10.0 FID"
    assert r["best_kind"] == "dense+cache"
    r = rows[1.0]
    assert (r["dense-based"]["FID"], r["DyDiT-based"]["FID"]) == (82.0, 95.0) and r["best_kind"] == "dense"


def test_budget_verdicts_call_a_tie_and_reject_bad_budgets(frontier):
    (row,) = frontier.budget_verdicts([dense(5, 100.0), dydit(10, 100.0)], (0.5,))
    assert row["gap"] == 0 and row["verdict"] == "a tie"
    (row,) = frontier.budget_verdicts([dense(5, 100.0)], (0.5,))
    assert row["verdict"] == "no DyDiT point within budget"
    with pytest.raises(DyditError, match="positive"):
        frontier.budget_verdicts(POINTS, (0.5, 0.0))


def test_render_only_writes_the_budget_table_from_a_stored_file(frontier, tmp_path):
    stored = tmp_path / "in" / "frontier.json"
    stored.parent.mkdir()
    stored.write_text(json.dumps({"points": BUDGET_POINTS, "machine": "test cpu", "torch": "x"}))
    frontier.main(["--render", str(stored), "--out-dir", str(tmp_path / "out"), "--budgets", "0.5,0.3"])
    table = (tmp_path / "out" / "frontier.md").read_text()
    assert (
        not (tmp_path / "in" / "frontier.md").exists() and (tmp_path / "out" / "frontier_macs.png").exists()
    )
    rows = [line for line in table.splitlines() if line.startswith("| ≤ ")]
    assert [line.split(" | ")[0] for line in rows] == ["| ≤ 0.3", "| ≤ 0.5"]
    assert "no dense point within budget" in rows[0] and "DyDiT-based wins by 5.0 FID" in rows[1]
    assert "DiT (dense), 5 steps, 0.500 GMACs: 105.0" in rows[1] and "| -5.0 |" in rows[1]
    assert table.rstrip().endswith("DyDiT-based on or below dense-based at 1 of 2 budgets.")
    with pytest.raises(SystemExit):
        frontier.parse(["--budgets", "0.5,-1"])
