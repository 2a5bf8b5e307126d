"""A small Fashion-MNIST classifier whose features give a Fréchet distance for 28x28 grey images.

Inception-v3 was trained on ImageNet photographs; on 28x28 clothing silhouettes upsampled to
299x299 its features are a weak, slow yardstick. This CNN (about 0.45 M parameters) is trained
on the Fashion-MNIST training set in a minute or two on a CPU, deterministically from a fixed
seed, and cached under the dydit cache directory. Its 128-d penultimate features give the
Fréchet distance reported as ``FD-FMNIST-classifier`` (never as FID: the numbers are not
comparable with Inception FIDs), its logits an Inception-Score analogue and, for class-conditional
samples, the accuracy with which the samples show the class they were generated for.

Inputs: uint8 (B, H, W, C); colour is averaged to grey; 32x32 images (the project's Fashion-MNIST
layout, padded on black) are centre-cropped to 28x28 and other sizes resized (bilinear, antialiased).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from dydit.checkpoint import file_sha256
from dydit.errors import DyditError
from dydit.evaluate.features import FeatureNet
from dydit.io import atomic_write, locked_dir

# Bump when the architecture or recipe changes: cached weights of another version are retrained.
CLASSIFIER_VERSION = 1
CLASSIFIER_NAME = "FMNIST-classifier"
IMAGE_SIZE = 28
# The data pipeline pads Fashion-MNIST to this size; the classifier crops the padding off again.
PADDED_SIZE = 32
FEATURE_DIM = 128
NUM_CLASSES = 10
_EPOCHS, _BATCH, _LR, _SEED = 3, 128, 2e-3, 0


class FashionCNN(nn.Module):
    """conv16-pool-conv32-pool-conv64 (7x7) -> 128-d features -> 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 7 * 7, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        """(B, 1, 28, 28) in [-1, 1] -> (B, 128) pre-activation features."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 16, 14, 14)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 32, 7, 7)
        x = F.relu(self.conv3(x))  # (B, 64, 7, 7)
        return self.fc(x.flatten(1))  # (B, 128)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.features(x)))  # (B, 10)


def to_classifier_input(images: Tensor) -> Tensor:
    """uint8 (B, H, W, C) -> float (B, 1, 28, 28) in [-1, 1]."""
    x = images.permute(0, 3, 1, 2).float().mean(dim=1, keepdim=True) / 127.5 - 1.0
    if x.shape[-2:] == (PADDED_SIZE, PADDED_SIZE):
        border = (PADDED_SIZE - IMAGE_SIZE) // 2
        x = x[..., border : border + IMAGE_SIZE, border : border + IMAGE_SIZE]
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(
            x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False
        )
    return x


def train_classifier(
    epochs: int = _EPOCHS, seed: int = _SEED, progress: bool = True, max_images: int | None = None
) -> tuple[FashionCNN, float]:
    """Train on the Fashion-MNIST training set (its first ``max_images``, default all).

    Returns the model in eval mode and its accuracy on the test set.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: threads gain little, and oversubscribed CPUs lose a lot
    try:
        return _train(epochs, seed, progress, max_images)
    finally:
        torch.set_num_threads(threads)


def _train(epochs: int, seed: int, progress: bool, max_images: int | None) -> tuple[FashionCNN, float]:
    from dydit.data.fashion_mnist import load_fashion_mnist

    train = load_fashion_mnist(split="train", image_size=IMAGE_SIZE)
    test = load_fashion_mnist(split="test", image_size=IMAGE_SIZE)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = FashionCNN()
    opt = torch.optim.Adam(model.parameters(), lr=_LR)
    x_train = train.images[:max_images].float() / 127.5 - 1.0  # (60000, 1, 28, 28)
    y_train = train.labels[:max_images]
    steps = epochs * (len(x_train) // _BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=_LR, total_steps=steps)
    bar = tqdm(total=steps, desc=f"training {CLASSIFIER_NAME}", disable=not progress, leave=False)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(len(x_train) // _BATCH):
            idx = order[i * _BATCH : (i + 1) * _BATCH]
            flip = torch.rand(len(idx), 1, 1, 1, generator=gen) < 0.5  # flips keep clothes' labels
            x = torch.where(flip, x_train[idx].flip(-1), x_train[idx])
            loss = F.cross_entropy(model(x), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()
    with torch.inference_mode():
        x_test = test.images.float() / 127.5 - 1.0
        pred = torch.cat([model(x_test[i : i + 1000]).argmax(1) for i in range(0, len(x_test), 1000)])
    return model, (pred == test.labels).float().mean().item()


def classifier_path(cache_dir: Path) -> Path:
    return cache_dir / f"fmnist-classifier-v{CLASSIFIER_VERSION}.safetensors"


def load_classifier(
    cache_dir: Path, device: str | torch.device = "cpu", progress: bool = True
) -> ClassifierFeatures:
    """The cached classifier, trained first (once, about a minute on a CPU) if it is not cached yet.

    Training and writing happen under the cache's lock: a second process that needs the classifier
    meanwhile waits, then loads it (:func:`dydit.io.locked_dir` with ``wait=True``).
    """
    from safetensors.torch import load_file, save_file

    path = classifier_path(cache_dir)
    if not path.is_file():
        with locked_dir(cache_dir, wait=True):
            if not path.is_file():  # not trained by the process we may have waited for
                start = time.perf_counter()
                model, accuracy = train_classifier(progress=progress)
                meta = {"version": str(CLASSIFIER_VERSION), "test_accuracy": f"{accuracy:.4f}"}
                atomic_write(path, lambda tmp: save_file(model.state_dict(), tmp, metadata=meta))
                if progress:
                    print(
                        f"trained {CLASSIFIER_NAME} in {time.perf_counter() - start:.0f} s "
                        f"(test accuracy {accuracy:.3f}); cached at {path}"
                    )
    model = FashionCNN()
    try:
        model.load_state_dict(load_file(str(path)))
    except (RuntimeError, OSError) as e:
        raise DyditError(f"cached classifier {path} is unreadable ({e}); delete it to retrain") from None
    return ClassifierFeatures(model, f"fmnist-classifier-{file_sha256(path)[:16]}", device)


class ClassifierFeatures(FeatureNet):
    """The Fashion-MNIST CNN as a feature network: ``pool`` (B, 128) features and ``logits`` (B, 10)."""

    outputs = frozenset({"pool", "logits"})

    def __init__(self, model: FashionCNN, name: str, device: str | torch.device = "cpu"):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.name = name

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> dict[str, Tensor]:
        x = to_classifier_input(images.to(self.device))
        features = self.model.features(x)
        return {"pool": features.float(), "logits": self.model.head(F.relu(features)).float()}


def predict(net: ClassifierFeatures, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Class predictions (N,) for uint8 images (N, H, W, C)."""
    out = [
        net(torch.from_numpy(images[i : i + batch_size]))["logits"].argmax(1)
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out).cpu().numpy()
