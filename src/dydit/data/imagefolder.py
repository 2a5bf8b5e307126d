"""ImageFolder-style directories (``root/<class>/<image>``) with ADM's centre crop, PIL only.

The DiT data pipeline of docs/METHOD.md §1.6: while the short side is at least twice the target size,
halve the image with a box filter; then resize bicubically so that the short side equals the
target; then crop the centre square. Classes are the sorted sub-directory names (like
torchvision's ImageFolder, which we cannot import here: docs/ARCHITECTURE.md §6.8). Images lying directly in
``root`` with no class sub-directories form a single class.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dydit.data.base import DataInfo, ImageDataset
from dydit.errors import DyditError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DEFAULT_SIZE = 256


def center_crop_adm(image, size: int):
    """ADM centre crop of a PIL image to ``size`` x ``size`` (docs/METHOD.md §1.6)."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def _images_under(directory: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames.sort()
        found.extend(Path(dirpath) / f for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS))
    return found


class ImageFolderDataset(ImageDataset):
    """Lazily decoded RGB images, centre-cropped to (3, S, S) in [-1, 1]."""

    def __init__(self, root: str | os.PathLike, image_size: int | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DyditError(f"image folder {self.root} does not exist or is not a directory")
        self.size = image_size or DEFAULT_SIZE
        class_dirs = sorted(d for d in self.root.iterdir() if d.is_dir())
        self.classes: list[str] = []
        self.samples: list[tuple[Path, int]] = []
        for d in class_dirs:
            files = _images_under(d)
            if files:
                label = len(self.classes)
                self.classes.append(d.name)
                self.samples.extend((f, label) for f in files)
        if not self.samples:
            loose = sorted(
                f for f in self.root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
            )
            self.classes = [self.root.name] if loose else []
            self.samples = [(f, 0) for f in loose]
        if not self.samples:
            raise DyditError(
                f"image folder {self.root} is empty: no {', '.join(IMAGE_EXTENSIONS)} files "
                "in it or its sub-directories"
            )
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
        try:
            with Image.open(path) as im:
                image = center_crop_adm(im.convert("RGB"), self.size)
        except Exception as e:  # noqa: BLE001 - PIL on a broken or hostile file: OSError, bombs, ValueError...
            raise DyditError(f"cannot read image {path}: {e}") from None
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, S, S)
        return x.float() / 127.5 - 1.0, label
