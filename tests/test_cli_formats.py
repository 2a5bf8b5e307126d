"""Every accepted checkpoint format through every command that reads one: ``sample``, ``flops
--checkpoint``, ``finetune --init-from`` and ``inspect`` (a DiT-Ti/4 saved six ways)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_checkpoint_formats import save_official

import dydit
from dydit.checkpoint import load_checkpoint
from dydit.checkpoint.export import export_diffusers
from dydit.cli import main
from dydit.train.config import TrainConfig

FORMATS = ["raw", "training_dict", "safetensors", "export", "diffusers", "pipeline"]
LABELS = {
    "raw": "raw state dict",
    "training_dict": "training dict",
    "safetensors": ".safetensors state dict without a config",
    "export": "dydit .safetensors export",
    "diffusers": "diffusers DiTTransformer2DModel folder",
    "pipeline": "diffusers DiTTransformer2DModel folder",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("formats")
    torch.manual_seed(0)
    model = dydit.create_model("DiT-Ti/4")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.02)
    sd = model.state_dict()
    out = {"raw": d / "DiT-Ti-4.pt", "training_dict": d / "0001000.pt", "safetensors": d / "bare.safetensors"}
    torch.save(sd, out["raw"])
    args = argparse.Namespace(model="DiT-Ti/4", image_size=32, num_classes=10, global_seed=0)
    save_official(out["training_dict"], model, args, step=False)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out["safetensors"]))
    out["export"] = d / "ema.safetensors"
    meta = {"config": json.dumps({"model": model.config.to_dict(), "step": 1000}), "format": "pt"}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out["export"]), metadata=meta)
    out["diffusers"], _ = export_diffusers(out["raw"], d / "hf")
    out["pipeline"] = d / "pipe"
    export_diffusers(out["raw"], out["pipeline"] / "transformer")
    (out["pipeline"] / "model_index.json").write_text('{"_class_name": "DiTPipeline"}')
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_inspect_says_what_each_format_is(fmt, files, capsys) -> None:
    assert main(["inspect", str(files[fmt])]) == 0
    out = capsys.readouterr().out
    assert f"format      {LABELS[fmt]}" in out
    assert (
        "model       DiT-Ti/4: DiT, 6 blocks, width 192, 6 heads, patch 4, input 1x32x32, 10 classes" in out
    )
    assert "loads       strictly" in out and "parameters  " in out
    shift = 1 if fmt in ("diffusers", "pipeline") else 0
    assert f"frequency shift {shift}" in out
    if fmt == "training_dict":
        assert "step        1,000 (from the file name)" in out and "args        model='DiT-Ti/4'" in out
        assert "training args (model DiT-Ti/4)" in out
    if fmt == "export":
        assert "step        1,000" in out and "stored      depth=6 hidden_size=192" in out


def test_inspect_fails_when_the_weights_do_not_load(files, tmp_path, capsys) -> None:
    """``inspect`` printed "loads NO" and exited 0: scripts could not tell. The description is still
    printed; the last line is the error and the status is 1."""
    from safetensors.torch import load_file

    sd = load_file(str(files["export"]))
    del sd["final_layer.linear.bias"]
    path = tmp_path / "broken.safetensors"
    meta = {"config": json.dumps({"model": dydit.get_model_config("DiT-Ti/4").to_dict()})}
    save_file(sd, str(path), metadata=meta)
    assert main(["inspect", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "loads       NO: " in out and "final_layer.linear.bias" in out
    assert err.strip().splitlines() == [
        f"dydit inspect: error: {path} does not load: " + err.split(": ", 3)[3].strip()
    ]
    assert "final_layer.linear.bias" in err


@pytest.mark.parametrize("fmt", FORMATS)
def test_sample_flops_and_finetune_accept_every_format(fmt, files, tmp_path, capsys) -> None:
    path = str(files[fmt])
    grid = tmp_path / "grid.png"
    run = ["--steps", "1", "--num-samples", "1", "--cfg-scale", "1", "--device", "cpu", "--no-progress"]
    assert main(["sample", "--checkpoint", path, *run, "--grid", str(grid)]) == 0
    assert grid.is_file()
    assert main(["flops", "--checkpoint", path]) == 0
    assert capsys.readouterr().out.startswith("DiT-Ti/4: input 1x32x32, 64 tokens")
    assert main(["finetune", "--init-from", path, "--target", "0.5", "--dry-run"]) == 0
    cfg = TrainConfig.from_dict(json.loads(capsys.readouterr().out))
    expected = {"timestep_freq_shift": 1} if fmt in ("diffusers", "pipeline") else {}
    assert cfg.model == "DyDiT-Ti/4" and cfg.model_overrides == expected
    # Naming the preset keeps the weights' numerics too (a diffusers folder stays in diffusers').
    assert main(["finetune", "--init-from", path, "--model", "DiT-Ti/4", "--target", "0.5", "--dry-run"]) == 0
    assert TrainConfig.from_dict(json.loads(capsys.readouterr().out)).model_overrides == expected


@pytest.mark.parametrize("fmt", ["training_dict", "diffusers"])
def test_finetune_from_official_and_diffusers_files(fmt, files, tmp_path, capsys) -> None:
    out = tmp_path / "ft"
    args = ["finetune", "--init-from", str(files[fmt]), "--target", "0.5", "--data", "digits",
            "--image-size", "32", "--batch-size", "2", "--steps", "1", "--device", "cpu", "--no-progress",
            "--out-dir", str(out)]  # fmt: skip
    assert main(args) == 0
    tuned = dydit.load_model(out / "ema.safetensors")
    assert tuned.config.dynamic and tuned.config.timestep_freq_shift == (1 if fmt == "diffusers" else 0)
    start = load_checkpoint(files[fmt])
    assert start.keys() < tuned.state_dict().keys()  # the same backbone, with routers added


def test_sampling_a_sit_with_ddpm_is_one_line(capsys) -> None:
    assert main(["sample", "--model", "SiT-S/8", "--random-weights", "--sampler", "ddpm", "--dry-run"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ddpm is a DDPM sampler and this is a flow-matching (SiT) model" in err[0]
    assert (
        main(["sample", "--model", "SiT-S/8", "--random-weights", "--dry-run", "--vae", "x"]) == 0
    )  # default: euler
    assert '"sampler": "euler"' in capsys.readouterr().out
    assert main(["sample", "--model", "DiT-S/8", "--random-weights", "--sampler", "heun", "--dry-run"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "heun is a flow-matching sampler and this is a DDPM model" in err[0]
