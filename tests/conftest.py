"""Shared fixtures: tiny model configs that run in milliseconds on a 2-core CPU."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from dydit.presets import ModelConfig

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py`` imported as module ``name``, with its folder on sys.path
    as when it runs as a script (so it imports its siblings, e.g. ``frontier``, by name)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


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


def _torch_flags() -> tuple[int, bool, bool]:
    return (
        torch.get_num_threads(),
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )


def _set_torch_flags(flags: tuple[int, bool, bool]) -> None:
    threads, matmul_tf32, cudnn_tf32 = flags
    torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    torch.backends.cudnn.allow_tf32 = cudnn_tf32


@pytest.fixture(scope="session", autouse=True)
def _two_threads():
    """At most two torch threads for the session (quiet and predictable on small machines); the
    previous count is restored at the end, so importing this file changes nothing."""
    before = _torch_flags()
    torch.set_num_threads(max(1, min(2, before[0])))
    yield
    _set_torch_flags(before)


@pytest.fixture(autouse=True)
def _seed_and_restore_flags():
    """Seed torch; afterwards put back the thread count and TF32 flags a test (or an entry point it
    called, e.g. ``configure_torch``) may have changed."""
    before = _torch_flags()
    torch.manual_seed(0)
    yield
    _set_torch_flags(before)


@pytest.fixture
def one_thread():
    """Run the test with one torch thread (training on a busy 2-core machine; bitwise comparisons)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
