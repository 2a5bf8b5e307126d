"""The dataset protocol of the training loop (docs/METHOD.md §6.1, §6.2; docs/ARCHITECTURE.md §1).

Every training dataset is a map-style :class:`ImageDataset` of ``(x, y)`` pairs: ``x`` a float
tensor (C, H, W) in [-1, 1] (pixels) or a scaled latent, ``y`` an integer class label. The
horizontal flip is not a random transform inside the dataset: the loader decides it from
``(seed, epoch)`` and asks for ``get(i, flip)``, so that data order and augmentation are both
reproducible and resumable (docs/ARCHITECTURE.md §6.2).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from dydit.conditioning import Condition
from dydit.errors import DyditError

# uint8 pixels map to [-1, 1] as x / 127.5 - 1 (the DiT / ADM normalisation).
_PIXEL_HALF_RANGE = 127.5


@dataclass(frozen=True)
class DataInfo:
    """What the model and sampler need to know about a dataset.

    ``codec`` is ``"pixel"`` for images in [-1, 1], or the VAE spec a latent cache was encoded
    with (its latents are already multiplied by the latent scale, docs/METHOD.md §1.4).
    """

    name: str
    channels: int
    image_size: int
    num_classes: int
    codec: str = "pixel"
    flip: bool = True

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class ImageDataset(Dataset):
    """Base class: subclasses implement ``__len__`` and ``get(index, flip)``; ``info`` describes them."""

    info: DataInfo

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, index: int, flip: bool = False) -> tuple[Tensor, int]:
        raise NotImplementedError

    def __getitem__(self, key: int | tuple[int, bool]) -> tuple[Tensor, int]:
        if isinstance(key, tuple):
            return self.get(int(key[0]), bool(key[1]))
        return self.get(int(key), False)

    def get_batch(self, indices: Tensor, flips: Tensor) -> tuple[Tensor, Tensor]:
        """A batch (B, C, H, W), (B,) for the given indices and flip flags; subclasses may vectorise.

        The stream (:class:`~dydit.data.loader.DataStream`) hands the labels on as
        :class:`~dydit.conditioning.ClassLabels`; a dataset of another condition returns that
        :class:`~dydit.conditioning.Condition` here instead."""
        items = [self.get(int(i), bool(f)) for i, f in zip(indices.tolist(), flips.tolist())]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)

    def batch_condition(self, y: Tensor) -> Tensor | Condition:
        """The condition of a batch whose ``get`` results DataLoader workers collated (``y`` stacks the
        second items): the labels as they are here; a dataset of another condition wraps them."""
        return y

    @property
    def in_memory(self) -> bool:
        """True when ``get_batch`` is cheap enough to call in the training process (no workers)."""
        return False


class ArrayDataset(ImageDataset):
    """Images held in memory: uint8 (N, C, H, W) mapped to [-1, 1], or float tensors used as they are."""

    def __init__(self, images: Tensor, labels: Tensor, info: DataInfo):
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if len(images) == 0:
            raise DyditError(f"dataset {info.name!r} is empty")
        self.images = images
        self.labels = labels.long()
        self.info = info

    def __len__(self) -> int:
        return len(self.images)

    def _to_float(self, x: Tensor) -> Tensor:
        return x.float() / _PIXEL_HALF_RANGE - 1.0 if x.dtype == torch.uint8 else x.float()

    def get(self, index: int, flip: bool = False) -> tuple[Tensor, int]:
        x = self._to_float(self.images[index])
        return (x.flip(-1) if flip else x), int(self.labels[index])

    def get_batch(self, indices: Tensor, flips: Tensor) -> tuple[Tensor, Tensor]:
        x = self._to_float(self.images[indices])  # (B, C, H, W)
        x = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
        return x, self.labels[indices]

    @property
    def in_memory(self) -> bool:
        return True


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: do not guess
        return 2**62


def check_fits_in_memory(n: int, channels: int, size: int, bytes_per_value: int) -> None:
    """Refuse to hold ``n`` images of ``size`` x ``size`` in memory when they would take more than half
    of it (a typo in --image-size should be an error, not a machine swapping or killed)."""
    needed = n * channels * size * size * bytes_per_value
    if needed > _memory_bytes() // 2:
        raise DyditError(
            f"{n} images at {size}x{size} need {needed / 2**30:.1f} GiB in memory, more than half of this "
            "machine's; use a smaller --image-size"
        )


def pad_or_resize(images: Tensor, size: int, fit: str, background: int = 0) -> Tensor:
    """Fit uint8 images (N, C, h, w) to (N, C, size, size): ``pad`` centres them on the background
    value (only when they are smaller), ``resize`` uses bicubic interpolation (PIL-like, clamped)."""
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    check_fits_in_memory(n, c, size, 5 if fit == "resize" else 1)  # uint8, plus a float copy to resize
    if fit == "pad":
        if h > size or w > size:
            raise DyditError(f"cannot pad {h}x{w} images to {size}x{size}; use resize")
        top, left = (size - h) // 2, (size - w) // 2
        out = torch.full((n, c, size, size), background, dtype=images.dtype)
        out[:, :, top : top + h, left : left + w] = images
        return out
    if fit == "resize":
        x = torch.nn.functional.interpolate(
            images.float(), size=(size, size), mode="bicubic", align_corners=False
        )
        return x.round().clamp(0, 255).to(torch.uint8)
    raise DyditError(f"unknown fit {fit!r}; use 'pad' or 'resize'")
