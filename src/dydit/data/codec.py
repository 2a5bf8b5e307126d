"""Codecs between pixels and the space the diffusion model works in (docs/METHOD.md §1.1, §1.4).

- :class:`PixelCodec`: identity; pixel models diffuse images in [-1, 1] directly.
- :class:`VAECodec`: a Stable Diffusion ``AutoencoderKL`` (f = 8, 4 latent channels for
  ``stabilityai/sd-vae-ft-ema``). ``encode`` returns a posterior sample times ``LATENT_SCALE`` =
  0.18215; ``decode`` divides by it again. The scale lives here and nowhere else.

``make_codec(spec)`` builds one from a spec string: ``None``/``"pixel"``, or a diffusers model
directory / Hub id for the VAE. ``diffusers`` is an optional extra, imported only when a VAE is used.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from dydit.constants import LATENT_SCALE
from dydit.errors import DyditError

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import AutoencoderKL

PIXEL_SPEC = "pixel"


class Codec(Protocol):
    """Maps pixels (B, C, H, W) in [-1, 1] to model space and back."""

    spec: str
    downsample: int  # spatial factor between pixels and model space

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor: ...

    def decode(self, z: Tensor) -> Tensor: ...


class PixelCodec:
    """The identity: the model diffuses pixels in [-1, 1]."""

    spec = PIXEL_SPEC
    downsample = 1

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return x

    def decode(self, z: Tensor) -> Tensor:
        return z.clamp(-1, 1)

    def __repr__(self) -> str:
        return "PixelCodec()"


def _import_autoencoder() -> Any:
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise DyditError(
            "VAE encoding/decoding needs the optional 'diffusers' package: pip install 'dydit[latent]'"
        ) from None
    return AutoencoderKL


class VAECodec:
    """A Stable Diffusion VAE: ``encode(x) = sample(q(z|x)) · s``, ``decode(z) = D(z / s)``, s = LATENT_SCALE.

    Args:
        vae: a diffusers model directory, a Hub id (e.g. ``"stabilityai/sd-vae-ft-ema"``; loaded
            from the local cache when offline) or an ``AutoencoderKL`` instance.
        device: where the VAE runs; inputs are moved there and results stay there.
        scale: latent scale factor (docs/METHOD.md §1.4).
    """

    def __init__(
        self,
        vae: str | os.PathLike | AutoencoderKL,
        device: str | torch.device = "cpu",
        scale: float = LATENT_SCALE,
    ):
        if isinstance(vae, str | os.PathLike):
            autoencoder_cls = _import_autoencoder()
            self.spec = str(vae)
            if self.spec.startswith((os.sep, ".", "~")) and not os.path.isdir(os.path.expanduser(self.spec)):
                raise DyditError(f"VAE directory not found: {self.spec}")
            try:
                vae = autoencoder_cls.from_pretrained(os.path.expanduser(self.spec), low_cpu_mem_usage=False)
            except Exception as e:  # noqa: BLE001 - any loading failure is a user-facing error
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise DyditError(f"cannot load VAE {self.spec!r}: {msg}") from None
        else:
            self.spec = getattr(vae.config, "_name_or_path", "") or "AutoencoderKL"
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.scale = scale
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, 3, H, W) pixels in [-1, 1] -> (B, c, H/f, W/f) scaled latents (a posterior sample)."""
        x = x.to(self.device, self.vae.dtype)
        return self.vae.encode(x).latent_dist.sample(generator=generator) * self.scale

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """(B, c, h, w) scaled latents -> (B, 3, h·f, w·f) pixels clamped to [-1, 1]."""
        z = z.to(self.device, self.vae.dtype)
        return self.vae.decode(z / self.scale).sample.clamp(-1, 1)

    def __repr__(self) -> str:
        return f"VAECodec({self.spec!r}, device={str(self.device)!r})"


def make_codec(spec: str | None, device: str | torch.device = "cpu") -> PixelCodec | VAECodec:
    """``None`` or ``"pixel"``: :class:`PixelCodec`; anything else: a :class:`VAECodec` loaded from it."""
    if spec is None or spec == PIXEL_SPEC:
        return PixelCodec()
    return VAECodec(spec, device)
