"""Fashion-MNIST from the idx ``.gz`` files of the Debian package ``dataset-fashion-mnist``.

The default training set of this project (docs/ARCHITECTURE.md §6.8): 60 000 28x28 grey images in 10 classes,
padded to 32x32 on the black background (or resized) so that the small ``DiT-Ti``/``DiT-Mi`` presets
with patch 2 or 4 tile it. Pixels map to [-1, 1]. Horizontal flips are label-preserving for
clothes, so the flip augmentation of DiT (docs/METHOD.md §1.6) is on by default.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

from dydit.data.base import ArrayDataset, DataInfo, pad_or_resize
from dydit.errors import DyditError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ROOT_ENV = "DYDIT_FASHION_MNIST"
NATIVE_SIZE = 28
DEFAULT_SIZE = 32
NUM_CLASSES = 10
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# idx magic numbers: 0x00000803 = unsigned bytes, 3 dims; 0x00000801 = unsigned bytes, 1 dim.
_IMAGE_MAGIC, _LABEL_MAGIC = 0x803, 0x801
_INSTALL_HINT = (
    "install it with `sudo apt-get install dataset-fashion-mnist`, "
    "or point {env} at a directory with the idx .gz files"
)


def default_root() -> Path:
    return Path(os.environ.get(ROOT_ENV, DEFAULT_ROOT))


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read one (gzipped) idx file of unsigned bytes; raises DyditError if it is not one."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DyditError(f"cannot read {path}: {e}") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header or struct.unpack(">I", data[:4])[0] != magic:
        raise DyditError(f"{path} is not an idx file of the expected kind (magic {magic:#x})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    count = int(np.prod(dims))
    if len(data) - header < count:
        raise DyditError(f"{path} is truncated: expected {count} values, found {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, count=count, offset=header).reshape(dims)


def load_fashion_mnist(
    root: str | os.PathLike | None = None,
    split: str = "train",
    image_size: int | None = None,
    fit: str = "pad",
) -> ArrayDataset:
    """Fashion-MNIST as an in-memory dataset of (1, S, S) images in [-1, 1], S = ``image_size`` (32).

    Args:
        root: directory with the four idx ``.gz`` files (default: ``$DYDIT_FASHION_MNIST`` or the
            Debian package's ``/usr/share/datasets/fashion-mnist``).
        split: ``"train"`` (60 000 images) or ``"test"`` (10 000).
        image_size: output size; 28 keeps the native size.
        fit: ``"pad"`` (centre on black, the default) or ``"resize"`` (bicubic).
    """
    if split not in _FILES:
        raise DyditError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    root = Path(root) if root is not None else default_root()
    image_file, label_file = (root / name for name in _FILES[split])
    for path in (image_file, label_file):
        if not path.is_file():
            raise DyditError(f"Fashion-MNIST file {path} not found; " + _INSTALL_HINT.format(env=ROOT_ENV))
    images = read_idx(image_file, _IMAGE_MAGIC)
    labels = read_idx(label_file, _LABEL_MAGIC)
    if len(images) != len(labels):
        raise DyditError(f"{image_file} holds {len(images)} images but {label_file} {len(labels)} labels")
    size = image_size or DEFAULT_SIZE
    x = pad_or_resize(torch.from_numpy(images.copy()).unsqueeze(1), size, fit)  # (N, 1, S, S) uint8
    y = torch.from_numpy(labels.astype(np.int64))
    info = DataInfo(name="fashion-mnist", channels=1, image_size=size, num_classes=NUM_CLASSES, flip=True)
    return ArrayDataset(x, y, info)
