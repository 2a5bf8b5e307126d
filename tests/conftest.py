"""Shared fixtures: tiny model configs that run in milliseconds on a 2-core CPU."""

from __future__ import annotations

import pytest
import torch

from dydit.presets import ModelConfig

# Keep the suite quiet and predictable on small machines.
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def tiny_config(**overrides) -> ModelConfig:
    """A 2-block, 2-head DiT on 8x8x4 inputs with 4 classes."""
    base = dict(
        depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=4, num_classes=4
    )
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_config()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Run the test with one torch thread (training on a busy 2-core machine; bitwise comparisons)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
