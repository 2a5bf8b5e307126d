"""Fréchet distance, streaming statistics and ADM .npz handling (tiny random features, no Inception)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from dydit.errors import DyditError
from dydit.evaluate import extract, frechet_distance, open_image_set, save_stats, write_npz
from dydit.evaluate.features import FeatureNet
from dydit.evaluate.fid import GaussianStats, RunningGaussian, trace_sqrt_product
from dydit.evaluate.images import ArraySource


class RandomNet(FeatureNet):
    """A fixed random projection of 4x4-average-pooled grey images: a stand-in for Inception."""

    outputs = frozenset({"pool"})

    def __init__(self, dim: int = 6, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(16, dim, generator=g, dtype=torch.float64)
        self.name = f"random-{dim}-{seed}"

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).double().mean(1, keepdim=True) / 255.0
        x = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)  # (B, 16)
        return {"pool": torch.tanh(x @ self.weight)}


def blobs(n: int = 64, size: int = 16, seed: int = 0) -> np.ndarray:
    """Smooth random grey images, uint8 (n, size, size, 1)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    cx, cy, r = rng.uniform(0.2, 0.8, (3, n, 1, 1))
    img = 255 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.05 + 0.1 * r))
    return img[..., None].astype(np.uint8)


def random_cov(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, 2 * d))
    return a @ a.T / (2 * d)


def test_fid_of_a_set_against_itself_is_zero() -> None:
    feats = np.random.default_rng(0).normal(size=(200, 8))
    s = GaussianStats.from_features(feats)
    assert frechet_distance(s, s) == pytest.approx(0.0, abs=1e-8)


def test_fid_grows_with_noise() -> None:
    images = blobs()
    net = RandomNet()
    clean = extract(ArraySource(images), [net], progress=False)[0].stats["pool"]
    rng = np.random.default_rng(1)
    fids = []
    for sigma in (0, 10, 40, 120):
        noisy = np.clip(images + rng.normal(0, sigma, images.shape), 0, 255).astype(np.uint8)
        stats = extract(ArraySource(noisy), [net], batch_size=7, progress=False)[0].stats["pool"]
        fids.append(frechet_distance(stats, clean))
    assert fids[0] == pytest.approx(0.0, abs=1e-9)
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_streaming_stats_equal_numpy() -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(103, 5)) * 3 + 1e4  # a large common offset tests the centring
    running = RunningGaussian()
    for chunk in np.array_split(feats, [1, 10, 50]):  # uneven batches, one of size 1
        running.update(torch.from_numpy(chunk))
    s = running.finalize()
    assert s.count == 103
    np.testing.assert_allclose(s.mu, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.sigma, np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-9)


def test_sqrtm_trace_agrees_with_eigendecomposition() -> None:
    rng = np.random.default_rng(0)
    s1, s2 = random_cov(rng, 12), random_cov(rng, 12)
    # tr((S1 S2)^1/2) = Σ sqrt(eig(S1^1/2 S2 S1^1/2)), a symmetric PSD matrix.
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(w)) @ v.T
    expected = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    assert trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-8)
    # And the full distance against the closed form for diagonal covariances.
    a = GaussianStats(np.zeros(3), np.diag([1.0, 4.0, 9.0]), 10)
    b = GaussianStats(np.ones(3), np.diag([4.0, 4.0, 1.0]), 10)
    assert frechet_distance(a, b) == pytest.approx(3 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2)


def test_singular_covariances_are_handled() -> None:
    rng = np.random.default_rng(0)
    few = rng.normal(size=(4, 10))  # 4 points in 10-d: rank-3 covariance
    s = GaussianStats.from_features(few)
    with np.errstate(all="ignore"):
        value = frechet_distance(s, GaussianStats.from_features(rng.normal(size=(5, 10))))
    assert np.isfinite(value) and value > 0
    assert scipy.linalg.sqrtm(s.sigma @ s.sigma).shape == (10, 10)


def test_too_few_samples_and_mismatched_dims_are_user_errors() -> None:
    with pytest.raises(DyditError, match="at least 2"):
        GaussianStats.from_features(np.zeros((1, 4)))
    a = GaussianStats.from_features(np.random.default_rng(0).normal(size=(10, 3)))
    b = GaussianStats.from_features(np.random.default_rng(1).normal(size=(10, 4)))
    with pytest.raises(DyditError, match="different feature networks"):
        frechet_distance(a, b)


