"""benchmarks/t2i_frontier.py: the text-to-image equal-compute frontier (docs/METHOD.md §17, §19), run
in-process on untrained tiny models (the wiring, resumability and the verdicts; scores mean nothing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_benchmark

from dydit.data.compose_grammar import CATEGORIES
from dydit.errors import DyditError
from dydit.evaluate import classifier as clf

FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(
    not FMNIST.exists(), reason="Debian's dataset-fashion-mnist is not installed"
)
DYDIT = "DyDiT λ=0.5"
SPLITS = ("train", "held-out")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("t2i_frontier")


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> tuple[Path, Path]:
    """An untrained FLUX-t2i-tiny and a DyDiT of it with random routers, as safetensors exports."""
    from dydit.apps.demo_t2i import random_routers, untrained_t2i
    from dydit.models.dydit import DyDiT
    from dydit.train.state import export_weights

    folder = tmp_path_factory.mktemp("t2i-models")
    dense = untrained_t2i(0)
    dydit = random_routers(DyDiT.from_dit(dense), 0).eval()
    paths = folder / "flux.safetensors", folder / "dyflux.safetensors"
    for path, model in zip(paths, (dense, dydit)):
        export_weights(path, model, {"model": model.config.to_dict()})
    return paths


class _UniformClassifier:
    """Stands in for the project's classifier (trained once, slow): the wiring is what is tested."""

    def __call__(self, x):
        return {"logits": torch.zeros(len(x), 10), "pool": torch.randn(len(x), 128)}


