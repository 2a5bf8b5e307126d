"""Training data: datasets named by a spec string, and a resumable batch stream.

``make_dataset(spec)`` understands

- ``"fashion-mnist"`` or ``"fashion-mnist:/dir"`` -- the Debian package's idx files (default data),
- ``"fashion-mnist-test"`` -- its 10 000-image test split,
- ``"fmnist-compose"`` or ``"fmnist-compose:/dir"`` -- captioned 64x64 compositions of its items,
  made on the fly (:mod:`dydit.data.compose`; batches carry caption token ids),
- ``"digits"`` -- scikit-learn's 8x8 digits (tiny tests),
- ``"folder:/path"`` -- an ImageFolder-style directory, ADM centre crop (every file checked once),
- ``"latents:/path"`` -- a latent cache written by :func:`~dydit.data.latents.encode_dataset`.

Every dataset carries a :class:`~dydit.data.base.DataInfo` (channels, size, classes, codec,
whether flips make sense). See docs/METHOD.md §1.6 and §6 for the recipes these follow.
"""

from __future__ import annotations

from dydit.data.base import ArrayDataset, DataInfo, ImageDataset
from dydit.data.loader import DataStream, derive_seed
from dydit.errors import DyditError

DATASET_KINDS: tuple[str, ...] = (
    "fashion-mnist", "fashion-mnist-test", "fmnist-compose", "digits", "folder:", "latents:",
)  # fmt: skip
# DiT trains at 256 or 512 pixels; a far larger --image-size is a typo that would exhaust memory.
MAX_IMAGE_SIZE = 4096


def _check_size(image_size: int | None) -> None:
    if image_size is not None and not 0 < image_size <= MAX_IMAGE_SIZE:
        raise DyditError(f"image size must be in 1..{MAX_IMAGE_SIZE} pixels, got {image_size}")


def make_dataset(
    spec: str, image_size: int | None = None, fit: str = "pad", progress: bool = False
) -> ImageDataset:
    """The dataset a spec string names (see the module docstring).

    Args:
        spec: dataset spec.
        image_size: output size for pixel datasets (default: 32 for Fashion-MNIST, 8 for digits,
            the images' own for folders: see :mod:`dydit.data.imagefolder`); latent caches have a
            fixed size and reject a different one.
        fit: how small images reach ``image_size``: ``"pad"`` or ``"resize"``.
        progress: a progress bar while a folder's images are checked.
    """
    _check_size(image_size)
    kind, _, arg = spec.partition(":")
    if kind in ("fashion-mnist", "fashion-mnist-test"):
        from dydit.data.fashion_mnist import load_fashion_mnist

        split = "test" if kind.endswith("-test") else "train"
        return load_fashion_mnist(arg or None, split=split, image_size=image_size, fit=fit)
    if kind == "fmnist-compose":
        from dydit.data.compose import CANVAS, make_compose_dataset

        if image_size not in (None, CANVAS):
            raise DyditError(f"fmnist-compose images are {CANVAS}x{CANVAS}, not {image_size}x{image_size}")
        return make_compose_dataset(arg or None)
    if kind == "digits" and not arg:
        from dydit.data.digits import load_digits

        return load_digits(image_size=image_size, fit=fit)
    if kind == "folder" and arg:
        from dydit.data.imagefolder import ImageFolderDataset

        return ImageFolderDataset(arg, image_size=image_size, fit=fit, progress=progress)
    if kind == "latents" and arg:
        from dydit.data.latents import LatentDataset

        ds = LatentDataset(arg)
        if image_size is not None and image_size != ds.info.image_size:
            raise DyditError(
                f"latent cache {arg} holds {ds.info.image_size}x{ds.info.image_size} latents, "
                f"not {image_size}x{image_size}"
            )
        return ds
    raise DyditError(
        f"unknown dataset spec {spec!r}; use one of: fashion-mnist[:DIR], fashion-mnist-test, "
        "fmnist-compose[:DIR], digits, folder:PATH, latents:PATH"
    )


def dataset_image_size(spec: str, image_size: int | None = None, progress: bool = False) -> int | None:
    """The image size ``make_dataset(spec, image_size)`` gives, without loading or checking the data
    (a folder's image headers are read, with a progress bar if asked and slow); None for a latent
    cache that is not complete yet."""
    _check_size(image_size)
    kind, _, arg = spec.partition(":")
    if kind == "latents" and arg:
        from dydit.data.latents import read_meta

        try:
            return int(read_meta(arg)["latent_size"])
        except DyditError:
            return None  # built later by --cache-latents; make_dataset reports a cache still missing then
    if image_size is not None:
        return image_size
    if kind in ("fashion-mnist", "fashion-mnist-test"):
        from dydit.data.fashion_mnist import DEFAULT_SIZE

        return DEFAULT_SIZE
    if kind == "fmnist-compose":
        from dydit.data.compose import CANVAS

        return CANVAS
    if kind == "digits" and not arg:
        from dydit.data.digits import NATIVE_SIZE

        return NATIVE_SIZE
    if kind == "folder" and arg:
        from dydit.data.imagefolder import folder_image_size

        return folder_image_size(arg, progress)
    return make_dataset(spec).info.image_size  # an unknown spec: its error


__all__ = [
    "DATASET_KINDS",
    "ArrayDataset",
    "DataInfo",
    "DataStream",
    "ImageDataset",
    "dataset_image_size",
    "derive_seed",
    "make_dataset",
]
