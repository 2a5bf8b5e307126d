"""Building a latent cache from an image dataset, once (docs/METHOD.md §1.1).

Beside :mod:`dydit.data.latents` rather than in it: the cache reads a dataset made by
:func:`dydit.data.make_dataset`, which itself opens latent caches, so the builder sits above both.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from dydit.data import make_dataset
from dydit.data.codec import make_codec
from dydit.data.latents import META_FILE, encode_dataset
from dydit.errors import DyditError


def build_latent_cache(
    data: str,
    cache_dir: str | os.PathLike,
    *,
    vae: str | None,
    image_size: int | None = None,
    fit: str = "pad",
    flip: bool | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> Path:
    """Encode the dataset ``data`` with the AutoencoderKL ``vae`` into ``cache_dir``, once.

    A complete cache already there is kept as it is (rerunning a training command reuses it). The
    cache is built by one process: under torchrun, build it first without torchrun. Posterior
    samples are drawn from a generator seeded with ``seed``, so a rebuilt cache is the same.

    Args:
        data: a dataset spec of :func:`dydit.data.make_dataset` (``fashion-mnist``, ``folder:PATH``).
        vae: a local AutoencoderKL path or hub id (required to build a cache).
        image_size, fit: how images reach the VAE's input size.
        flip: also cache the latents of mirrored images (default: the dataset's own setting).
    Returns: the cache directory.
    """
    if (Path(cache_dir) / META_FILE).exists():
        return Path(cache_dir)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        raise DyditError(f"no latent cache in {cache_dir} yet: build it once without torchrun")
    if not vae:
        raise DyditError(
            "--cache-latents needs --vae (a local AutoencoderKL path or hub id) to build the cache"
        )
    dataset = make_dataset(data, image_size, fit, progress=progress)
    codec = make_codec(vae, device=device)
    flip = dataset.info.flip if flip is None else flip
    generator = torch.Generator(device).manual_seed(seed)  # posterior samples, reproducibly
    encode = functools.partial(codec.encode, generator=generator)
    return encode_dataset(dataset, encode, cache_dir, codec=vae, flip=flip, device=device, progress=progress)