@needs_fmnist
def test_frontier_measures_each_point_once_and_renders(bench, exports, tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(clf, "load_classifier", lambda *a, **k: _UniformClassifier())
    dense_path, dydit_path = exports
    out = tmp_path / "frontier"
    argv = [
        "--base", str(dense_path), "--checkpoint", f"{DYDIT}={dydit_path}", "--dense-steps", "1,2,4",
        "--dydit-steps", "2", "--caches", "fbcache:0.1", "--cache-steps", "4", "--per-category", "1",
        "--no-inception", "--no-progress", "--out-dir", str(out),
    ]  # fmt: skip
    bench.main(argv)
    result = json.loads((out / "frontier.json").read_text())
    points = result["points"]
    dense, cached = "FLUX (dense)", "FLUX (dense) + fbcache:0.1"
    expected = {
        *((dense, "dense", s, n) for s in SPLITS for n in (1, 2, 4)),
        *((cached, "dense+cache", s, 4) for s in SPLITS),
        *((DYDIT, "dydit", s, 2) for s in SPLITS),
        *((f"{DYDIT} + fbcache:0.1", "dydit+cache", s, 4) for s in SPLITS),
    }
    assert {(p["label"], p["kind"], p["split"], p["steps"]) for p in points} == expected
    assert len(points) == len(expected)
    at = {(p["label"], p["split"], p["steps"]): p for p in points}
    for split in SPLITS:
        macs = {n: at[dense, split, n]["macs_per_image"] for n in (1, 2, 4)}
        assert macs[1] > 0  # one Euler step, both guidance passes: the layers' MACs per image
        assert macs[2] == pytest.approx(2 * macs[1], rel=1e-9)
        assert macs[4] == pytest.approx(4 * macs[1], rel=1e-9)
        dy = at[DYDIT, split, 2]
        assert 0 < dy["macs_per_image"] < macs[2]  # the sliced engine skips what the routers switch off
        for label in (cached, f"{DYDIT} + fbcache:0.1"):
            p = at[label, split, 4]
            assert p["evaluations_computed"] + p["evaluations_reused"] == 4  # one batch, one run
            assert p["evaluations_computed"] >= 2  # the first and the last are always computed
            assert p["macs_per_image"] <= macs[4] * (1 + 1e-9)
        assert at[f"{DYDIT} + fbcache:0.1", split, 4]["macs_per_image"] < macs[4]
    for p in points:
        assert p["prompts"] == len(CATEGORIES) and set(p["accuracy"]) == set(CATEGORIES)
        assert 0 <= p["overall"] <= 1 and "FID" not in p and p["seconds_per_image"] > 0
        assert (out / "samples" / p["split"]).is_dir()
    assert result["settings"]["sampler"] == "euler" and result["commands"][0].endswith(str(out))

    table = (out / "frontier.md").read_text()
    assert "## held-in prompts (`train`)" in table and "## held-out prompts (`held-out`)" in table
    assert f"| {DYDIT} | dydit | 2 |" in table
    assert (out / "frontier_geneval.png").stat().st_size > 1000 and not (out / "frontier_fid.png").exists()

    def no_sampling(*a, **k):
        raise AssertionError("a point already in frontier.json was measured again")

    monkeypatch.setattr(bench, "sample_prompts", no_sampling)
    (out / "frontier.md").unlink()
    bench.main(argv)  # resumes: nothing new to measure, the report is redrawn
    assert json.loads((out / "frontier.json").read_text())["points"] == points
    assert (out / "frontier.md").read_text() == table
    (out / "frontier.md").unlink()
    bench.main(["--render", str(out / "frontier.json")])
    assert (out / "frontier.md").is_file()

    fids = []  # a later run with Inception adds the FID of every point from its saved samples

    def fake_fid(images, real, work, cfg):
        assert real.name in ("real_train.npz", "real_held-out.npz") and real.is_file()
        assert images.shape == (len(CATEGORIES), 64, 64, 3) and work.is_file()
        fids.append(100.0 + len(fids))
        return fids[-1]

    monkeypatch.setattr(bench, "inception_fid", fake_fid)
    bench.main([a for a in argv if a != "--no-inception"])
    again = json.loads((out / "frontier.json").read_text())
    assert len(fids) == len(points) and sorted(p["FID"] for p in again["points"]) == fids
    assert [{k: v for k, v in p.items() if k != "FID"} for p in again["points"]] == points
    assert len(again["commands"]) == 2 and (out / "frontier_fid.png").stat().st_size > 1000
    with pytest.raises(DyditError, match="other settings"):  # another prompt set: another frontier
        bench.main([*argv, "--per-category", "2"])


def _point(kind: str, steps: int, overall: float, macs_per_step: float, split: str = "train", **kw) -> dict:
    label = {"dense": "FLUX (dense)", "dydit": DYDIT, "dense+cache": "FLUX (dense) + teacache:0.1"}[kind]
    return dict(label=label, kind=kind, split=split, steps=steps, macs_per_image=steps * macs_per_step,
                seconds_per_image=0.01 * steps, overall=overall, accuracy={}, **kw)  # fmt: skip


def test_verdicts_compare_geneval_with_the_dense_curve_of_the_same_prompts(bench, tmp_path):
    dense = [_point("dense", n, o, 1e8) for n, o in ((2, 0.2), (4, 0.5), (8, 0.6))]
    held_out = [_point("dense", n, o, 1e8, "held-out") for n, o in ((2, 0.1), (4, 0.3), (8, 0.4))]
    win = _point("dydit", 8, 0.55, 0.5e8)  # 4 dense steps' worth: 0.5 there
    lose = _point("dydit", 4, 0.3, 0.75e8)  # 3 steps' worth: 0.35 interpolated
    tie = _point("dense+cache", 8, 0.5, 0.5e8)
    out_win = _point("dydit", 8, 0.35, 0.5e8, "held-out")  # held-out curve at 4 steps: 0.3
    points = [*dense, *held_out, win, lose, tie, out_win]
    eq = bench.equal_compute(win, points)
    assert eq["dense_steps"] == 4 and eq["dense_overall"] == 0.5 and eq["verdict"] == "DyDiT wins"
    assert eq["frontier_overall"] == pytest.approx(0.5) and eq["delta_overall"] == pytest.approx(0.05)
    eq = bench.equal_compute(lose, points)
    assert eq["dense_steps"] == 3 and "dense_overall" not in eq
    assert eq["frontier_overall"] == pytest.approx(0.35) and eq["verdict"] == "fewer dense steps win"
    assert bench.equal_compute(tie, points)["verdict"] == "a tie"
    eq = bench.equal_compute(out_win, points)
    assert eq["frontier_overall"] == pytest.approx(0.3) and eq["verdict"] == "DyDiT wins"
    below = bench.equal_compute(_point("dydit", 2, 0.0, 0.5e8), points)  # 1 dense step: not measured
    assert "frontier_overall" not in below and "verdict" not in below

    for p, fid in zip([*dense, win], (90.0, 60.0, 50.0, 70.0)):
        p["FID"] = fid
    result = {"points": points, "machine": "test cpu", "torch": "x", "commands": ["python x.py --y"]}
    bench.render(json.loads(json.dumps(result)), tmp_path)
    table = (tmp_path / "frontier.md").read_text()
    assert "test cpu, torch x" in table and "    python x.py --y" in table
    rows = [line for line in table.splitlines() if line.startswith(f"| {DYDIT} | dydit | 8 |")]
    assert len(rows) == 2 and "DyDiT wins" in rows[0] and "+10.0" in rows[0]  # ΔFID vs 60 at equal MACs
    assert "fewer dense steps win" in table and "| a tie |" in table
    train = table[table.index("## held-in") : table.index("## held-out")]
    assert train.index("| FLUX (dense) | dense | 2 |") < train.index("teacache") < train.index(DYDIT)
    for png in ("frontier_geneval.png", "frontier_fid.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_teacache_auto_fits_each_model_on_its_prompts_once(bench, tmp_path, monkeypatch, one_thread):
    """``--cache-coefficients auto`` (the default with a teacache): one fit per model, on its own
    trajectories, recorded by its points and reused by a rerun (sampling and scoring stubbed)."""
    from dydit.apps.demo_t2i import random_routers, untrained_t2i
    from dydit.models.cache import load_coefficients
    from dydit.models.dydit import DyDiT
    from dydit.train.state import export_weights

    dense = untrained_t2i(0)
    with torch.no_grad():  # not the zero-initialised output layers: the trajectories move
        for p in dense.parameters():
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    dydit = random_routers(DyDiT.from_dit(dense), 0).eval()
    paths = tmp_path / "flux.safetensors", tmp_path / "dyflux.safetensors"
    for path, model in zip(paths, (dense, dydit)):
        export_weights(path, model, {"model": model.config.to_dict()})

    used, fits = set(), []

    def sampled(model, prompts, settings, cfg):
        if hasattr(model, "settings"):  # a step cache: the polynomial it runs with
            used.add(model.settings.coefficients)
        cost = {"seconds": 1.0, "macs_attn_mlp": 1e6, "macs_total": 2e6}
        return np.zeros((len(prompts), 64, 64, 3), np.uint8), cost

    real_fit = bench.calibrate_teacache

    def counted(*args, **kwargs):
        fits.append(kwargs["label"])
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(bench, "sample_prompts", sampled)
    monkeypatch.setattr(bench, "score_images", lambda *a: {"overall": 0.5, "accuracy": {}})
    monkeypatch.setattr(bench, "calibrate_teacache", counted)
    out = tmp_path / "frontier"
    argv = [
        "--base", str(paths[0]), "--checkpoint", f"{DYDIT}={paths[1]}", "--dense-steps", "1",
        "--dydit-steps", "1", "--caches", "teacache:0.1", "--cache-steps", "4,5", "--splits", "train",
        "--per-category", "1", "--cache-calibration-samples", "2", "--no-inception", "--no-progress",
        "--out-dir", str(out),
    ]  # fmt: skip
    bench.main(argv)
    assert sorted(fits) == sorted(["FLUX (dense)", DYDIT])
    points = {
        p["label"]: p for p in json.loads((out / "frontier.json").read_text())["points"] if p.get("cache")
    }
    files = {
        label.removesuffix(" + teacache:0.1"): Path(p["cache_coefficients"]) for label, p in points.items()
    }
    assert {f.name for f in files.values()} == {"teacache-FLUX__dense.json", "teacache-DyDiT_λ_0.5.json"}
    coeffs = {label: load_coefficients(f) for label, f in files.items()}
    assert coeffs["FLUX (dense)"] != coeffs[DYDIT]
    for label, p in points.items():
        assert p["cache_polynomial"] == list(coeffs[label.removesuffix(" + teacache:0.1")])
        assert json.loads(files[label.removesuffix(" + teacache:0.1")].read_text())["prompts"] == "train"
    assert used == set(coeffs.values())
    fits.clear()
    result = json.loads((out / "frontier.json").read_text())
    result["points"] = [p for p in result["points"] if not p.get("cache")]
    (out / "frontier.json").write_text(json.dumps(result))
    bench.main(argv)  # measured again: the stored fits serve
    assert fits == [] and "teacache-FLUX__dense.json" in (out / "frontier.md").read_text()


def test_calibration_prompts_cover_every_category_round_robin(bench):
    """A TeaCache fit on a few images sees every category (the evaluation list is grouped by it)."""
    from dydit.data.compose_grammar import CATEGORIES, parse_caption

    rows = bench.calibration_prompts(per_category=3, seed=0, n=len(CATEGORIES))
    assert [parse_caption(r).category for r in rows] == list(
        dict.fromkeys(parse_caption(r).category for r in rows)
    )
    assert {parse_caption(r).category for r in rows} == set(CATEGORIES)
    many = bench.calibration_prompts(per_category=2, seed=0, n=40)
    assert len(many) == 40 and len(set(many)) <= 2 * len(CATEGORIES) and many[0] == many[len(set(many))]
