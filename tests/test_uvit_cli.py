"""``dydit sample/flops/bench/inspect/export`` take U-ViT models (docs/METHOD.md §16): by preset name,
and an official raw state dict (``nnet.pth``) with or without ``--model``. Tiny models, one test each.
"""

from __future__ import annotations

import json

import pytest
import torch

import dydit
from dydit.cli import main
from dydit.flops.formulas import uvit_macs_table
from dydit.models.dydit import DyDiT
from dydit.models.uvit import UViT
from dydit.presets import get_uvit_config

TINY = "U-ViT-Ti/4"  # 7 blocks of width 192 on 1x32x32, 10 classes + null


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    """A U-ViT-Ti/4 saved as the official scripts save theirs: torch.save(nnet.state_dict())."""
    torch.manual_seed(0)
    net = dydit.create_model(TINY)
    path = tmp_path_factory.mktemp("uvit") / "nnet.pth"
    torch.save(net.state_dict(), path)
    return path, net


def test_flops_prints_the_u_vit_table(capsys):
    assert main(["flops", "--model", "U-ViT-H/2"]) == 0
    out = capsys.readouterr().out
    table = uvit_macs_table(get_uvit_config("U-ViT-H/2"))
    assert out.startswith("U-ViT-H/2: input 4x32x32, 256 tokens")
    assert (
        f"**{sum(table.values()) / 1e9:.2f}**" in out and "| skip_linear |" in out and "| mlp_extras |" in out
    )
    assert round(sum(table.values()) / 1e9) == 133  # the U-ViT paper's GFLOPs of U-ViT-H/2


def test_flops_of_a_dydit_u_vit_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "dy.pth"
    torch.save(dydit.create_model("DyDiT-" + TINY).state_dict(), path)
    assert (
        main(["flops", "--checkpoint", str(path), "--steps", "3", "--samples", "1", "--device", "cpu"]) == 0
    )
    out = capsys.readouterr().out
    assert "router layout forced_first" in out and "on the dpm++ trajectory: 3 timesteps" in out


def test_sample_by_preset_and_from_an_official_file(official_file, tmp_path, capsys):
    path, _ = official_file
    args = ["sample", "--num-samples", "2", "--steps", "3", "--batch-size", "2", "--no-progress"]
    assert main([*args, "--model", "DyDiT-U-ViT-S/2", "--random-weights", "--image-size", "8",
                 "--cfg-scale", "1", "--grid", str(tmp_path / "a.png")]) == 0  # fmt: skip
    assert main([*args, "--checkpoint", str(path), "--out-dir", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b.png").is_file() and len(list((tmp_path / "b").glob("*.png"))) == 2
    meta = json.loads((tmp_path / "b" / "sampling.json").read_text())
    assert meta["model"]["family"] == "U-ViT" and meta["settings"]["sampler"] == "dpm++"  # U-ViT's own
    capsys.readouterr()
    assert main([*args, "--checkpoint", str(path), "--model", "DyDiT-U-ViT-Ti/4", "--sampler", "sde",
                 "--dry-run"]) == 0  # fmt: skip
    plan = json.loads(capsys.readouterr().out)
    assert plan["execution"] == "sliced" and plan["model"]["dynamic"] and plan["sampling"]["sampler"] == "sde"
    assert (
        plan["timesteps"].startswith("3 network times 999..0.99")
        and "(999 s: 999 noise, 0 data)" in plan["timesteps"]
    )


def test_inspect_names_the_u_vit_and_its_process(official_file, capsys):
    path, _ = official_file
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "raw U-ViT state dict" in out and "U-ViT-Ti/4: U-ViT, 7 blocks" in out
    assert "continuous VP-SDE" in out and "strictly, every key and shape" in out
    assert main(["inspect", str(path), "--model", "U-ViT-Ti/2"]) != 0
    assert "does not load: checkpoint does not fit the model: patch_size 2" in capsys.readouterr().err


def test_export_writes_a_safetensors_that_stores_its_config(official_file, tmp_path, capsys):
    path, net = official_file
    out = tmp_path / "tiny.safetensors"
    assert main(["export", str(path), "--model", TINY, "--out", str(out)]) == 0
    loaded = dydit.load_model(out)  # no --model needed any more
    assert isinstance(loaded, UViT) and loaded.config == net.config
    x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([5.0, 900.0]), torch.tensor([1, 10])
    torch.testing.assert_close(loaded(x, t, y), net.eval()(x, t, y), atol=0, rtol=0)
    assert main(["export", str(path), "--to", "diffusers"]) != 0
    assert "diffusers has no U-ViT transformer class" in capsys.readouterr().err


def test_bench_times_a_u_vit_and_its_dydit(official_file, capsys):
    path, _ = official_file
    common = ["--batch", "1", "--repeats", "1", "--warmup", "0", "--device", "cpu", "--timesteps", "500"]
    assert main(["bench", "--checkpoint", str(path), *common]) == 0
    out = capsys.readouterr().out
    assert f"{TINY} from {path}" in out and "| forward | sliced | 1 |" in out
    assert isinstance(dydit.load_model(path, model="DyDiT-" + TINY), DyDiT)
