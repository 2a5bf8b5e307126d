"""diffusers' DiTTransformer2DModel folders, both ways: loading reproduces diffusers' own forward,
export writes what ``from_pretrained`` loads, and ours -> diffusers -> ours is exact."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from dit_reference import reference_forward, relative_error
from safetensors.torch import load_file, save_file
from test_checkpoint_formats import inputs, randomised

import dydit
from dydit.checkpoint import load_checkpoint, open_checkpoint
from dydit.checkpoint.export import export_diffusers
from dydit.cli import main
from dydit.errors import CheckpointError
from dydit.models.dit import DiT
from dydit.models.dydit import DyDiT

diffusers = pytest.importorskip("diffusers")
DiTTransformer2DModel = diffusers.DiTTransformer2DModel


def tiny_diffusers(**overrides) -> DiTTransformer2DModel:
    """A random 2-block DiT in diffusers, its per-block embedders tied as in converted DiT weights."""
    torch.manual_seed(5)
    kw = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
              sample_size=8, patch_size=2, num_embeds_ada_norm=4)  # fmt: skip
    model = DiTTransformer2DModel(**(kw | overrides)).eval()
    with torch.no_grad():
        first = model.transformer_blocks[0].norm1.emb
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first.state_dict())
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # adaLN-Zero-like init is no test; embedders stay tied below
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first.state_dict())
    return model


def diffusers_out(model: DiTTransformer2DModel, x, t, y) -> torch.Tensor:
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample


@pytest.mark.parametrize("layout", ["transformer", "pipeline"])
def test_diffusers_folder_reproduces_diffusers(tmp_path, layout) -> None:
    ref = tiny_diffusers()
    folder = tmp_path / "dit"
    ref.save_pretrained(folder / "transformer" if layout == "pipeline" else folder)
    if layout == "pipeline":
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    model = dydit.load_model(folder)
    cfg = model.config
    assert isinstance(model, DiT) and (cfg.timestep_freq_shift, cfg.mlp_norm_eps) == (1, 1e-5)
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.num_classes, cfg.learn_sigma) == (
        2,
        32,
        2,
        4,
        True,
    )
    x, t, y = inputs(cfg)
    with torch.no_grad():
        ours = model(x, t, y)
    theirs = diffusers_out(ref, x, t, y)
    assert relative_error(ours, theirs) <= 1e-5
    # The conventions are what makes it exact: official DiT numerics on the same weights differ.
    official = reference_forward(load_checkpoint(folder), x, t, y, num_heads=2, freq_shift=0)
    assert relative_error(official, theirs) > 1e-3
    assert relative_error(reference_forward(load_checkpoint(folder), x, t, y, num_heads=2, freq_shift=1,
                                            mlp_norm_eps=1e-5), theirs) <= 1e-5  # fmt: skip


def test_folders_converted_for_transformer2dmodel_load(tmp_path) -> None:
    """facebook/DiT-XL-2-256's transformer/config.json: the pre-0.28 class name, no norm_eps."""
    ref = tiny_diffusers()
    ref.save_pretrained(tmp_path / "dit")
    config = json.loads((tmp_path / "dit" / "config.json").read_text())
    old = {k: v for k, v in config.items() if k not in ("norm_eps", "_use_default_values")}
    old |= {"_class_name": "Transformer2DModel", "cross_attention_dim": None, "num_vector_embeds": None,
            "only_cross_attention": False, "use_linear_projection": False}  # fmt: skip
    (tmp_path / "dit" / "config.json").write_text(json.dumps(old))
    model = dydit.load_model(tmp_path / "dit")
    assert model.config.mlp_norm_eps == 1e-5
    x, t, y = inputs(model.config)
    with torch.no_grad():
        assert relative_error(model(x, t, y), diffusers_out(ref, x, t, y)) <= 1e-5


def test_embedder_copies_that_differ_are_refused(tmp_path) -> None:
    ref = tiny_diffusers()
    with torch.no_grad():
        ref.transformer_blocks[1].norm1.emb.timestep_embedder.linear_2.bias.add_(0.1)
    ref.save_pretrained(tmp_path / "dit")
    with pytest.raises(CheckpointError, match="block 1's copy of the timestep embedder differs"):
        dydit.load_model(tmp_path / "dit")


