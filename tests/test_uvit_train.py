"""The training loop pre-trains a U-ViT and fine-tunes it into a DyDiT (docs/METHOD.md §16.3): tiny
runs on the digits data through the command line, then sampling from the export without --model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import load_benchmark

import dydit
from dydit.cli import main
from dydit.models.dydit import DyDiT
from dydit.models.uvit import UViT

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--model-option", "depth=2", "--model-option", "hidden_size=32", "--model-option", "num_heads=2"]
COMMON = ["--data", "digits", "--batch-size", "8", "--no-progress", "--device", "cpu"]


def test_pretrain_finetune_and_sample_a_tiny_u_vit(tmp_path, capsys):
    base, dy = tmp_path / "uvit", tmp_path / "dy"
    assert (
        main(["train", "--model", "U-ViT-Ti/2", *TINY, *COMMON, "--steps", "3", "--out-dir", str(base)]) == 0
    )
    net = dydit.load_model(base / "ema.safetensors")  # the stored config says U-ViT, VP-SDE
    assert isinstance(net, UViT) and (net.config.depth, net.config.input_size) == (2, 8)
    assert net.config.process == "vpsde" and net.config.class_dropout_prob == 0.1
    args = ["finetune", "--init-from", str(base / "ema.safetensors"), "--target", "0.5", *COMMON]
    assert (
        main([*args, "--steps", "3", "--complete-steps", "2", "--distill-weight", "1", "--out-dir", str(dy)])
        == 0
    )
    model = dydit.load_model(dy / "ema.safetensors")
    assert isinstance(model, DyDiT) and isinstance(model.backbone, UViT) and model.config.dynamic
    keys = set(model.state_dict()) - set(net.state_dict())
    assert keys and all("_rate." in k or "token_selection" in k for k in keys)
    grid = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(dy / "ema.safetensors"), "--num-samples", "2", "--steps", "3",
                 "--device", "cpu", "--no-progress", "--grid", str(grid)]) == 0  # fmt: skip
    assert grid.is_file()
    x = torch.randn(2, 1, 8, 8)
    assert torch.isfinite(model(x, torch.tensor([999.0, 10.0]), torch.tensor([1, 2]))).all()


@pytest.mark.skipif(not FMNIST.exists(), reason="Debian's dataset-fashion-mnist is not installed")
def test_shipped_u_vit_predicts_the_noise_near_pure_noise():
    """The shipped U-ViT-Ti/4 (assets/README.md) is trained: near pure noise its ε-error is a small
    fraction of an untrained network's (benchmarks/eps_error.py measures 0.0003 at α = 0.007)."""
    eps_error = load_benchmark("eps_error")
    path = Path(dydit.__file__).parent / "assets" / "uvit-ti4-fmnist.safetensors"
    model = dydit.load_model(path).eval()
    assert isinstance(model, UViT) and model.config.process == "vpsde"
    from dydit.data import make_dataset

    ds = make_dataset("fashion-mnist", image_size=32)
    x0 = torch.stack([ds[i][0] for i in range(64)])
    y = torch.tensor([ds[i][1] for i in range(64)])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    (alpha, err), (_, err_mid) = eps_error.eps_errors(model, x0, y, noise, [0.007, 0.44])
    assert abs(alpha - 0.007) < 1e-3
    assert err < 0.002 and err_mid < 0.05, (err, err_mid)  # untrained: about 1