@pytest.mark.parametrize("compressed", [False, True])
def test_adm_npz_round_trip(tmp_path, compressed: bool) -> None:
    images, labels = blobs(23), np.arange(23) % 5
    stats = GaussianStats.from_features(np.random.default_rng(0).normal(size=(30, 4)))
    path = tmp_path / "batch.npz"
    if compressed:
        np.savez_compressed(path, arr_0=images, arr_1=labels, mu=stats.mu, sigma=stats.sigma)
    else:
        write_npz(path, images, labels, mu=stats.mu, sigma=stats.sigma)
    loaded = open_image_set(path)
    assert len(loaded.images) == 23 and loaded.images.shape == (16, 16, 1)
    np.testing.assert_array_equal(np.concatenate(list(loaded.images.batches(5))), images)
    np.testing.assert_array_equal(loaded.images.labels, labels)
    np.testing.assert_array_equal(loaded.stats["mu"], stats.mu)
    np.testing.assert_array_equal(loaded.stats["sigma"], stats.sigma)
    limited = open_image_set(path, limit=7).images
    np.testing.assert_array_equal(np.concatenate(list(limited.batches(4))), images[:7])
    assert limited.labels.tolist() == labels[:7].tolist()


def test_saved_statistics_reproduce_the_distance(tmp_path) -> None:
    net = RandomNet()
    got = extract(ArraySource(blobs()), [net], progress=False)[0].stats
    save_stats(tmp_path / "ref.npz", got)
    ref = open_image_set(tmp_path / "ref.npz")
    assert ref.images is None
    again = GaussianStats(ref.stats["mu"], ref.stats["sigma"], 0)
    assert frechet_distance(got["pool"], again) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"arr_0": np.zeros((2, 8, 8, 3), np.float32)}, "must be uint8 images"),
        ({"arr_0": np.zeros((2, 8, 8), np.uint8)}, "must be uint8 images"),
        ({"arr_0": np.zeros((2, 8, 8, 4), np.uint8)}, "must be uint8 images"),
        ({"images": np.zeros((2, 8, 8, 3), np.uint8)}, "wrong .npz layout"),
        ({"mu": np.zeros(3)}, "must come together"),
        ({"mu": np.zeros(3), "sigma": np.zeros((3, 2))}, "must be \\(D,\\) and \\(D, D\\)"),
        ({"arr_0": np.zeros((2, 8, 8, 3), np.uint8), "arr_1": np.zeros(3)}, "one label per image"),
    ],
)
def test_wrong_npz_layout_is_a_clear_error(tmp_path, arrays: dict, needle: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DyditError, match=needle):
        open_image_set(path)


def test_folder_of_images_and_mixed_sizes(tmp_path) -> None:
    from PIL import Image

    images = blobs(5)
    for i, img in enumerate(images):
        Image.fromarray(img[..., 0]).save(tmp_path / f"{i:03d}.png")
    src = open_image_set(tmp_path).images
    assert src.shape == (16, 16, 1)
    np.testing.assert_array_equal(np.concatenate(list(src.batches(2))), images)
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(tmp_path / "odd.png")
    with pytest.raises(DyditError, match="mixed sizes.*16x16.*16x12"):
        open_image_set(tmp_path)


def test_folder_images_are_decoded_faithfully(tmp_path) -> None:
    # 16-bit grey was clipped to white and transparency dropped by PIL's convert (issue 22).
    from PIL import Image

    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(ramp.astype(np.int32)).convert("I;16").save(tmp_path / "grey16.png")
    Image.fromarray(np.full((8, 8), 40_000, np.int32)).convert("I;16").save(tmp_path / "flat16.png")
    flat, grey = np.concatenate(list(open_image_set(tmp_path).images.batches(2)))[..., 0]  # sorted by name
    np.testing.assert_array_equal(flat, 40_000 * 255 // 65535 + 1)  # 155.6 rounds to 156
    np.testing.assert_allclose(grey, ramp / 257.0, atol=0.51)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128  # half-transparent red over black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    for p in ("grey16.png", "flat16.png"):
        (tmp_path / p).unlink()
    (pixels,) = list(open_image_set(tmp_path).images.batches(1))
    assert pixels.shape == (1, 8, 8, 3) and (pixels[..., 0] == 100).all() and (pixels[..., 1:] == 0).all()


def test_missing_and_unsupported_paths(tmp_path) -> None:
    with pytest.raises(DyditError, match="no such file or folder"):
        open_image_set(tmp_path / "nope.npz")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DyditError, match="unsupported file type"):
        open_image_set(tmp_path / "x.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DyditError, match="no image files"):
        open_image_set(tmp_path / "empty")
