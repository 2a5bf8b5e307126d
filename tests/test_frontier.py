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
    for png in ("frontier_macs.png", "frontier_time.png", "frontier_budgets.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_demo_verdict_names_the_winner_at_equal_compute():
    assert equal_compute_verdict(95.0, 82.0, 20, 10).startswith("at equal compute fewer dense steps win")
    assert equal_compute_verdict(100.0, 105.0, 10, 5).startswith("at equal compute DyDiT wins")
    assert "no FID" in equal_compute_verdict(None, 82.0, 20, 10)


def test_cache_points_are_compared_with_the_dense_frontier(frontier, tmp_path):
    cache = dict(dense(10, 90.0), label="DiT (dense) + teacache:0.1", kind="dense+cache", macs_per_image=6e8,
                 evaluations_computed=7, evaluations_reused=3)  # fmt: skip
    both = dict(dydit(10, 120.0), label="DyDiT λ=0.5 + fbcache:0.1", kind="dydit+cache", macs_per_image=4.5e8)
    assert frontier.equal_compute(cache, POINTS)["verdict"] == "dense + cache wins"  # 90 vs 100.4
    assert frontier.equal_compute(both, POINTS)["verdict"] == "fewer dense steps win"  # 120 vs 118
    assert frontier.equal_compute({**both, "FID": 110.0}, POINTS)["verdict"] == "DyDiT + cache wins"
    frontier.render({"points": [*POINTS, cache, both, dydit(10, 100.0)]}, tmp_path)
    table = (tmp_path / "frontier.md").read_text()
    assert "| DiT (dense) + teacache:0.1 | 10 | 7 / 3 |" in table and "dense + cache wins" in table
    assert "| DyDiT λ=0.5 | 10 | – |" in table and "| DyDiT λ=0.5 + fbcache:0.1 | 10 | – |" in table
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


def test_budget_verdicts_read_the_static_control_beside_the_sides(frontier):
    # The control (fine-tuned, no routers) is not an option for users, but a DyDiT-based win that the
    # extra training alone also brings must show: each budget reads the control's best point too.
    control = [
        kind(dense(5, 90.0), "control", "control", 5e8),
        kind(dense(10, 80.0), "control", "control", 1e9),
    ]
    rows = {
        r["budget"]: r for r in frontier.budget_verdicts([*BUDGET_POINTS[:-1], *control], (0.3, 0.5, 1.0))
    }
    assert rows[0.3]["control"] is None and rows[0.3]["control_gap"] is None
    r = rows[0.5]  # DyDiT-based 100 beats dense-based 105, but not the control's 90
    assert r["verdict"] == "DyDiT-based wins by 5.0 FID" and r["control"]["FID"] == 90.0
    assert r["control_gap"] == pytest.approx(10.0)
    assert rows[1.0]["control"]["FID"] == 80.0 and rows[1.0]["control_gap"] == pytest.approx(15.0)
    table = frontier._budget_markdown(list(rows.values()))
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| budget"))
    assert header.endswith("| best kind | best static control | Δ vs control |")
    row = next(line for line in lines if line.startswith("| ≤ 0.5 "))
    assert row.count("|") == header.count("|") and row.endswith(
        "control, 5 steps, 0.500 GMACs: 90.0 | +10.0 |"
    )
    assert table.rstrip().endswith("On or below the static control at 0 of 2 budgets with both.")
    plain = frontier._budget_markdown(frontier.budget_verdicts(BUDGET_POINTS[:-1], (0.5,)))
    assert "static control" not in plain.splitlines()[2] and "Δ vs control" not in plain


def test_a_difference_below_the_shown_precision_is_a_tie(frontier):
    # A cache that reuses nothing, sampled with another thread count: the same images up to the 4th
    # decimal of the FID. Shown as +0.0, it must not read as a win for either side.
    cache = dict(dense(10, 82.0 + 3e-4), label="DiT (dense) + teacache:0.05", kind="dense+cache")
    eq = frontier.equal_compute(cache, POINTS)
    assert eq["delta_fid"] == pytest.approx(3e-4) and eq["verdict"] == "a tie"
    assert frontier.equal_compute({**cache, "FID": 82.0 - 0.06}, POINTS)["verdict"] == "dense + cache wins"
    assert frontier.equal_compute({**cache, "FID": 82.0 + 0.06}, POINTS)["verdict"] == "fewer dense steps win"
    (row,) = frontier.budget_verdicts([dense(5, 100.0), dydit(10, 100.0 - 0.04)], (0.5,))
    assert row["gap"] == pytest.approx(-0.04) and row["verdict"] == "a tie"
    (row,) = frontier.budget_verdicts([dense(5, 100.0), dydit(10, 100.0 - 0.06)], (0.5,))
    assert row["verdict"] == "DyDiT-based wins by 0.1 FID"
    # GenEval's overall score is shown with three decimals, higher is better.
    t2i = [dict(dense(4, 0.0), overall=0.500), dict(dense(8, 0.0), overall=0.600)]
    point = dict(dydit(12, 0.0), overall=0.5503)  # 6 dense steps' compute: the curve's 0.550
    assert frontier.equal_compute(point, t2i, "overall", higher_is_better=True)["verdict"] == "a tie"
    point["overall"] = 0.552
    assert frontier.equal_compute(point, t2i, "overall", higher_is_better=True)["verdict"] == "DyDiT wins"


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
    assert table.rstrip().endswith(
        "DyDiT-based on or below dense-based at 1 of 2 budgets. "
        "On or below the static control at 0 of 2 budgets with both."
    )
    with pytest.raises(SystemExit):
        frontier.parse(["--budgets", "0.5,-1"])


# TeaCache's polynomial per model (--cache-coefficients) ----------------------------------------------
@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """A tiny DiT with random weights and a DyDiT of it with routers set to half the width (other
    trajectories), as exports."""
    import torch

    from dydit.models.calibrate import calibrate_routers
    from dydit.models.dit import DiT
    from dydit.models.dydit import DyDiT
    from dydit.presets import ModelConfig
    from dydit.train.state import export_weights

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("frontier-models")
    mc = ModelConfig(depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=1,
                     num_classes=4)  # fmt: skip
    dense = DiT(mc).eval()
    with torch.no_grad():  # not the zero-initialised output layers: the trajectories move
        for p in dense.parameters():
            p.normal_(0, 0.1)
    dydit = DyDiT.from_dit(dense)
    calibrate_routers(dydit, heads=0.5, groups=0.5, tokens=0.75)
    paths = folder / "dit.safetensors", folder / "dydit.safetensors"
    for path, model in zip(paths, (dense, dydit)):
        export_weights(path, model, {"model": model.config.to_dict()})
    return paths


@pytest.fixture
def cache_run(frontier, two_models, tmp_path, monkeypatch):
    """``run(*options)``: frontier.main on the two models with a stand-in for the (slow, FID-scoring)
    measurement; returns (points by label, calibrations made in this call)."""
    from dydit.apps.demo import ModelResult

    def measured(name, fn, cfg, npz):
        used[name] = getattr(fn, "settings", None)  # a step cache's method, threshold and polynomial
        return ModelResult(name, 0.01, 10**6 * cfg.steps, 10**6 * cfg.steps, cfg.steps, 1, {"FID": 100.0})

    fits, used = [], {}
    real_fit = frontier.calibrate_teacache

    def counted(*args, **kwargs):
        fits.append(kwargs["label"])
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(frontier, "measure", measured)
    monkeypatch.setattr(frontier, "calibrate_teacache", counted)
    dense, dydit = two_models
    out = tmp_path / "run"

    def run(*options: str) -> tuple[dict, list[str]]:
        fits.clear()
        frontier.main([
            "--base", str(dense), "--checkpoint", f"dy={dydit}", "--lambdas", "", "--no-control",
            "--dense-steps", "2", "--dydit-steps", "2", "--cache-steps", "4,5", "--num-samples", "2",
            "--sampler", "dpm++2m", "--cache-calibration-samples", "2", "--out-dir", str(out), *options,
        ])  # fmt: skip
        points = json.loads((out / "frontier.json").read_text())["points"]
        return {(p["label"], p["steps"]): p for p in points}, list(fits)

    run.out, run.used = out, used
    return run


DENSE, TEA, FB = "DiT (dense)", "teacache:0.1", "fbcache:0.1"


def test_auto_fits_each_model_on_its_own_trajectories_once(frontier, cache_run):
    from dydit.checkpoint.files import file_sha256
    from dydit.models.cache import load_coefficients

    points, fits = cache_run("--caches", f"{TEA},{FB}")
    assert sorted(fits) == [DENSE, "dy"]  # one fit per model, none for fbcache
    files = {DENSE: cache_run.out / "teacache-DiT__dense.json", "dy": cache_run.out / "teacache-dy.json"}
    coeffs = {label: load_coefficients(path) for label, path in files.items()}
    assert coeffs[DENSE] != coeffs["dy"]  # a DyDiT's trajectories are not the dense DiT's
    for label, path in files.items():
        stored = json.loads(path.read_text())
        assert [s["steps"] for s in stored["sampling"]] == [4, 5] and stored["num_samples"] == 2
        assert stored["label"] == label and stored["pairs"] == 3 + 4  # one batch per run: steps - 1
        for n in (4, 5):
            p = points[f"{label} + {TEA}", n]
            assert p["cache_coefficients"] == str(path) and p["cache_polynomial"] == list(coeffs[label])
            assert p["cache_coefficients_sha256"] == file_sha256(path)
            assert "cache_coefficients" not in points[f"{label} + {FB}", n]  # fbcache reads none
    table = (cache_run.out / "frontier.md").read_text()
    assert f"- {DENSE} + {TEA}: `{files[DENSE]}` (sha256 {file_sha256(files[DENSE])[:12]})" in table

    # A rerun fits nothing: the points are there; measured again, they reuse the stored fits.
    store = cache_run.out / "frontier.json"
    assert cache_run("--caches", f"{TEA},{FB}")[1] == []
    result = json.loads(store.read_text())
    result["points"] = [p for p in result["points"] if p.get("cache") != TEA]
    store.write_text(json.dumps(result))
    again, fits = cache_run("--caches", f"{TEA},{FB}")
    assert fits == [] and again[f"dy + {TEA}", 4]["cache_polynomial"] == list(coeffs["dy"])
    # A stored fit of other settings is neither reused nor overwritten.
    store.write_text(json.dumps(result))
    with pytest.raises(DyditError, match="other settings .*num_samples"):
        cache_run("--caches", TEA, "--cache-calibration-samples", "3")
    assert load_coefficients(files["dy"]) == coeffs["dy"]


def test_fbcache_alone_fits_nothing(cache_run):
    points, fits = cache_run("--caches", FB)
    assert fits == [] and not list(cache_run.out.glob("teacache-*.json"))
    assert (
        points[f"dy + {FB}", 4]["evaluations_computed"] >= 0
        and "cache_polynomial" not in points[f"dy + {FB}", 4]
    )
    with pytest.raises(DyditError, match="teacache caches only"):
        cache_run("--caches", FB, "--cache-coefficients", "auto")


def test_given_files_serve_every_model_or_one(cache_run, tmp_path):
    from dydit.models.cache import save_coefficients

    one, two = tmp_path / "one.json", tmp_path / "two.json"
    save_coefficients(one, [0.5, 0.0])
    save_coefficients(two, [2.0, 0.01])
    points, fits = cache_run("--caches", TEA, "--cache-coefficients", str(one))
    assert fits == []
    for label in (DENSE, "dy"):
        p = points[f"{label} + {TEA}", 5]
        assert p["cache_coefficients"] == str(one) and p["cache_polynomial"] == [0.5, 0.0]
        assert cache_run.used[f"{label} + {TEA}"].coefficients == (0.5, 0.0)  # what the cache ran with
    # LABEL=FILE for one model; the other the default (auto: fitted).
    (cache_run.out / "frontier.json").unlink()
    points, fits = cache_run("--caches", TEA, "--cache-coefficients", f"dy={two}")
    assert fits == [DENSE]
    assert points[f"dy + {TEA}", 4]["cache_polynomial"] == [2.0, 0.01]
    assert cache_run.used[f"dy + {TEA}"].coefficients == (2.0, 0.01)
    assert points[f"{DENSE} + {TEA}", 4]["cache_coefficients"].endswith("teacache-DiT__dense.json")


def test_bad_coefficient_options_are_one_line_errors(cache_run, tmp_path):
    from dydit.models.cache import save_coefficients

    good = tmp_path / "good.json"
    save_coefficients(good, [1.0, 0.0])
    (tmp_path / "bad.json").write_text("{}")
    cases = {
        f"nobody={good}": "no model 'nobody' in this run",
        f"dy={tmp_path / 'missing.json'}": "no such file",
        str(tmp_path / "missing.json"): "no such file",
        str(tmp_path / "bad.json"): "coefficients",
    }
    for value, message in cases.items():
        with pytest.raises(DyditError, match=message) as e:
            cache_run("--caches", TEA, "--cache-coefficients", value)
        assert "\n" not in str(e.value)
    with pytest.raises(DyditError, match="one default"):
        cache_run("--caches", TEA, "--cache-coefficients", "auto", "--cache-coefficients", str(good))
    assert not (cache_run.out / "frontier.json").exists()  # nothing measured before the check


def test_seed_sets_every_points_seeds_and_one_directory_holds_one_seed(frontier, cache_run, monkeypatch):
    """--seed reaches every measured point (the FID spread is one run directory per seed set); a
    directory measured with another seed is refused, since stored points are matched without it."""
    from dydit.errors import DyditError

    seeds, measured = [], frontier.measure
    monkeypatch.setattr(
        frontier,
        "measure",
        lambda name, fn, cfg, npz: (seeds.append(cfg.seed), measured(name, fn, cfg, npz))[1],
    )
    points, _ = cache_run("--seed", "2")
    assert seeds and set(seeds) == {2} and len(points) == 2
    assert json.loads((cache_run.out / "frontier.json").read_text())["seed"] == 2
    with pytest.raises(DyditError, match="seed 2, not 0"):
        cache_run()


def test_a_stored_teacache_point_of_another_polynomial_is_refused(cache_run, tmp_path):
    """Rerunning a directory with other --cache-coefficients does not pass its old points off as new."""
    from dydit.models.cache import save_coefficients

    one, two = tmp_path / "one.json", tmp_path / "two.json"
    save_coefficients(one, [0.5, 0.0])
    save_coefficients(two, [2.0, 0.01])
    cache_run("--caches", TEA, "--cache-coefficients", str(one))
    cache_run("--caches", TEA, "--cache-coefficients", str(one))  # the same file: nothing to redo
    with pytest.raises(DyditError, match=r"measured with the TeaCache polynomial of .*one\.json") as e:
        cache_run("--caches", TEA, "--cache-coefficients", str(two))
    assert "\n" not in str(e.value)


def stored_points(folder) -> dict:
    return {(p["label"], p["steps"]): p for p in json.loads((folder / "frontier.json").read_text())["points"]}


def test_include_adds_another_runs_points_without_sampling_them(frontier, cache_run, tmp_path, monkeypatch):
    points, _ = cache_run("--caches", FB)
    first = cache_run.out / "frontier.json"
    other = tmp_path / "other"
    calls, measured = [], frontier.measure

    def counted(name, fn, cfg, npz):
        calls.append((name, cfg.steps))
        return measured(name, fn, cfg, npz)

    monkeypatch.setattr(frontier, "measure", counted)
    # Same options into another directory, the first run included: only the new step count is sampled.
    cache_run("--caches", FB, "--dense-steps", "2,3", "--out-dir", str(other), "--include", str(first))
    assert calls == [(DENSE, 3)]
    merged = stored_points(other)
    assert set(merged) == set(points) | {(DENSE, 3)}
    assert merged[DENSE, 2]["included_from"] == str(first) and "included_from" not in merged[DENSE, 3]
    assert merged[f"dy + {FB}", 4]["FID"] == points[f"dy + {FB}", 4]["FID"]
    # Points already in the run win; a chain keeps the first source.
    third = tmp_path / "third"
    cache_run("--caches", FB, "--out-dir", str(third), "--include", str(other / "frontier.json"))
    chained = stored_points(third)
    assert chained[DENSE, 2]["included_from"] == str(first)
    assert chained[DENSE, 3]["included_from"] == str(other / "frontier.json")

    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    cases = {
        str(tmp_path / "missing.json"): "no such file",
        str(bad): "not a frontier.json",
    }
    for value, message in cases.items():
        with pytest.raises(DyditError, match=message):
            cache_run("--include", value, "--out-dir", str(tmp_path / "x"))
    with pytest.raises(DyditError, match="seed 0, not 3"):
        cache_run("--include", str(first), "--seed", "3", "--out-dir", str(tmp_path / "y"))
    with pytest.raises(DyditError, match="--render draws one file"):
        frontier.main(["--render", str(first), "--include", str(first)])


def test_a_stored_point_of_another_recipe_is_refused(frontier, cache_run, two_models, monkeypatch):
    """A λ point is the fine-tune of its recipe: a rerun whose recipe differs under the same label
    stops, and the shipped recipe's points are named by the recipe, not by being shipped."""
    from dydit.apps.demo import SHIPPED_RECIPE

    tunes = []

    def finetune(cfg, base, out, dynamic=True):  # a stand-in: the fixture's DyDiT is "the fine-tune"
        tunes.append(cfg.finetune_steps)
        return two_models[1]

    monkeypatch.setattr(frontier, "finetune", finetune)
    points, _ = cache_run("--lambdas", "0.5")
    name = f"DyDiT λ=0.5 ({SHIPPED_RECIPE['finetune_steps']}-step recipe)"
    assert points[name, 2]["recipe"] == SHIPPED_RECIPE and tunes == [SHIPPED_RECIPE["finetune_steps"]]
    cache_run("--lambdas", "0.5")  # the same recipe: its point is kept, not sampled again
    store = cache_run.out / "frontier.json"
    result = json.loads(store.read_text())
    for p in result["points"]:
        if p["label"] == name:
            p["recipe"] = {**SHIPPED_RECIPE, "finetune_steps": 1}
    store.write_text(json.dumps(result))
    with pytest.raises(DyditError, match=r"fine-tuned with the recipe .*\"finetune_steps\": 1,") as e:
        cache_run("--lambdas", "0.5")
    assert "\n" not in str(e.value)