def test_export_gives_our_outputs_and_round_trips_exactly(tmp_path) -> None:
    # A model in diffusers' numerics (e.g. one imported from diffusers and fine-tuned): exact both ways.
    source = randomised(DiT(tiny_config(timestep_freq_shift=1, mlp_norm_eps=1e-5)), std=0.1)
    torch.save(source.state_dict(), tmp_path / "ours.pt")
    out, notes = export_diffusers(tmp_path / "ours.pt", tmp_path / "hf", model=source.config)
    assert notes == [] and sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    theirs_model = DiTTransformer2DModel.from_pretrained(out).eval()
    x, t, y = inputs(source.config)
    with torch.no_grad():
        ours = source(x, t, y)
    assert relative_error(diffusers_out(theirs_model, x, t, y), ours) <= 1e-5
    back = dydit.load_model(out)
    assert back.config == source.config
    assert back.state_dict().keys() == source.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in source.state_dict().items())
    with torch.no_grad():
        assert torch.equal(back(x, t, y), ours)


def test_export_of_an_official_convention_model_says_what_changes(tmp_path) -> None:
    source = randomised(DiT(tiny_config()), std=0.1)
    torch.save(source.state_dict(), tmp_path / "ours.pt")
    out, notes = export_diffusers(tmp_path / "ours.pt", tmp_path / "hf", model=tiny_config())
    assert len(notes) == 1 and "downscale_freq_shift=1" in notes[0] and "max relative difference" in notes[0]
    back = dydit.load_model(out)
    assert back.config == source.config.replace(timestep_freq_shift=1)  # the folder is a diffusers model
    assert all(torch.equal(back.state_dict()[k], v) for k, v in source.state_dict().items())
    x, t, y = inputs(source.config)
    theirs = diffusers_out(DiTTransformer2DModel.from_pretrained(out).eval(), x, t, y)
    with torch.no_grad():
        assert relative_error(back(x, t, y), theirs) <= 1e-5
        assert relative_error(source(x, t, y), theirs) > 1e-3


def test_dydit_exports_the_dense_network_and_its_routers(tmp_path) -> None:
    source = randomised(DyDiT(tiny_config(dynamic=True, router_layout="all", timestep_freq_shift=1)), std=0.3)
    save_file(source.state_dict(), str(tmp_path / "dy.safetensors"),
              metadata={"config": json.dumps(source.config.to_dict())})  # fmt: skip
    out, notes = export_diffusers(tmp_path / "dy.safetensors", tmp_path / "hf")
    assert any("dydit_routers.safetensors" in n and "dense" in n for n in notes)
    assert all(".attn_rate." not in k for k in load_file(str(out / "diffusion_pytorch_model.safetensors")))
    x, t, y = inputs(source.config)
    with torch.no_grad():
        masked = source(x, t, y)
        source.execution = "dense"
        dense = source(x, t, y)
    assert relative_error(masked, dense) > 1e-3  # the routers matter for this comparison
    assert (
        relative_error(diffusers_out(DiTTransformer2DModel.from_pretrained(out).eval(), x, t, y), dense)
        <= 1e-5
    )
    back = dydit.load_model(out)
    assert isinstance(back, DyDiT) and back.config == source.config.replace(router_layout="all")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in source.state_dict().items())
    with torch.no_grad():
        assert torch.equal(back(x, t, y), masked)


def test_export_refuses_what_diffusers_cannot_hold(tmp_path) -> None:
    for name, cfg in {
        "sit": tiny_config(objective="flow"),
        "mlp": tiny_config(mlp_ratio=2.0),
        "null": tiny_config(class_dropout_prob=0.0),
    }.items():
        torch.save(DiT(cfg).state_dict(), tmp_path / f"{name}.pt")
        with pytest.raises(CheckpointError, match="diffusers"):
            export_diffusers(tmp_path / f"{name}.pt", tmp_path / name, model=cfg)
        assert not (tmp_path / name).exists()


def test_cli_export_and_inspect(tmp_path, capsys) -> None:
    source = randomised(DiT(tiny_config()), std=0.1)
    meta = {"config": json.dumps({"model": source.config.to_dict()}), "format": "pt"}
    save_file(source.state_dict(), str(tmp_path / "ema.safetensors"), metadata=meta)
    assert main(["export", str(tmp_path / "ema.safetensors"), "--to", "diffusers"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(tmp_path / "ema-diffusers")
    assert captured.err.startswith("note: diffusers computes timestep features with downscale_freq_shift=1")
    assert open_checkpoint(tmp_path / "ema-diffusers").format == "diffusers"
    again = ["export", str(tmp_path / "ema.safetensors"), "--to", "diffusers"]
    assert main(again) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0]
    assert main(["inspect", str(tmp_path / "ema-diffusers")]) == 0
    out = capsys.readouterr().out
    assert "diffusers DiTTransformer2DModel folder" in out and "frequency shift 1" in out
