"""Datasets and the resumable batch stream (src/dydit/data)."""

from __future__ import annotations

import gzip
import io
import re
import struct

import numpy as np
import pytest
import torch

from dydit.data import ArrayDataset, DataInfo, DataStream, derive_seed, make_dataset
from dydit.data.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist, read_idx
from dydit.data.imagefolder import ImageFolderDataset, center_crop_adm
from dydit.data.latents import LatentDataset, encode_dataset, read_meta
from dydit.errors import DyditError

HAVE_FMNIST = (DEFAULT_ROOT / "train-images-idx3-ubyte.gz").is_file()


pytestmark = pytest.mark.usefixtures("one_thread")


def toy_dataset(n: int = 40, size: int = 4, channels: int = 1, flip: bool = True) -> ArrayDataset:
    """Images whose first pixel is the index, so batches identify their items."""
    x = torch.zeros(n, channels, size, size)
    x[:, :, 0, 0] = torch.arange(n, dtype=torch.float32).view(-1, 1)
    x[:, :, 0, -1] = -1.0  # marks the right edge: a flipped image has it on the left
    info = DataInfo("toy", channels, size, num_classes=5, flip=flip)
    return ArrayDataset(x, torch.arange(n) % 5, info)


# Fashion-MNIST ------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAVE_FMNIST, reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_padded_to_32():
    ds = make_dataset("fashion-mnist")
    assert len(ds) == 60000 and ds.info.num_classes == 10 and ds.info.channels == 1
    x, y = ds.get_batch(torch.arange(64), torch.zeros(64, dtype=torch.bool))
    assert x.shape == (64, 1, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.max() > 0.9
    # Padding: a 2-pixel black border around the 28x28 image.
    assert torch.all(x[:, :, :2, :] == -1) and torch.all(x[:, :, :, -2:] == -1)
    assert set(y.tolist()) <= set(range(10))
    flipped, _ = ds.get_batch(torch.arange(64), torch.ones(64, dtype=torch.bool))
    assert torch.equal(flipped, x.flip(-1))


@pytest.mark.skipif(not HAVE_FMNIST, reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_test_split_and_resize():
    test = load_fashion_mnist(split="test", image_size=32, fit="resize")
    assert len(test) == 10000
    x, _ = test.get(0)
    assert x.shape == (1, 32, 32)
    assert test.info.flip
    native = make_dataset("fashion-mnist-test", image_size=28)
    assert native.get(0)[0].shape == (1, 28, 28)


def test_fashion_mnist_missing_names_the_debian_package(tmp_path):
    with pytest.raises(DyditError, match="apt-get install dataset-fashion-mnist"):
        make_dataset(f"fashion-mnist:{tmp_path}")


def _write_idx(path, magic, dims, payload):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + payload)


def test_idx_reader_validates(tmp_path):
    good = tmp_path / "img.gz"
    _write_idx(good, 0x803, (2, 3, 3), bytes(range(18)))
    assert read_idx(good, 0x803).shape == (2, 3, 3)
    with pytest.raises(DyditError, match="not an idx file"):
        read_idx(good, 0x801)
    short = tmp_path / "short.gz"
    _write_idx(short, 0x803, (2, 3, 3), bytes(5))
    with pytest.raises(DyditError, match="truncated"):
        read_idx(short, 0x803)


def test_fashion_mnist_from_a_custom_directory(tmp_path):
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", 0x803, (3, 28, 28), bytes(3 * 28 * 28))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", 0x801, (3,), bytes([1, 2, 3]))
    ds = make_dataset(f"fashion-mnist:{tmp_path}")
    assert len(ds) == 3 and ds.get(2)[1] == 3 and ds.get(0)[0].shape == (1, 32, 32)


# digits -----------------------------------------------------------------------------------------
def test_digits():
    ds = make_dataset("digits")
    assert len(ds) == 1797 and ds.info.image_size == 8 and not ds.info.flip
    x, y = ds.get(0)
    assert x.shape == (1, 8, 8) and x.min() >= -1 and x.max() <= 1 and y == 0
    big = make_dataset("digits", image_size=12)
    assert big.get(0)[0].shape == (1, 12, 12) and torch.all(big.get(0)[0][:, :2] == -1)


def test_unknown_spec():
    with pytest.raises(DyditError, match="unknown dataset spec"):
        make_dataset("imagenet")


# ImageFolder ------------------------------------------------------------------------------------
def _save(path, size, color):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_adm_center_crop_sizes_and_orientation():
    from PIL import Image

    im = Image.new("RGB", (300, 100), (255, 0, 0))
    im.paste((0, 0, 255), (150, 0, 300, 100))  # right half blue
    out = center_crop_adm(im, 32)
    assert out.size == (32, 32)
    px = out.load()
    assert px[0, 16][0] > 200 and px[31, 16][2] > 200  # red left, blue right survive the crop


