"""One image file to 8-bit RGB, faithfully, with PIL only (docs/TRAINING.md, "Data").

PIL's ``convert("RGB")`` clips 16-bit grey to white, truncates float pixels to black and drops the
alpha channel. Here:

- 16-bit grey (PIL modes ``I;16*``, and ``I``, which is how PIL opens 16-bit PNG, PGM and TIFF) is
  scaled from 0..65535; 32-bit integer pixels beyond that range are refused (no scale is known).
- float grey (mode ``F``, float TIFF) is read as [0, 1] when every value lies in [0, 1], else as
  [0, 255]; NaN, infinite, negative or larger values are refused.
- transparency (RGBA, LA, PA, a transparent palette entry or colour) is composited on
  :data:`BACKGROUND`, black: the colour that ``--fit pad`` pads with too.
- every other mode (L, 1, P, RGB, CMYK, YCbCr, 16-bit RGB PNG, ...) goes through PIL's own conversion.

:func:`check_image` decodes a whole file (JPEGs at reduced scale, which still reads every byte) so
that a truncated or corrupt image is found when a folder is first read, not mid-run.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from dydit.errors import DyditError

BACKGROUND = (0, 0, 0)  # transparent pixels and --fit pad's border (black, -1 in [-1, 1])
_MAX_16BIT = 65535.0
_MAX_8BIT = 255.0
_INTEGER_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _grey_to_rgb(image: Any) -> Any:
    """16-bit or float grey pixels scaled to 8 bits (see the module docstring); ValueError if out of range."""
    from PIL import Image

    a = np.asarray(image, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError("pixels are NaN or infinite")
    lo, hi = float(a.min()), float(a.max())
    if image.mode == "F":
        if lo < 0 or hi > _MAX_8BIT:
            raise ValueError(f"float pixels in [{lo:g}, {hi:g}] are neither in [0, 1] nor in [0, 255]")
        scale = 1.0 if hi <= 1.0 else _MAX_8BIT
    else:
        if lo < 0 or hi > _MAX_16BIT:
            raise ValueError(f"integer pixels in [{lo:g}, {hi:g}] are not 16-bit (0..65535)")
        scale = _MAX_16BIT
    grey = np.rint(a * (_MAX_8BIT / scale)).clip(0, _MAX_8BIT).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _has_transparency(image: Any) -> bool:
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def to_rgb(image: Any) -> Any:
    """A loaded PIL image as 8-bit RGB (see the module docstring); ValueError for pixels of no known scale."""
    from PIL import Image

    if image.mode in _INTEGER_MODES or image.mode == "F":
        return _grey_to_rgb(image)
    if _has_transparency(image):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:] / _MAX_8BIT
        rgb = rgba[..., :3] * alpha + np.asarray(BACKGROUND, dtype=np.float32) * (1.0 - alpha)
        return Image.fromarray(np.rint(rgb).astype(np.uint8))
    return image.convert("RGB")


def read_rgb(path: str | os.PathLike) -> Any:
    """The image file ``path`` as an 8-bit RGB PIL image; DyditError naming the file if it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return to_rgb(im)  # converting loads the pixels (a new image: the file can close)
    except Exception as e:  # noqa: BLE001 - PIL on a broken or hostile file: OSError, bombs, ValueError...
        raise DyditError(f"cannot read image {path}: {e}") from None


def check_image(path: str | os.PathLike) -> tuple[int, int] | str:
    """Decode all of ``path``: its (width, height), or why it cannot be read (a one-line reason).

    JPEGs are decoded at 1/8 scale (PIL's draft mode), which reads every byte and so finds a
    truncated file at a fraction of the cost.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            size = im.size
            if im.format == "JPEG":
                im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()
            to_rgb(im)
            return size
    except Exception as e:  # noqa: BLE001 - as in read_rgb
        return f"{e}".strip().splitlines()[0] if str(e).strip() else type(e).__name__


def header_size(path: str | os.PathLike) -> tuple[int, int] | str:
    """The (width, height) ``path``'s header gives, or why it cannot be read (nothing decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:  # noqa: BLE001 - as in read_rgb
        return f"{e}".strip().splitlines()[0] if str(e).strip() else type(e).__name__
