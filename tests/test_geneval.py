"""The GenEval-style scorer (docs/METHOD.md §17.4, §17.5).

Fast tests use an oracle classifier that knows the Fashion-MNIST images used (so every error is the
scorer's own); the slow test runs the project's classifier on real compositions of held-out prompts
(at least 0.9 overall) and on noise (near zero)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dydit.cli import main
from dydit.data import compose as C
from dydit.data import compose_grammar as G
from dydit.errors import DyditError
from dydit.evaluate import classifier as clf
from dydit.evaluate import geneval as GE

FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


@pytest.fixture(scope="module")
def pool() -> tuple[np.ndarray, np.ndarray]:
    if not FMNIST.exists():
        pytest.skip("Fashion-MNIST not installed (sudo apt-get install dataset-fashion-mnist)")
    images, labels = C.load_item_pool(split="test")
    return images[:2000], labels[:2000]


class Oracle:
    """Stands in for the classifier: knows the label of every image of ``pool`` (a grey 32x32 cell,
    cropped to 28x28 as the classifier does); anything else gets uniform probabilities."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.known = {im.tobytes(): int(y) for im, y in zip(images, labels)}
        self.project = torch.randn(28 * 28, 128, generator=torch.Generator().manual_seed(0))

    def __call__(self, cells: torch.Tensor) -> dict[str, torch.Tensor]:
        crops = cells[:, 2:30, 2:30, 0].numpy()
        logits = torch.zeros(len(crops), 10)
        for k, crop in enumerate(crops):
            label = self.known.get(crop.tobytes())
            if label is not None:
                logits[k, label] = 20.0
        return {"logits": logits, "pool": torch.from_numpy(crops).flatten(1).float() @ self.project}


def test_oracle_reads_every_cell_and_scores_real_compositions_perfectly(pool) -> None:
    prompts = G.evaluation_prompts("held-out", per_category=6) + G.evaluation_prompts("train", per_category=6)
    images, layouts = C.real_compositions(prompts, *pool, seed=1)
    readout = GE.read_cells(images, Oracle(*pool))
    for k, layout in enumerate(layouts):
        cells = {p.cell: p for p in layout.placements}
        assert readout.occupied[k].tolist() == [c in cells for c in range(4)]
        for c, p in cells.items():
            assert readout.item[k, c] == p.item and readout.colour[k, c] == p.colour
    report = GE.score(prompts, readout)
    assert report.overall == 1.0 and set(report.accuracy) == set(G.CATEGORIES) and not report.failures
    assert sum(report.total.values()) == len(prompts)


def test_requirements_fail_one_by_one(pool) -> None:
    oracle = Oracle(*pool)
    bag, coat = G.ITEMS.index("bag"), G.ITEMS.index("coat")
    red, blue = G.COLOURS.index("red"), G.COLOURS.index("blue")
    i_bag, i_coat = (int(np.flatnonzero(pool[1] == c)[0]) for c in (bag, coat))

    def read(*placements: tuple[int, int, int, int]):
        layout = C.Layout(
            tuple(C.Placement(cell, item, colour, image) for cell, item, colour, image in placements)
        )
        r = GE.read_cells(C.render(layout, pool[0])[None], oracle)
        return r.occupied[0], r.probs[0], r.colour[0]

    def check(text: str, *placements: tuple[int, int, int, int]) -> str | None:
        return GE.check_prompt(G.parse_caption(text), *read(*placements))

    assert check("a red bag left of a blue coat", (0, bag, red, i_bag), (1, coat, blue, i_coat)) is None
    assert check("a red bag left of a blue coat", (1, bag, red, i_bag), (0, coat, blue, i_coat)) == "position"
    assert check("a red bag left of a blue coat", (0, bag, blue, i_bag), (1, coat, blue, i_coat)) == "colour"
    assert check("a red bag and a blue coat", (3, bag, red, i_bag), (2, coat, blue, i_coat)) is None
    assert check("a bag", (3, bag, 0, i_bag), (2, coat, 0, i_coat)) == "count"  # an item not named
    assert check("a coat", (3, bag, 0, i_bag)) == "object"
    assert check("a bag", (3, bag, blue, i_bag)) is None  # a colour is checked only where named
    assert check("two bags", (0, bag, 0, i_bag), (3, bag, 0, i_bag)) is None
    assert check("three bags", (0, bag, 0, i_bag), (3, bag, 0, i_bag)) == "count"
    assert check("a bag above a coat", (1, bag, 0, i_bag), (2, coat, 0, i_coat)) is None  # diagonal
    assert (
        check(
            "a bag",
        )
        == "count"
    )  # an empty canvas