def test_image_folder(tmp_path):
    _save(tmp_path / "cat" / "a.png", (40, 30), (255, 0, 0))
    _save(tmp_path / "cat" / "sub" / "b.jpg", (64, 64), (0, 255, 0))
    _save(tmp_path / "dog" / "c.png", (20, 50), (0, 0, 255))
    (tmp_path / "empty").mkdir()
    ds = make_dataset(f"folder:{tmp_path}", image_size=16)
    assert ds.info.num_classes == 2 and len(ds) == 3 and ds.info.channels == 3
    x, y = ds.get(2)
    assert x.shape == (3, 16, 16) and y == 1 and x[2].mean() > 0.9 and x[0].mean() < -0.9
    xb, yb = ds.get_batch(torch.tensor([0, 2]), torch.tensor([True, False]))
    assert xb.shape == (2, 3, 16, 16) and yb.tolist() == [0, 1]


def test_image_folder_flat_and_empty(tmp_path):
    _save(tmp_path / "flat" / "a.png", (10, 10), (1, 2, 3))
    assert ImageFolderDataset(tmp_path / "flat", 8).info.num_classes == 1
    (tmp_path / "none").mkdir()
    with pytest.raises(DyditError, match="empty"):
        make_dataset(f"folder:{tmp_path / 'none'}")
    with pytest.raises(DyditError, match="does not exist"):
        make_dataset(f"folder:{tmp_path / 'missing'}")


def test_image_folder_size_defaults_to_the_images_own(tmp_path):
    """Not 256 whatever the images: the short side most images share, at most 256."""
    from dydit.data import dataset_image_size

    for i in range(3):
        _save(tmp_path / "small" / "c" / f"{i}.png", (32, 32), (9, 9, 9))
    assert make_dataset(f"folder:{tmp_path / 'small'}").info.image_size == 32
    for i, size in enumerate([(48, 64), (64, 48), (20, 20), (30, 48)]):
        _save(tmp_path / "mixed" / f"{i}.png", size, (9, 9, 9))
    ds = make_dataset(f"folder:{tmp_path / 'mixed'}")
    assert ds.info.image_size == 48 and ds.get(2)[0].shape == (3, 48, 48)
    _save(tmp_path / "large" / "a.png", (300, 400), (9, 9, 9))
    assert make_dataset(f"folder:{tmp_path / 'large'}").info.image_size == 256  # DiT's, not 300
    assert dataset_image_size(f"folder:{tmp_path / 'mixed'}") == 48  # headers only, for --dry-run
    assert dataset_image_size(f"folder:{tmp_path / 'mixed'}", 12) == 12
    assert dataset_image_size("digits") == 8 and dataset_image_size("fashion-mnist") == 32


def test_image_folder_honours_fit(tmp_path):
    """pad: a small image is centred on black, unscaled; resize: enlarged (ADM centre crop)."""
    _save(tmp_path / "d" / "a.png", (4, 4), (255, 0, 0))
    _save(tmp_path / "d" / "b.png", (20, 10), (0, 255, 0))  # larger than 8: centre crop either way
    padded = make_dataset(f"folder:{tmp_path / 'd'}", image_size=8, fit="pad")
    x, _ = padded.get(0)
    assert torch.equal(x[:, 2:6, 2:6], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 4, 4))
    border = torch.ones(8, 8, dtype=torch.bool)
    border[2:6, 2:6] = False
    assert (x[:, border] == -1).all()
    resized = make_dataset(f"folder:{tmp_path / 'd'}", image_size=8, fit="resize")
    assert torch.allclose(resized.get(0)[0], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 8, 8))
    for ds in (padded, resized):
        assert torch.allclose(ds.get(1)[0], torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 8, 8))
    with pytest.raises(DyditError, match="unknown fit"):
        ImageFolderDataset(tmp_path / "d", 8, fit="stretch")


# Faithful decoding of image files (16-bit, float, transparency, broken files) --------------------------
def _folder_of(tmp_path, name: str, image) -> str:
    path = tmp_path / name / f"{name}.{'tif' if image.mode == 'F' else 'png'}"
    path.parent.mkdir(parents=True)
    image.save(path)
    return f"folder:{path.parent}"


def _pixel(x: torch.Tensor) -> list[float]:
    """The first pixel of a decoded (3, S, S) image, back in 0..255."""
    return [round(v, 3) for v in ((x[:, 0, 0] + 1) * 127.5).tolist()]


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    from PIL import Image

    values = np.array([[0, 16448, 32896, 65535]] * 4, dtype=np.uint16)  # 0, 64, 128, 255 in 8 bits
    im = Image.frombytes("I;16", (4, 4), values.tobytes())
    ds = make_dataset(_folder_of(tmp_path, "g16", im), fit="pad")
    x, _ = ds.get(0)
    assert ds.info.image_size == 4
    assert [_pixel(x[:, :, j : j + 1])[0] for j in range(4)] == [0.0, 64.0, 128.0, 255.0]
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grey


