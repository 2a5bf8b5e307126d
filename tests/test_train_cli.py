"""``dydit train`` / ``finetune`` / ``export`` from the command line: dry runs, errors, latent caches."""

from __future__ import annotations

import json
import re

import pytest
import torch

from dydit.checkpoint import checkpoint_config, load_checkpoint
from dydit.cli import main
from dydit.factory import build_model
from dydit.presets import get_model_config
from dydit.train.config import TrainConfig
from dydit.train.state import export_weights

TINY_OPTS = ["--model-option", "depth=1", "--model-option", "hidden_size=32", "--model-option", "num_heads=2"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def dit_export(tmp_path):
    mc = get_model_config("DiT-Ti/2", input_size=8, num_classes=10, depth=1, hidden_size=32, num_heads=2)
    path = tmp_path / "dit.safetensors"
    export_weights(path, build_model(mc), {"model": mc.to_dict()})
    return path


def test_train_dry_run_prints_the_config(capsys, tmp_path):
    assert main(["train", "--data", "digits", *TINY_OPTS, "--steps", "7", "--bf16", "--dry-run",
                 "--out-dir", str(tmp_path / "r")]) == 0  # fmt: skip
    cfg = TrainConfig.from_dict(json.loads(capsys.readouterr().out))
    assert (
        cfg.steps == 7 and cfg.bf16 and cfg.model_overrides == {"depth": 1, "hidden_size": 32, "num_heads": 2}
    )
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_help_and_docs_name_the_guard_that_reproduces_the_released_finetuning(command, capsys):
    """The default stays ``clip``; ``--help`` and TRAINING.md say ``skip`` is the released stage-2 rule."""
    from pathlib import Path

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(re.sub(r"-\n\s*", "-", capsys.readouterr().out).split())  # argparse wraps at hyphens
    assert "(default clip)" in text and "reproduces the released DyDiT fine-tuning" in text
    doc = (Path(__file__).resolve().parents[1] / "docs" / "TRAINING.md").read_text()
    assert "`--grad-guard skip --grad-threshold 200`" in doc and "Why `clip` stays the default" in doc


def test_finetune_takes_the_model_from_the_checkpoint(capsys, dit_export):
    assert main(["finetune", "--init-from", str(dit_export), "--target", "0.5", "--dry-run"]) == 0
    cfg = TrainConfig.from_dict(json.loads(capsys.readouterr().out))
    assert cfg.dynamic and cfg.target == 0.5 and cfg.use_stratified_t
    assert cfg.model_config().replace(dynamic=False) == checkpoint_config(dit_export)


def test_finetune_errors(capsys, tmp_path, dit_export):
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--init-from", str(dit_export), "--target", "0", "--dry-run"])
    assert e.value.code == 2 and "must be in (0, 1]" in capsys.readouterr().err
    raw = tmp_path / "raw.pt"
    torch.save(load_checkpoint(dit_export), raw)  # a plain state dict: no config
    assert main(["finetune", "--init-from", str(raw), "--target", "0.5", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "cannot tell which model" in err and "stores no config" in err and "name the model (--model" in err


def test_missing_dataset_is_one_line(capsys, tmp_path):
    code = main(["train", "--data", f"fashion-mnist:{tmp_path}", "--out-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "apt-get install dataset-fashion-mnist" in err[-1]


def test_train_finetune_export(capsys, tmp_path):
    run = ["--data", "digits", "--batch-size", "8", "--steps", "2", "--no-progress", "--device", "cpu"]
    assert main(["train", *run, *TINY_OPTS, "--out-dir", str(tmp_path / "dit")]) == 0
    export = tmp_path / "dit" / "ema.safetensors"
    assert main(["finetune", *run, "--init-from", str(export), "--target", "0.7", "--complete-steps", "1",
                 "--out-dir", str(tmp_path / "dydit")]) == 0  # fmt: skip
    assert main(["export", str(tmp_path / "dydit"), "--weights", "model"]) == 0
    raw = tmp_path / "dydit" / "checkpoints" / "model.safetensors"
    assert str(raw) in capsys.readouterr().out
    cfg = checkpoint_config(raw)
    assert cfg.dynamic
    build_model(cfg).load_state_dict(load_checkpoint(raw))


def test_latent_cache_then_train(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL
    from PIL import Image

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16,
    )  # fmt: skip
    vae.save_pretrained(tmp_path / "vae")
    for i in range(8):
        (tmp_path / "img" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20 + i, 18), (30 * i, 100, 200 - 20 * i)).save(
            tmp_path / "img" / f"c{i % 2}" / f"{i}.png"
        )
    cache = tmp_path / "cache"
    args = [
        "train", "--data", f"folder:{tmp_path / 'img'}", "--image-size", "16", "--cache-latents", str(cache),
        "--vae", str(tmp_path / "vae"), *TINY_OPTS, "--batch-size", "4", "--steps", "2", "--no-progress",
        "--device", "cpu", "--out-dir", str(tmp_path / "run"),
    ]  # fmt: skip
    assert main(args) == 0
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["count"] == 8 and meta["latent_size"] == 8 and meta["channels"] == 4 and meta["flip"]
    cfg = checkpoint_config(tmp_path / "run" / "ema.safetensors")
    assert (cfg.in_channels, cfg.input_size, cfg.num_classes) == (4, 8, 2)
    exported = json.loads((tmp_path / "run" / "config.json").read_text())
    assert exported["data"]["codec"] == str(tmp_path / "vae")
    # The cache is built once: a second run (the resume) does not touch it.
    stamp = (cache / "meta.json").stat().st_mtime_ns
    assert main(args) == 0 and (cache / "meta.json").stat().st_mtime_ns == stamp


# Image folders: the size the model or the images fix ---------------------------------------------------
def _image_folder(root, size: tuple[int, int], n: int = 4) -> str:
    from PIL import Image

    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (40 * i, 90, 200)).save(root / f"c{i % 2}" / f"{i}-{size[0]}.png")
    return f"folder:{root}"


def _dry_run_size(capsys, args: list[str]) -> int | None:
    capsys.readouterr()  # what runs before printed
    assert main([*args, "--dry-run"]) == 0
    return json.loads(capsys.readouterr().out)["image_size"]


def test_folder_trains_at_the_size_the_model_or_the_images_fix(capsys, tmp_path):
    """Not 256: --image-size, else the model's input size (--model-option, --init-from), else the images'."""
    data = _image_folder(tmp_path / "img", (16, 16))
    run = [
        "--data",
        data,
        *TINY_OPTS,
        "--batch-size",
        "2",
        "--steps",
        "1",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert _dry_run_size(capsys, ["train", *run, "--out-dir", str(tmp_path / "a")]) == 16
    assert _dry_run_size(capsys, ["train", *run, "--image-size", "8", "--out-dir", str(tmp_path / "a")]) == 8
    fixed = [*run, "--model-option", "input_size=8", "--out-dir", str(tmp_path / "b")]
    assert _dry_run_size(capsys, ["train", *fixed]) == 8
    assert main(["train", *fixed]) == 0
    assert checkpoint_config(tmp_path / "b" / "ema.safetensors").input_size == 8
    mc = get_model_config("DiT-Ti/2", input_size=8, in_channels=3, num_classes=2, depth=1, hidden_size=32,
                          num_heads=2)  # fmt: skip
    weights = tmp_path / "w.safetensors"
    export_weights(weights, build_model(mc), {"model": mc.to_dict()})
    init = [*run, "--init-from", str(weights), "--out-dir", str(tmp_path / "c")]
    assert _dry_run_size(capsys, ["train", *init]) == 8
    finetune = ["finetune", *init, "--target", "0.5"]
    assert _dry_run_size(capsys, finetune) == 8
    assert main(finetune) == 0
    assert checkpoint_config(tmp_path / "c" / "ema.safetensors").input_size == 8


def test_resumed_folder_run_keeps_its_size(capsys, tmp_path):
    """The images' most common size may change between runs; a resumed model's size does not."""
    data = _image_folder(tmp_path / "img", (16, 16), n=2)
    args = ["train", "--data", data, *TINY_OPTS, "--batch-size", "2", "--no-progress", "--device", "cpu",
            "--out-dir", str(tmp_path / "r")]  # fmt: skip
    assert main([*args, "--steps", "1"]) == 0
    _image_folder(tmp_path / "img", (8, 8), n=4)  # now most images are 8x8
    assert _dry_run_size(capsys, [*args, "--steps", "2"]) == 16
    assert main([*args, "--steps", "2"]) == 0
    assert checkpoint_config(tmp_path / "r" / "ema.safetensors").input_size == 16
    assert _dry_run_size(capsys, [*args, "--steps", "2", "--out-dir", str(tmp_path / "new")]) == 8