def test_empty_cells_forgive_a_few_stray_pixels() -> None:
    images = np.zeros((1, 64, 64, 3), np.uint8)
    images[0, 5, 5 : 5 + GE.EMPTY_MAX_BRIGHT] = 255  # cell 0: a few stray bright pixels
    images[0, 40, 40 : 41 + GE.EMPTY_MAX_BRIGHT] = 255  # cell 3: one more than forgiven
    images[0, 10:20, 40:50] = GE.NEAR_BLACK  # cell 1: dark grey, near black
    readout = GE.read_cells(
        images, lambda x: {"logits": torch.zeros(len(x), 10), "pool": torch.zeros(len(x), 128)}
    )
    assert readout.occupied[0].tolist() == [False, False, False, True]


def test_noise_scores_zero_with_the_oracle(pool) -> None:
    prompts = G.evaluation_prompts("held-out", per_category=5)
    noise = np.random.default_rng(0).integers(0, 256, size=(len(prompts), 64, 64, 3), dtype=np.uint8)
    report = GE.score(prompts, GE.read_cells(noise, Oracle(*pool)))
    assert report.overall == 0.0 and report.failures["count"] > 0


def _sample_folder(tmp_path: Path, pool, prompts: list[G.Prompt]) -> Path:
    images, _ = C.real_compositions(prompts, *pool, seed=2)
    folder = GE.write_prompted_folder(tmp_path / "samples", images, prompts)
    assert sorted(p.name for p in folder.iterdir())[:2] == ["000000.png", "000001.png"]
    again, texts = GE.load_prompted_images(folder)
    assert np.array_equal(again, images) and texts == [p.text for p in prompts]
    return folder


def test_cli_scores_a_folder_with_its_prompts(tmp_path, pool, monkeypatch, capsys) -> None:
    monkeypatch.setattr(clf, "load_classifier", lambda *a, **k: Oracle(*pool))
    monkeypatch.setattr(C, "load_item_pool", lambda root=None, split="train": pool)  # FD-cells reference
    prompts = G.evaluation_prompts("held-out", per_category=3)
    folder = _sample_folder(tmp_path, pool, prompts)
    out = tmp_path / "geneval.json"
    assert main(["evaluate", str(folder), "--geneval", "--json", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "overall" in text and "color_attr" in text and "FD-cells" in text
    result = json.loads(out.read_text())
    assert result["overall"] == 1.0 and set(result["accuracy"]) == set(G.CATEGORIES)
    assert np.isfinite(result["metrics"]["FD-cells"]) and result["metrics"]["FD-cells"] >= 0
    # the same prompts in another file, one image short: refused with a one-line error
    (folder / "000000.png").unlink()
    assert main(["evaluate", str(folder), "--geneval"]) == 1
    assert f"holds {len(prompts) - 1} images but" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_text("a bag\na pink bag\n")
    assert main(["evaluate", str(folder), "--geneval", "--prompts", str(bad)]) == 1
    assert "line 2: unknown word(s) 'pink'" in capsys.readouterr().err
    assert main(["evaluate", str(folder)]) == 1
    assert "--ref" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    assert "prompts.txt" in capsys.readouterr().out


def test_wrong_image_size_is_refused() -> None:
    with pytest.raises(DyditError, match="64x64 RGB"):
        GE.cut_cells(np.zeros((1, 32, 32, 3), np.uint8))


@pytest.mark.slow
def test_project_classifier_scores_real_held_out_compositions_above_0_9_and_noise_near_zero() -> None:
    if not FMNIST.exists():
        pytest.skip("Fashion-MNIST not installed")
    from dydit.evaluate.extract import default_cache_dir

    net = clf.load_classifier(default_cache_dir(), progress=False)  # trained once, cached
    prompts = [p for p in G.evaluation_prompts("held-out", per_category=40) for _ in range(4)]
    images, _ = C.real_compositions(prompts, *C.load_item_pool(split="test"), seed=0)
    report = GE.score(prompts, GE.read_cells(images, net))
    print("\n" + report.format())
    assert report.overall >= 0.9
    assert min(report.accuracy.values()) >= 0.8
    rng = np.random.default_rng(0)
    uniform = rng.integers(0, 256, size=images.shape, dtype=np.uint8)
    gauss = ((np.clip(rng.standard_normal(images.shape), -1, 1) + 1) * 127.5).astype(np.uint8)
    for noise in (uniform, gauss):
        assert GE.score(prompts, GE.read_cells(noise, net)).overall <= 0.05
    # each real composition against another prompt of its category: the scorer tells them apart
    others = [
        next(q for q in prompts[k + 1 :] + prompts if q.category == p.category and q != p)
        for k, p in enumerate(prompts)
    ]
    assert GE.score(others, GE.read_cells(images, net)).overall <= 0.05