@pytest.mark.parametrize(("scale", "value", "expected"), [(1.0, 0.5, 128.0), (255.0, 51.0, 51.0)])
def test_float_tiff_is_scaled_from_0_1_or_0_255(tmp_path, scale, value, expected):
    from PIL import Image

    values = np.full((4, 4), value, dtype=np.float32)
    values[0, 1] = scale  # white
    ds = make_dataset(_folder_of(tmp_path, "f", Image.frombytes("F", (4, 4), values.tobytes())))
    x, _ = ds.get(0)
    assert _pixel(x) == [expected] * 3 and _pixel(x[:, :, 1:]) == [255.0] * 3


@pytest.mark.parametrize(
    ("values", "needle"),
    [(-0.5, r"float pixels in \[-0.5, 1\]"), (300.0, "neither in"), (float("nan"), "NaN")],
)
def test_float_tiff_of_no_known_scale_is_refused_with_its_name(tmp_path, values, needle):
    from PIL import Image

    a = np.ones((4, 4), dtype=np.float32)
    a[1, 1] = values
    spec = _folder_of(tmp_path, "f", Image.frombytes("F", (4, 4), a.tobytes()))
    with pytest.raises(
        DyditError, match=f"cannot read image {re.escape(str(tmp_path / 'f' / 'f.tif'))}: .*{needle}"
    ):
        make_dataset(spec)


def test_transparency_is_composited_on_black(tmp_path):
    from PIL import Image

    rgba = Image.new("RGBA", (4, 4), (255, 255, 255, 0))  # transparent white: black, not white
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    rgba.putpixel((2, 0), (200, 100, 50, 51))  # a fifth opaque
    x, _ = make_dataset(_folder_of(tmp_path, "rgba", rgba)).get(0)
    assert _pixel(x) == [0.0] * 3
    assert _pixel(x[:, :, 1:]) == [255.0, 0.0, 0.0]
    assert _pixel(x[:, :, 2:]) == [40.0, 20.0, 10.0]
    la = Image.new("LA", (4, 4), (200, 128))
    assert _pixel(make_dataset(_folder_of(tmp_path, "la", la)).get(0)[0]) == [100.0] * 3
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 255, 255])
    palette.info["transparency"] = 1  # saved as a tRNS chunk: the white entry is transparent
    assert _pixel(make_dataset(_folder_of(tmp_path, "p", palette)).get(0)[0]) == [0.0] * 3


def _truncated_jpeg(path) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_truncated_image_is_refused_when_the_folder_is_read(tmp_path):
    """Every image is decoded when the dataset is made: the error names the first bad file and
    counts the others, before any batch is drawn."""
    for i in range(4):
        _save(tmp_path / "d" / "c" / f"{i}.png", (8, 8), (1, 2, 3))
    _truncated_jpeg(tmp_path / "d" / "c" / "1.jpg")
    with pytest.raises(
        DyditError, match=f"cannot read image {re.escape(str(tmp_path / 'd' / 'c' / '1.jpg'))}: .*truncated"
    ):
        make_dataset(f"folder:{tmp_path / 'd'}")
    (tmp_path / "d" / "c" / "3.png").write_bytes(b"not an image")
    with pytest.raises(DyditError, match=r"1\.jpg: .*truncated.* \(and 1 more unreadable images\)$"):
        make_dataset(f"folder:{tmp_path / 'd'}")


@pytest.mark.parametrize("workers", [0, 1])
def test_image_broken_after_the_check_is_named_when_drawn(tmp_path, workers):
    """A file spoiled after the folder was read is still named, in-process and from a loader worker."""
    for i in range(2):
        _save(tmp_path / "d" / f"{i}.png", (8, 8), (1, 2, 3))
    ds = make_dataset(f"folder:{tmp_path / 'd'}")
    (tmp_path / "d" / "1.png").write_bytes(b"spoilt")
    with pytest.raises(DyditError, match=f"cannot read image {tmp_path / 'd' / '1.png'}: cannot identify"):
        next(iter(DataStream(ds, 2, seed=0, num_workers=workers)))


# Latent cache -----------------------------------------------------------------------------------
def fake_encode(x: torch.Tensor) -> torch.Tensor:
    """A stand-in VAE: 2x average pooling to 2 channels, times a scale."""
    pooled = torch.nn.functional.avg_pool2d(x, 2)
    return torch.cat([pooled, -pooled], 1)[:, :2] * 0.5


