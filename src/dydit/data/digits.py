"""scikit-learn's 8x8 digits (1 797 images, 10 classes): the dataset of the tiny CPU tests.

It ships inside scikit-learn, so it works offline. Values 0..16 map linearly to [-1, 1]. A flipped
digit is a different (or no) digit, so the flip augmentation is off by default.
"""

from __future__ import annotations

import torch

from dydit.data.base import ArrayDataset, DataInfo, check_fits_in_memory
from dydit.errors import DyditError

NATIVE_SIZE = 8
NUM_CLASSES = 10
# sklearn's digits are integer intensities in 0..16.
_MAX_INTENSITY = 16.0


def load_digits(image_size: int | None = None, fit: str = "pad") -> ArrayDataset:
    """The digits as (1, S, S) float images in [-1, 1]; S = ``image_size`` (default 8; larger sizes pad
    on the background value or resize)."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise DyditError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from None
    bunch = sk_load_digits()
    raw = torch.from_numpy(bunch.images).float()  # (N, 8, 8) in 0..16
    x = (raw / _MAX_INTENSITY * 2.0 - 1.0).unsqueeze(1)  # (N, 1, 8, 8) in [-1, 1]
    size = image_size or NATIVE_SIZE
    if size != NATIVE_SIZE:
        check_fits_in_memory(len(x), 1, size, 8 if fit == "resize" else 4)
        if fit == "pad":
            if size < NATIVE_SIZE:
                raise DyditError(f"cannot pad 8x8 digits to {size}x{size}; use resize")
            x = torch.nn.functional.pad(
                x, [(size - NATIVE_SIZE) // 2, (size - NATIVE_SIZE + 1) // 2] * 2, value=-1.0
            )
        elif fit == "resize":
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
            x = x.clamp(-1.0, 1.0)
        else:
            raise DyditError(f"unknown fit {fit!r}; use 'pad' or 'resize'")
    y = torch.from_numpy(bunch.target).long()
    info = DataInfo(name="digits", channels=1, image_size=size, num_classes=NUM_CLASSES, flip=False)
    return ArrayDataset(x.contiguous(), y, info)
