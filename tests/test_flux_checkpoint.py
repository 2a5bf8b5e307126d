"""FLUX checkpoints (issue 24): diffusers ``FluxTransformer2DModel`` folders read strictly (one file,
shards, pipeline folders), written back for diffusers, described by ``dydit inspect``; one-line
errors for folders of another class and weights that do not fit their config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_flux import call, diffusers_model, rel_err

import dydit
from dydit.checkpoint import open_checkpoint
from dydit.cli import main
from dydit.errors import CheckpointError
from dydit.models.flux import Flux
from dydit.presets import FluxConfig, get_model_config

diffusers = pytest.importorskip("diffusers")


def tiny(name: str = "FLUX-tiny") -> FluxConfig:
    return get_model_config(name)


def saved(tmp_path: Path, cfg: FluxConfig, **kwargs) -> tuple[Path, torch.nn.Module]:
    ref = diffusers_model(cfg)
    folder = tmp_path / "flux"
    ref.save_pretrained(folder, **kwargs)
    return folder, ref


@pytest.mark.parametrize("name", ["FLUX-tiny", "FLUX-tiny-schnell"])
def test_a_diffusers_folder_loads_strictly_and_gives_diffusers_outputs(tmp_path, name):
    cfg = tiny(name)
    folder, ref = saved(tmp_path, cfg)
    model = dydit.load_model(folder)
    assert isinstance(model, Flux) and not model.training
    assert model.config.to_diffusers() == cfg.to_diffusers()
    kw = call(cfg)
    with torch.no_grad():
        assert rel_err(model(**kw)[0], ref(**kw)[0]) < 1e-5
    assert open_checkpoint(folder).format == "flux_diffusers"


def test_sharded_and_pipeline_folders(tmp_path):
    cfg = tiny()
    folder, ref = saved(tmp_path, cfg, max_shard_size="20KB")
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 1
    pipe = tmp_path / "pipe"
    (pipe / "transformer").mkdir(parents=True)
    for f in folder.iterdir():
        (pipe / "transformer" / f.name).write_bytes(f.read_bytes())
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    kw = call(cfg)
    with torch.no_grad():
        for source in (folder, pipe):
            assert rel_err(dydit.load_model(source)(**kw)[0], ref(**kw)[0]) < 1e-5


def test_export_to_diffusers_round_trips_through_diffusers(tmp_path, capsys):
    cfg = tiny()
    folder, ref = saved(tmp_path, cfg)
    out = tmp_path / "out"
    assert main(["export", str(folder), "--to", "diffusers", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    back = diffusers.FluxTransformer2DModel.from_pretrained(out).eval()
    ours = dydit.load_model(out)
    kw = call(cfg, seed=3)
    with torch.no_grad():
        assert rel_err(back(**kw)[0], ref(**kw)[0]) < 1e-6
        assert rel_err(ours(**kw)[0], ref(**kw)[0]) < 1e-5
    # A second export to the same place is refused, and nothing is half-written.
    assert main(["export", str(folder), "--to", "diffusers", "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err


def test_a_raw_state_dict_loads_with_a_diffusers_config(tmp_path):
    cfg = tiny()
    folder, ref = saved(tmp_path, cfg)
    pt = tmp_path / "flux.pt"
    torch.save({"module": ref.state_dict(), "step": 7}, pt)
    kw = call(cfg)
    with torch.no_grad():
        for config in (folder / "config.json", folder, json.loads((folder / "config.json").read_text())):
            model = dydit.load_model(pt, config=config)
            assert rel_err(model(**kw)[0], ref(**kw)[0]) < 1e-5
        assert rel_err(dydit.load_model(pt, "FLUX-tiny")(**kw)[0], ref(**kw)[0]) < 1e-5


def test_inspect_describes_a_flux_folder(tmp_path, capsys):
    folder, _ = saved(tmp_path, tiny())
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "FluxTransformer2DModel" in out and "FLUX-tiny" in out and "double" in out


def test_one_line_errors_for_bad_flux_inputs(tmp_path, capsys):
    cfg = tiny()
    folder, ref = saved(tmp_path, cfg)
    pt = tmp_path / "flux.pt"
    torch.save({"module": ref.state_dict(), "step": 1}, pt)
    # A folder of another diffusers class.
    other = tmp_path / "unet"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(CheckpointError, match="UNet2DModel"):
        dydit.load_model(pt, config=other / "config.json")
    assert main(["inspect", str(other)]) == 1
    assert "UNet2DModel" in capsys.readouterr().err
    # Weights that do not fit the config given.
    wider = {**cfg.to_diffusers(), "num_attention_heads": cfg.num_attention_heads * 2}
    with pytest.raises(CheckpointError, match="does not fit the FLUX config") as e:
        dydit.load_model(pt, config=wider)
    assert "\n" not in str(e.value)
    fewer = {**cfg.to_diffusers(), "num_single_layers": cfg.num_single_layers + 1}
    with pytest.raises(CheckpointError, match="missing keys: single_transformer_blocks"):
        dydit.load_model(pt, config=fewer)
    # A FLUX file with no config and no name.
    with pytest.raises(CheckpointError, match="stores no FLUX config") as e:
        dydit.load_model(pt)
    assert "config.json" in str(e.value)


def test_the_released_dyflux_format_loads_strictly_and_follows_the_released_rule(tmp_path, capsys):
    """``{"module": state_dict, "step"}`` with diffusers' keys + token_selection.* in every block, no
    config: loaded with the architecture's config.json, token routing only, the released rule."""
    from test_dyflux import official_dyflux, token_router_weights

    cfg = tiny()
    folder, ref = saved(tmp_path, cfg)
    routers = token_router_weights(cfg)
    pt = tmp_path / "dyflux.pt"
    torch.save({"module": {**ref.state_dict(), **routers}, "step": 12000}, pt)
    model = dydit.load_model(pt, config=folder / "config.json")
    assert model.config.dynamic and not model.width_routing
    assert set(model.state_dict()) == set(ref.state_dict()) | set(routers)
    kw = call(cfg)
    expected, kept = official_dyflux(ref, routers, kw)
    assert min(kept) < 1
    with torch.no_grad():
        assert rel_err(model(**kw)[0], expected) < 1e-5
    assert main(["inspect", str(pt), "--config", str(folder / "config.json")]) == 0
    out = capsys.readouterr().out
    assert "token routing" in out and "12,000" in out and "strictly" in out
    # Exported for diffusers: the dense FLUX there, the routers beside it, the DyFLUX back in dydit.
    out_dir = tmp_path / "dyflux-diffusers"
    assert main(["export", str(pt), "--to", "diffusers", "--config", str(folder), "--out", str(out_dir)]) == 0
    assert "routers" in capsys.readouterr().err
    dense = diffusers.FluxTransformer2DModel.from_pretrained(out_dir).eval()
    back = dydit.load_model(out_dir)
    with torch.no_grad():
        assert rel_err(dense(**kw)[0], ref(**kw)[0]) < 1e-6
        assert rel_err(back(**kw)[0], expected) < 1e-5
    # A DyFLUX checkpoint whose routers do not fit the config given: one line naming the keys.
    bad = {**ref.state_dict(), **routers}
    bad.pop(next(k for k in bad if "token_selection.router.weight" in k))
    torch.save({"module": bad, "step": 1}, pt)
    with pytest.raises(CheckpointError, match="missing keys: .*token_selection.router.weight"):
        dydit.load_model(pt, config=folder)
