"""Image sets to evaluate: ADM ``.npz`` batches, folders of images and built-in datasets.

Every source yields uint8 batches in NHWC layout, (B, H, W, C) with C = 1 or 3, the layout of the
ADM evaluator's sample and reference batches (``arr_0`` uint8 NHWC, optional ``arr_1`` labels).
An ``.npz`` is read in streaming fashion straight from its zip member, so a 50 000-image batch
never has to fit in memory. A reference ``.npz`` may also hold precomputed statistics
(``mu``/``sigma`` for pool features, ``mu_s``/``sigma_s`` for spatial features), with or without
``arr_0``.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dydit.data.decode import to_rgb
from dydit.errors import DyditError
from dydit.io import npz_name, save_npz

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
# Built-in dataset names -> Fashion-MNIST split.
DATASETS = {"fashion-mnist-train": "train", "fashion-mnist-test": "test"}
_STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
_CHUNK = 1 << 20


class ImageSource:
    """A finite, ordered set of uint8 images, (H, W, C) each, optionally with class labels."""

    name: str
    shape: tuple[int, int, int]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 batches (B, H, W, C) in order."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A content hash: equal fingerprints mean equal images (the reference-statistics cache key)."""
        raise NotImplementedError


class ArraySource(ImageSource):
    """Images already in memory, uint8 (N, H, W, C)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None, name: str = "array"):
        self.images = check_images(np.asarray(images), name)
        self.labels = None if labels is None else np.asarray(labels)
        self.shape = tuple(self.images.shape[1:])
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for i in range(0, len(self.images), batch_size):
            yield self.images[i : i + batch_size]

    def fingerprint(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.images).tobytes()).hexdigest()


class NpzImages(ImageSource):
    """``arr_0`` (and ``arr_1`` labels) of an ADM ``.npz``, streamed from the zip member."""

    def __init__(self, path: Path, limit: int | None = None):
        self.path, self.name = path, str(path)
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
            shape, offset_dtype = _read_npy_header(f, path)
        if len(shape) != 4 or shape[3] not in (1, 3) or offset_dtype != np.uint8:
            raise DyditError(
                f"{path}: arr_0 must be uint8 images (N, H, W, C) with C = 1 or 3 (the ADM layout), "
                f"got {offset_dtype} {tuple(shape)}"
            )
        self.total = int(shape[0])
        self.count = self.total if limit is None else min(limit, self.total)
        self.shape = tuple(int(s) for s in shape[1:])
        self.labels = None
        with np.load(path) as data:  # allow_pickle stays False: object arrays are refused
            if "arr_1" in data.files:
                try:
                    labels = data["arr_1"]
                except ValueError as e:
                    raise DyditError(f"{path}: arr_1 is not a plain numeric array ({e})") from None
                if labels.shape != (self.total,):
                    raise DyditError(f"{path}: arr_1 must hold one label per image, got shape {labels.shape}")
                if labels.dtype.kind not in "iu":
                    raise DyditError(f"{path}: arr_1 must hold integer labels, got dtype {labels.dtype}")
                self.labels = labels[: self.count]

    def __len__(self) -> int:
        return self.count

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        item = int(np.prod(self.shape))
        with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
            _read_npy_header(f, self.path)
            for start in range(0, self.count, batch_size):
                n = min(batch_size, self.count - start)
                data = f.read(n * item)
                if len(data) != n * item:
                    raise DyditError(f"{self.path}: arr_0 is truncated")
                yield np.frombuffer(data, dtype=np.uint8).reshape(n, *self.shape)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(f"npz:{self.count}:".encode())
        with open(self.path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()


class FolderImages(ImageSource):
    """All image files below a folder (recursively, sorted by path); sizes must agree.

    Grey and colour files may be mixed: when any file is colour, grey ones are replicated to RGB.
    """

    def __init__(self, root: Path, limit: int | None = None):
        from PIL import Image

        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise DyditError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
        self.files = files if limit is None else files[:limit]
        self.root, self.name = root, str(root)
        sizes, grey = {}, True
        for path in self.files:
            try:
                with Image.open(path) as im:
                    sizes.setdefault(im.size, path)
                    grey &= im.mode in ("L", "1", "I;16", "I", "F")
            except (OSError, Image.DecompressionBombError, ValueError) as e:
                raise DyditError(f"cannot read image {path}: {e}") from None
            if len(sizes) > 1:
                (s1, p1), (s2, p2) = sizes.items()
                raise DyditError(
                    f"{root}: images of mixed sizes: {p1.name} is {s1[0]}x{s1[1]} but {p2.name} is "
                    f"{s2[0]}x{s2[1]}; resize them to one size first"
                )
        ((w, h),) = sizes
        self.mode = "L" if grey else "RGB"
        self.shape = (h, w, 1 if grey else 3)

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, path: Path) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(path) as im:
                rgb = to_rgb(im)  # 16-bit and float scaled, transparency composited (data.decode)
            x = np.asarray(rgb.convert("L") if self.mode == "L" else rgb, dtype=np.uint8)
        except (OSError, Image.DecompressionBombError, ValueError) as e:
            raise DyditError(f"cannot read image {path}: {e}") from None
        return x.reshape(self.shape)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for i in range(0, len(self.files), batch_size):
            yield np.stack([self._load(p) for p in self.files[i : i + batch_size]])

    def fingerprint(self) -> str:
        digest = hashlib.sha256(f"folder:{len(self.files)}:".encode())
        for path in self.files:
            digest.update(str(path.relative_to(self.root)).encode() + b"\0")
            digest.update(path.read_bytes())
        return digest.hexdigest()


def dataset_images(name: str, limit: int | None = None, image_size: int | None = None) -> ArraySource:
    """A built-in dataset, by default at its native resolution (Fashion-MNIST: 28x28 grey).

    ``image_size`` fits it the way the training data pipeline does (Fashion-MNIST: padded on black
    to 32x32), so that samples of a model trained at that size are compared like with like.
    """
    from dydit.data.fashion_mnist import NATIVE_SIZE, load_fashion_mnist

    data = load_fashion_mnist(split=DATASETS[name], image_size=image_size or NATIVE_SIZE)
    images = data.images.permute(0, 2, 3, 1).numpy()  # (N, S, S, 1) uint8
    labels = data.labels.numpy()
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return ArraySource(images, labels, name=name)


@dataclass
class ImageSet:
    """What a path or dataset name resolves to: images, precomputed statistics (ADM keys), or both."""

    images: ImageSource | None
    stats: dict[str, np.ndarray] = field(default_factory=dict)
    name: str = ""


def open_image_set(spec: str | Path, limit: int | None = None, image_size: int | None = None) -> ImageSet:
    """Resolve an ``.npz`` path, a folder or a built-in dataset name (``fashion-mnist-train``/``-test``).

    ``limit`` keeps the first N images; ``image_size`` applies to built-in datasets only (see
    :func:`dataset_images`). Raises DyditError for anything that is not one of these.
    """
    text = str(spec)
    if text in DATASETS:
        return ImageSet(dataset_images(text, limit, image_size), name=text)
    path = Path(spec)
    if path.is_dir():
        return ImageSet(FolderImages(path, limit), name=text)
    if not path.exists():
        raise DyditError(
            f"{text}: no such file or folder (expected an .npz, a folder of images or one of "
            f"{', '.join(DATASETS)})"
        )
    if path.suffix != ".npz":
        raise DyditError(f"{text}: unsupported file type; expected an ADM .npz or a folder of images")
    try:
        with np.load(path) as data:
            keys = set(data.files)
            stats = {k: data[k] for k in _STAT_KEYS if k in keys}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DyditError(f"{text}: not a readable .npz file ({e or type(e).__name__})") from None
    _check_stats(stats, text)
    if "arr_0" not in keys and "mu" not in keys:
        raise DyditError(
            f"{text}: wrong .npz layout: found keys {sorted(keys)}, expected images 'arr_0' (uint8 N,H,W,C) "
            "and/or statistics 'mu' and 'sigma'"
        )
    images = NpzImages(path, limit) if "arr_0" in keys else None
    return ImageSet(images, stats, name=text)


def write_npz(
    path: str | Path, images: np.ndarray, labels: np.ndarray | None = None, **stats: np.ndarray
) -> None:
    """Write an ADM batch: ``arr_0`` uint8 (N, H, W, C), optional ``arr_1`` labels and statistics.

    Written atomically (:func:`dydit.io.save_npz`); like ``np.savez``, a name without the ``.npz``
    suffix gets it appended.
    """
    arrays = {"arr_0": check_images(np.asarray(images), str(path))}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels)
    save_npz(npz_name(path), {**arrays, **stats})


def check_images(images: np.ndarray, name: str) -> np.ndarray:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DyditError(
            f"{name}: images must be uint8 (N, H, W, C) with C = 1 or 3, got {images.dtype} {images.shape}"
        )
    return images


def _check_stats(stats: dict[str, np.ndarray], name: str) -> None:
    for suffix in ("", "_s"):
        mu, sigma = stats.get(f"mu{suffix}"), stats.get(f"sigma{suffix}")
        if (mu is None) != (sigma is None):
            raise DyditError(
                f"{name}: wrong .npz layout: 'mu{suffix}' and 'sigma{suffix}' must come together"
            )
        if mu is not None and (mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0])):
            raise DyditError(
                f"{name}: wrong .npz layout: mu{suffix} {mu.shape} and sigma{suffix} {sigma.shape} "
                "must be (D,) and (D, D)"
            )


def _read_npy_header(f, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Parse the ``.npy`` header of an open zip member; returns (shape, dtype), file at the data."""
    try:
        version = np.lib.format.read_magic(f)
        reader = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = reader(f)
    except ValueError as e:
        raise DyditError(f"{path}: arr_0 is not a valid .npy array ({e})") from None
    if fortran and len(shape) > 1:
        raise DyditError(f"{path}: arr_0 is stored in Fortran order; save it C-contiguous")
    return shape, dtype
