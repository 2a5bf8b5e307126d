"""Inception Score, k-NN precision/recall, Inception preprocessing and the Fashion-MNIST classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dydit.errors import DyditError
from dydit.evaluate import classifier as clf
from dydit.evaluate.features import inception_input, resize_bilinear_tf1, to_rgb_float
from dydit.evaluate.metrics import inception_score, knn_radii, label_accuracy, precision_recall


def test_inception_score_extremes() -> None:
    k = 5
    confident_and_diverse = np.eye(k)[np.arange(100) % k]
    assert inception_score(confident_and_diverse) == pytest.approx(k)
    collapsed = np.tile(np.eye(k)[0], (100, 1))
    assert inception_score(collapsed) == pytest.approx(1.0)
    uncertain = np.full((100, k), 1 / k)
    assert inception_score(uncertain) == pytest.approx(1.0)
    # Splits: two halves with different single classes each score 1, whereas together they score 2.
    two = np.eye(2)[np.repeat([0, 1], 50)]
    assert inception_score(two, split_size=50) == pytest.approx(1.0)
    assert inception_score(two) == pytest.approx(2.0)


def _brute_force_pr(ref: np.ndarray, gen: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def inside(q, s, r):
        return (((q[:, None] - s[None]) ** 2).sum(-1) <= r[None]).any(1).mean()

    return inside(gen, ref, radii(ref)), inside(ref, gen, radii(gen))


def test_precision_recall_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(70, 4))
    gen = rng.normal(size=(50, 4)) * 1.5 + 0.5
    expected = _brute_force_pr(ref, gen, 3)
    got = precision_recall(ref, gen)
    assert got == pytest.approx(expected)
    # Small row blocks give the same radii as one block.
    feats = torch.from_numpy(ref).float()
    torch.testing.assert_close(knn_radii(feats, 3, block=8), knn_radii(feats, 3))


def test_precision_recall_extremes_and_errors() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 3))
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)
    with pytest.raises(DyditError, match="more than 3 images"):
        precision_recall(x, x[:3])
    with pytest.raises(DyditError, match=r"\(N, D\)"):
        precision_recall(x, x[:, :2])


def test_label_accuracy() -> None:
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    assert label_accuracy(logits, np.array([0, 1, 1])) == pytest.approx(2 / 3)


def test_tf1_bilinear_resize() -> None:
    x = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4)  # columns 0, 1, 2, 3
    y = resize_bilinear_tf1(x, 8)
    # Output i samples input i·4/8 = i/2; the last one clamps at the border (no half-pixel shift).
    assert y[0, 0, 0].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.0]
    assert torch.equal(resize_bilinear_tf1(x, 4), x)
    const = torch.full((2, 3, 5, 7), 17.0)
    torch.testing.assert_close(resize_bilinear_tf1(const, 11), torch.full((2, 3, 11, 11), 17.0))


def test_inception_input_replicates_grey_and_scales() -> None:
    grey = torch.tensor([[0, 128], [255, 64]], dtype=torch.uint8).view(1, 2, 2, 1)
    rgb = to_rgb_float(grey)
    assert rgb.shape == (1, 3, 2, 2) and torch.equal(rgb[:, 0], rgb[:, 2])
    x = inception_input(grey)
    assert x.shape == (1, 3, 299, 299)
    assert x.min().item() == pytest.approx(-1.0) and x.max().item() == pytest.approx(127 / 128)
    with pytest.raises(DyditError, match="uint8"):
        to_rgb_float(torch.zeros(1, 2, 2, 1))


def test_classifier_input_crops_padding_and_resizes() -> None:
    padded = torch.zeros(2, 32, 32, 1, dtype=torch.uint8)
    padded[:, 2:30, 2:30] = 255
    x = clf.to_classifier_input(padded)
    assert x.shape == (2, 1, 28, 28) and torch.all(x == 1.0)  # the black border is cropped off
    assert clf.to_classifier_input(torch.zeros(1, 64, 64, 3, dtype=torch.uint8)).shape == (1, 1, 28, 28)


@pytest.mark.skipif(
    not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed (sudo apt-get install dataset-fashion-mnist)",
)
def test_classifier_trains_caches_and_reports(tmp_path, monkeypatch) -> None:
    calls = []
    real = clf.train_classifier

    def quick(progress: bool = True):
        calls.append(1)
        return real(epochs=1, progress=False, max_images=3000)

    monkeypatch.setattr(clf, "train_classifier", quick)
    net = clf.load_classifier(tmp_path, progress=False)
    assert calls == [1] and clf.classifier_path(tmp_path).is_file()
    again = clf.load_classifier(tmp_path, progress=False)  # from the cache, no retraining
    assert calls == [1] and again.name == net.name
    from dydit.evaluate.images import dataset_images

    test = dataset_images("fashion-mnist-test", limit=500)
    pred = clf.predict(net, test.images)
    assert (pred == test.labels).mean() > 0.6  # far above chance (0.1) after 3000 images
    out = net(torch.from_numpy(test.images[:4]))
    assert out["pool"].shape == (4, clf.FEATURE_DIM) and out["logits"].shape == (4, clf.NUM_CLASSES)
