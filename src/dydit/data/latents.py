"""A sharded on-disk cache of VAE latents: encode a dataset once, then train on the latents.

DiT encodes every image with the Stable Diffusion VAE on the fly (docs/METHOD.md §1.6, §6.2); for
repeated training runs it is cheaper to encode once (the MAR idea, docs/ARCHITECTURE.md §6.8). The cache holds
latents already multiplied by the latent scale (the codec owns that constant, docs/METHOD.md §1.4) and,
when flipping makes sense, the latents of the mirrored images as well, since a flip in pixel space
is not a flip in latent space.

Layout of a cache directory::

    shard-00000.safetensors   tensors "latents" (n, C, h, w), "labels" (n,), optionally "latents_flip"
    ...
    meta.json                 written last: a cache without it is incomplete
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dydit.data.base import DataInfo, ImageDataset
from dydit.errors import DyditError
from dydit.io import atomic_write, locked_dir, save_text

META_FILE = "meta.json"
CACHE_FORMAT = "dydit-latents"
CACHE_VERSION = 1
DEFAULT_SHARD_SIZE = 4096
# Caches up to this size are loaded into memory and batched without DataLoader workers.
IN_MEMORY_BYTES = 4 * 2**30
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


@torch.no_grad()
def encode_dataset(
    dataset: ImageDataset,
    encode: Callable[[Tensor], Tensor],
    out_dir: str | os.PathLike,
    *,
    codec: str,
    batch_size: int = 64,
    shard_size: int = DEFAULT_SHARD_SIZE,
    flip: bool | None = None,
    dtype: str = "float16",
    device: str = "cpu",
    num_workers: int = 0,
    progress: bool = True,
) -> Path:
    """Encode every image of ``dataset`` with ``encode`` (e.g. ``VAECodec.encode``) into a cache.

    Args:
        dataset: pixel images (C, H, W) in [-1, 1].
        encode: images (B, C, H, W) on ``device`` -> scaled latents (B, c, h, w).
        out_dir: cache directory (created; an existing complete cache is an error, and so is
            another process encoding into it: :func:`dydit.io.locked_dir`).
        codec: the codec spec recorded in ``meta.json`` (what decodes these latents).
        flip: also store the latents of mirrored images (default: ``dataset.info.flip``).
        dtype: storage dtype of the latents, ``float16`` (default), ``bfloat16`` or ``float32``.

    Returns: the cache directory.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    if dtype not in _DTYPES:
        raise DyditError(f"latent cache dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if len(dataset) == 0:
        raise DyditError(f"dataset {dataset.info.name!r} is empty; nothing to encode")
    with locked_dir(out):  # one encoder per cache directory; a second one stops at once
        if (out / META_FILE).exists():
            raise DyditError(f"{out} already holds a latent cache; choose another directory or delete it")
        flip = dataset.info.flip if flip is None else flip
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers
        )
        writer = _ShardWriter(out, shard_size)
        shape: tuple[int, ...] | None = None
        for x, y in tqdm(loader, desc="encoding latents", unit="batch", disable=not progress):
            x = x.to(device)
            z = encode(x).float().cpu()
            shape = tuple(z.shape[1:])
            flipped = encode(x.flip(-1)).float().cpu().to(_DTYPES[dtype]) if flip else None
            writer.add(z.to(_DTYPES[dtype]), y.long(), flipped)
        shards = writer.close()
        assert shape is not None
        meta = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "count": sum(s["count"] for s in shards),
            "shards": shards,
            "channels": shape[0],
            "latent_size": shape[-1],
            "num_classes": dataset.info.num_classes,
            "codec": codec,
            "source": dataset.info.name,
            "image_size": dataset.info.image_size,
            "flip": bool(flip),
            "dtype": dtype,
        }
        save_text(out / META_FILE, json.dumps(meta, indent=2))  # last
        return out


