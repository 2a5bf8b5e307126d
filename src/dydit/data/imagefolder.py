"""ImageFolder-style directories (``root/<class>/<image>``) with ADM's centre crop, PIL only.

The DiT data pipeline of docs/METHOD.md §1.6: while the short side is at least twice the target size,
halve the image with a box filter; then resize bicubically so that the short side equals the
target; then crop the centre square. With ``fit="pad"`` (the default, as for the other datasets) an
image no larger than the target in either side is centred on black instead, unscaled; ``"resize"``
sends every image through the centre crop (small ones are enlarged). Classes are the sorted
sub-directory names (like torchvision's ImageFolder, which we cannot import here:
docs/ARCHITECTURE.md §6.8). Images lying directly in ``root`` with no class sub-directories form a
single class.

Every image is decoded once when the dataset is made (:func:`dydit.data.decode.check_image`), so
an unreadable file stops the run before it starts, with its name. The size defaults to the images'
own: the short side most of them share (the larger on a tie), at most :data:`DEFAULT_SIZE`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dydit.data.base import DataInfo, ImageDataset
from dydit.data.decode import BACKGROUND, check_image, header_size, read_rgb
from dydit.errors import DyditError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DEFAULT_SIZE = 256  # DiT's ImageNet size: the largest size a folder gets unless asked
FITS = ("pad", "resize")
_CHECK_THREADS = 8  # PIL decodes without the GIL
_CHUNK = 1024


def center_crop_adm(image, size: int):
    """ADM centre crop of a PIL image to ``size`` x ``size`` (docs/METHOD.md §1.6)."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def fit_image(image, size: int, fit: str = "pad"):
    """An RGB PIL image at ``size`` x ``size``: centred on black when ``fit`` is "pad" and it fits,
    else the ADM centre crop."""
    from PIL import Image

    w, h = image.size
    if fit == "pad" and w <= size and h <= size:
        if (w, h) == (size, size):
            return image
        canvas = Image.new("RGB", (size, size), BACKGROUND)
        canvas.paste(image, ((size - w) // 2, (size - h) // 2))
        return canvas
    return center_crop_adm(image, size)


def _images_under(directory: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames.sort()
        found.extend(Path(dirpath) / f for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS))
    return found


def list_images(root: str | os.PathLike) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, (file, label) pairs) of an image folder; DyditError if it is missing or empty."""
    root = Path(root)
    if not root.is_dir():
        raise DyditError(f"image folder {root} does not exist or is not a directory")
    classes: list[str] = []
    samples: list[tuple[Path, int]] = []
    for d in sorted(d for d in root.iterdir() if d.is_dir()):
        files = _images_under(d)
        if files:
            classes.append(d.name)
            samples.extend((f, len(classes) - 1) for f in files)
    if not samples:
        loose = sorted(f for f in root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        classes = [root.name] if loose else []
        samples = [(f, 0) for f in loose]
    if not samples:
        raise DyditError(
            f"image folder {root} is empty: no {', '.join(IMAGE_EXTENSIONS)} files "
            "in it or its sub-directories"
        )
    return classes, samples


def _scan(
    files: Sequence[Path], read: Callable[[Path], tuple[int, int] | str], desc: str, progress: bool
) -> list[tuple[int, int]]:
    """``read`` every file (in threads): their sizes, or a DyditError naming the first bad file."""
    from tqdm import tqdm

    sizes: list[tuple[int, int]] = []
    bad: list[tuple[Path, str]] = []
    workers = max(1, min(_CHECK_THREADS, os.cpu_count() or 1, len(files)))
    with (
        ThreadPoolExecutor(workers) as pool,
        tqdm(total=len(files), desc=desc, unit="img", delay=2, leave=False, disable=not progress) as bar,
    ):
        for start in range(0, len(files), _CHUNK):  # bounded: not a million futures at once
            chunk = files[start : start + _CHUNK]
            for path, got in zip(chunk, pool.map(read, chunk)):
                if isinstance(got, str):
                    bad.append((path, got))
                else:
                    sizes.append(got)
            bar.update(len(chunk))
    if bad:
        more = f" (and {len(bad) - 1} more unreadable images)" if len(bad) > 1 else ""
        raise DyditError(f"cannot read image {bad[0][0]}: {bad[0][1]}{more}")
    return sizes


def default_size(sizes: Sequence[tuple[int, int]]) -> int:
    """The images' own size: the short side most share (the larger on a tie), at most DEFAULT_SIZE."""
    counts = Counter(min(s) for s in sizes)
    common = max(counts, key=lambda side: (counts[side], side))
    return min(common, DEFAULT_SIZE)


def folder_image_size(root: str | os.PathLike, progress: bool = False) -> int:
    """The size :class:`ImageFolderDataset` gives ``root`` by default, from the image headers alone."""
    _, samples = list_images(root)
    return default_size(_scan([f for f, _ in samples], header_size, "reading image sizes", progress))


class ImageFolderDataset(ImageDataset):
    """Lazily decoded RGB images at (3, S, S) in [-1, 1]; every file is checked once, here.

    Args:
        root: the folder.
        image_size: S (default: the images' own size, see the module docstring).
        fit: ``"pad"`` or ``"resize"``: what happens to images smaller than S.
        progress: a progress bar while the images are checked (shown after 2 s).
    """

    def __init__(
        self, root: str | os.PathLike, image_size: int | None = None, fit: str = "pad", progress: bool = False
    ):
        if fit not in FITS:
            raise DyditError(f"unknown fit {fit!r}; use 'pad' or 'resize'")
        self.root = Path(root)
        self.classes, self.samples = list_images(self.root)
        sizes = _scan([f for f, _ in self.samples], check_image, "checking images", progress)
        self.size = image_size or default_size(sizes)
        self.fit = fit
        self.info = DataInfo(
            name=f"folder:{self.root}",
            channels=3,
            image_size=self.size,
            num_classes=len(self.classes),
            flip=True,
        )

    def __len__(self) -> int:
        return len(self.samples)

    def get(self, index: int, flip: bool = False) -> tuple[Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        image = fit_image(read_rgb(path), self.size, self.fit)
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, S, S)
        return x.float() / 127.5 - 1.0, label
