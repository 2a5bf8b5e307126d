"""The files of a sample directory: per-image PNG/``.npy``, the run manifest, the ADM ``.npz``, grids.

Every file goes through :func:`dydit.io.atomic_write`, so a reader, a rerun or a crash never meets
half a file: per-image files with ``durable=False`` (no fsync per image; :func:`clean_directory`
removes what killed writers left, once per command), the manifest, the ``.npz`` and grids durably.
:func:`dydit.sample.sample_to_dir` decides what to write; this module knows how.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dydit import distributed
from dydit.errors import DyditError
from dydit.io import atomic_write, remove_stale_temps_in, save_npz, save_text, write_with_file

MANIFEST = "sampling.json"
_INDEX_DIGITS = 6  # file names 000000.png ... as in DiT's sample_ddp.py


def image_name(index: int, suffix: str) -> str:
    return f"{index:0{_INDEX_DIGITS}d}{suffix}"


def save_png(path: Path, image: np.ndarray) -> None:
    """Write one (H, W, C) uint8 image (C = 1 or 3) as a PNG, atomically."""
    from PIL import Image

    if image.shape[-1] not in (1, 3):
        raise DyditError(f"cannot write a {image.shape[-1]}-channel image as PNG; decode latents with a VAE")
    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    atomic_write(path, write_with_file(lambda f: img.save(f, format="PNG")), durable=False)


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write one sample in model space (float32 (C, H, W)) as ``.npy``, atomically."""
    atomic_write(path, write_with_file(lambda f: np.save(f, array)), durable=False)


def load_png(path: Path) -> np.ndarray:
    """(H, W, C) uint8 of a PNG written by :func:`save_png`."""
    from PIL import Image

    with Image.open(path) as img:
        arr = np.asarray(img)
    return arr[..., None] if arr.ndim == 2 else arr


def clean_directory(out: Path) -> None:
    """Remove the temporary files that killed writers left in ``out`` (every rank, then a barrier,
    so no rank's cleaning meets another's first write)."""
    remove_stale_temps_in(out)
    distributed.barrier()


def digest(values: Sequence[int] | np.ndarray) -> str:
    """A short content hash of a list of integers (seeds, labels) for the manifest."""
    return hashlib.sha256(np.asarray(values, dtype=np.int64).tobytes()).hexdigest()[:16]


def check_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Refuse to mix images of different runs in one directory (all ranks check, rank 0 writes)."""
    path = out / MANIFEST
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        if diff:
            raise DyditError(
                f"{out} holds samples of another run (differs in: {', '.join(diff)}); use another directory"
            )
    distributed.barrier()
    if distributed.is_main() and not path.exists():
        save_text(path, json.dumps(manifest, indent=2, sort_keys=True))
    distributed.barrier()


def pack_npz(
    out_dir: Path, num_images: int, labels: np.ndarray, npz_path: Path, progress: bool = True
) -> Path:
    """Stack ``000000.png`` ... into an ADM-format npz: ``arr_0`` (N, H, W, C) uint8, ``arr_1`` (N,) int64
    (with a progress bar unless ``progress`` is false)."""
    if num_images < 1:
        raise DyditError(f"cannot pack {npz_path}: no images")
    missing = [i for i in range(num_images) if not (out_dir / image_name(i, ".png")).exists()]
    if missing:
        raise DyditError(
            f"cannot pack {npz_path}: {len(missing)} images missing (e.g. {image_name(missing[0], '.png')})"
        )
    first = load_png(out_dir / image_name(0, ".png"))
    arr = np.empty((num_images, *first.shape), dtype=np.uint8)
    for i in tqdm(range(num_images), desc="packing npz", unit="img", leave=False, disable=not progress):
        arr[i] = load_png(out_dir / image_name(i, ".png"))
    return save_npz(npz_path, {"arr_0": arr, "arr_1": labels.astype(np.int64)})


def save_grid(
    path: str | os.PathLike,
    images: np.ndarray,
    labels: Sequence[int] | None = None,
    columns: int | None = None,
    min_tile: int = 64,
) -> Path:
    """Save (N, H, W, C) uint8 images as one grid PNG, each tile captioned with its class label.

    Tiles are upscaled by an integer factor (nearest) to at least ``min_tile`` pixels.
    """
    from PIL import Image, ImageDraw

    n, h, w, c = images.shape
    if c not in (1, 3):
        raise DyditError(f"cannot draw {c}-channel samples; decode latents with a VAE (--vae)")
    cols = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    k = max(1, -(-min_tile // max(h, w)))
    th, tw, cap, pad = h * k, w * k, 12 if labels is not None else 0, 2
    grid = Image.new("RGB", (cols * (tw + pad) + pad, rows * (th + cap + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        tile = Image.fromarray(images[i, ..., 0] if c == 1 else images[i]).convert("RGB")
        x0, y0 = pad + (i % cols) * (tw + pad), pad + (i // cols) * (th + cap + pad)
        grid.paste(tile.resize((tw, th), Image.NEAREST), (x0, y0 + cap))
        if labels is not None:
            draw.text((x0 + 1, y0), str(int(labels[i])), fill="black")
    return atomic_write(path, write_with_file(lambda f: grid.save(f, format="PNG")))