def test_latent_cache_round_trip(tmp_path):
    ds = toy_dataset(n=10, size=4)
    out = encode_dataset(ds, fake_encode, tmp_path / "cache", codec="fake", batch_size=3, shard_size=4,
                         dtype="float32", progress=False)  # fmt: skip
    meta = read_meta(out)
    assert meta["count"] == 10 and len(meta["shards"]) == 3 and meta["flip"]
    for in_memory in (True, False):
        lat = LatentDataset(out, in_memory=in_memory)
        assert (
            len(lat) == 10
            and lat.info.channels == 2
            and lat.info.image_size == 2
            and lat.info.codec == "fake"
        )
        for i in (0, 5, 9):
            z, y = lat.get(i)
            assert torch.allclose(z, fake_encode(ds.get(i)[0][None])[0]) and y == i % 5
            zf, _ = lat.get(i, flip=True)
            assert torch.allclose(zf, fake_encode(ds.get(i, flip=True)[0][None])[0])
        zb, yb = lat.get_batch(torch.tensor([1, 7]), torch.tensor([False, True]))
        assert torch.allclose(zb[1], lat.get(7, True)[0]) and yb.tolist() == [1, 2]
    assert make_dataset(f"latents:{out}").info.image_size == 2
    with pytest.raises(DyditError, match="already holds"):
        encode_dataset(ds, fake_encode, out, codec="fake", progress=False)


def test_latent_cache_incomplete(tmp_path):
    (tmp_path / "c").mkdir()
    with pytest.raises(DyditError, match="incomplete"):
        make_dataset(f"latents:{tmp_path / 'c'}")


# DataStream -------------------------------------------------------------------------------------
def _take(stream: DataStream, k: int) -> list[torch.Tensor]:
    it = iter(stream)
    return [next(it)[0] for _ in range(k)]


def test_stream_resumes_exactly_across_epochs():
    ds = toy_dataset(n=40)
    full = _take(DataStream(ds, 6, seed=3, flip=True), 15)  # 6 batches per epoch: crosses 2 boundaries
    first = DataStream(ds, 6, seed=3, flip=True)
    head = _take(first, 8)
    assert first.state() == {"epoch": 1, "batch": 2}
    tail = _take(DataStream(ds, 6, seed=3, flip=True, **first.state()), 7)
    for a, b in zip(full, head + tail):
        assert torch.equal(a, b)


def test_stream_epochs_are_permutations_and_flips_are_seeded():
    ds = toy_dataset(n=40)
    batches = _take(DataStream(ds, 5, seed=1, flip=True), 16)
    firsts = [torch.where(b[:, 0, 0, -1] == -1, b[:, 0, 0, 0], b[:, 0, 0, -1]) for b in batches]  # undo flips
    epoch0, epoch1 = torch.cat(firsts[:8]), torch.cat(firsts[8:])
    assert sorted(epoch0.long().tolist()) == list(range(40)) and not torch.equal(epoch0, epoch1)
    flipped = torch.cat([b[:, 0, 0, 0] == -1 for b in batches])
    assert 0 < flipped.float().mean() < 1
    again = _take(DataStream(ds, 5, seed=1, flip=True), 16)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = _take(DataStream(ds, 5, seed=2, flip=True), 1)
    assert not torch.equal(other[0], batches[0])


def test_stream_ranks_partition_the_epoch():
    ds = toy_dataset(n=40, flip=False)
    seen = []
    for rank in range(2):
        s = DataStream(ds, 4, seed=0, rank=rank, world_size=2)
        assert s.batches_per_epoch == 5
        seen.append(torch.cat([b[:, 0, 0, 0] for b in _take(s, 5)]))
    assert sorted(torch.cat(seen).long().tolist()) == list(range(40))


def test_stream_loader_path_matches_in_memory_path():
    ds = toy_dataset(n=20)

    class Lazy(ArrayDataset):  # same data, batched through a DataLoader
        in_memory = False

    lazy = Lazy(ds.images, ds.labels, ds.info)
    a = _take(DataStream(ds, 4, seed=5, flip=True), 7)
    b = _take(DataStream(lazy, 4, seed=5, flip=True), 7)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_stream_errors():
    ds = toy_dataset(n=10)
    with pytest.raises(DyditError, match="fewer than one global batch"):
        DataStream(ds, 6, seed=0, world_size=2)
    with pytest.raises(DyditError, match="empty"):
        ArrayDataset(torch.zeros(0, 1, 4, 4), torch.zeros(0), ds.info)


def test_derive_seed_is_stable():
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3) != derive_seed(1, 2, 4)
    assert 0 <= derive_seed(0) < 2**63