class _ShardWriter:
    """Collects encoded batches and writes them as shards of ``shard_size`` items, atomically."""

    def __init__(self, out: Path, shard_size: int):
        self.out, self.shard_size = out, shard_size
        self.shards: list[dict[str, Any]] = []
        self.pending: dict[str, list[Tensor]] = {"latents": [], "labels": [], "latents_flip": []}

    def add(self, latents: Tensor, labels: Tensor, latents_flip: Tensor | None) -> None:
        self.pending["latents"].append(latents)
        self.pending["labels"].append(labels)
        if latents_flip is not None:
            self.pending["latents_flip"].append(latents_flip)
        self._flush(final=False)

    def close(self) -> list[dict[str, Any]]:
        """Write what is left; the shards written, in order (for ``meta.json``)."""
        self._flush(final=True)
        return self.shards

    def _flush(self, final: bool) -> None:
        """Write shards of ``shard_size`` items while enough are pending; the rest too when final."""
        from safetensors.torch import save_file

        pending = self.pending
        while (count := sum(len(v) for v in pending["labels"])) >= self.shard_size or (final and count):
            limit = min(count, self.shard_size)
            merged = {k: torch.cat(v) for k, v in pending.items() if v}
            tensors = {k: v[:limit].contiguous() for k, v in merged.items()}
            name = _shard_name(len(self.shards))
            atomic_write(self.out / name, lambda tmp, t=tensors: save_file(t, tmp))
            self.shards.append({"file": name, "count": len(tensors["labels"])})
            for k, v in merged.items():
                pending[k] = [v[limit:]] if len(v) > limit else []


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``meta.json`` of a complete cache, or a DyditError saying what is wrong."""
    root = Path(path)
    if not root.is_dir():
        raise DyditError(f"latent cache {root} does not exist")
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise DyditError(f"latent cache {root} is incomplete ({META_FILE} missing); encode the dataset again")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DyditError(f"cannot read {meta_path}: {e}") from None
    if meta.get("format") != CACHE_FORMAT:
        raise DyditError(f"{meta_path} does not describe a dydit latent cache")
    if not meta.get("count"):
        raise DyditError(f"latent cache {root} is empty")
    return meta


class LatentDataset(ImageDataset):
    """The latents of a cache directory, with the stored flipped copies used for ``flip=True``."""

    def __init__(self, path: str | os.PathLike, in_memory: bool | None = None):
        self.root = Path(path)
        self.meta = read_meta(self.root)
        self.info = DataInfo(
            name=f"latents:{self.root}",
            channels=int(self.meta["channels"]),
            image_size=int(self.meta["latent_size"]),
            num_classes=int(self.meta["num_classes"]),
            codec=str(self.meta["codec"]),
            flip=bool(self.meta["flip"]),
        )
        self._files = [self.root / s["file"] for s in self.meta["shards"]]
        for f in self._files:
            if not f.is_file():
                raise DyditError(f"latent cache {self.root} is missing its shard {f.name}")
        counts = torch.tensor([s["count"] for s in self.meta["shards"]])
        self._starts = torch.cumsum(counts, 0) - counts  # first global index of every shard
        self._count = int(counts.sum())
        item_bytes = int(torch.tensor(0, dtype=_DTYPES[self.meta["dtype"]]).element_size())
        size = (
            self._count
            * item_bytes
            * self.info.channels
            * self.info.image_size**2
            * (2 if self.info.flip else 1)
        )
        self._in_memory = size <= IN_MEMORY_BYTES if in_memory is None else in_memory
        self._handles: dict[int, Any] = {}
        if self._in_memory:
            self._load_all()

    def _load_all(self) -> None:
        from safetensors.torch import load_file

        parts = [load_file(str(f)) for f in self._files]
        self.latents = torch.cat([p["latents"] for p in parts])
        self.labels = torch.cat([p["labels"] for p in parts]).long()
        self.latents_flip = torch.cat([p["latents_flip"] for p in parts]) if self.info.flip else None

    def __len__(self) -> int:
        return self._count

    @property
    def in_memory(self) -> bool:
        return self._in_memory

    def get(self, index: int, flip: bool = False) -> tuple[Tensor, int]:
        if not 0 <= index < self._count:
            raise IndexError(index)
        key = "latents_flip" if flip and self.info.flip else "latents"
        if self._in_memory:
            source = self.latents_flip if key == "latents_flip" else self.latents
            return source[index].float(), int(self.labels[index])
        shard = int(torch.searchsorted(self._starts, torch.tensor(index), right=True)) - 1
        if shard not in self._handles:  # opened lazily, per process (DataLoader workers included)
            from safetensors import safe_open

            self._handles[shard] = safe_open(str(self._files[shard]), framework="pt")
        handle, local = self._handles[shard], index - int(self._starts[shard])
        z = handle.get_slice(key)[local : local + 1][0]
        return z.float(), int(handle.get_slice("labels")[local : local + 1][0])

    def get_batch(self, indices: Tensor, flips: Tensor) -> tuple[Tensor, Tensor]:
        if not self._in_memory:
            return super().get_batch(indices, flips)
        z = self.latents[indices].float()
        if self.latents_flip is not None:
            z = torch.where(flips.view(-1, 1, 1, 1), self.latents_flip[indices].float(), z)
        return z, self.labels[indices]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}  # file handles do not cross process boundaries
        return state
