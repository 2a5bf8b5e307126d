"""DyDiT checkpoints: both router layouts, plain DiT into DyDiT, clear errors (docs/METHOD.md §12)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import save_file

from dydit.checkpoint import load_dydit_checkpoint
from dydit.checkpoint.layout import detect_router_layout, load_dydit_state_dict
from dydit.errors import CheckpointError
from dydit.factory import create_model
from dydit.models.dit import DiT
from dydit.models.dydit import DyDiT
from dydit.models.fitting import ROUTER_KEY_MARKERS


def trained_like(layout: str, **overrides) -> DyDiT:
    """A tiny DyDiT whose every weight (routers included) is random, in eval mode."""
    model = DyDiT(tiny_config(dynamic=True, router_layout=layout, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.5)
    return model.eval()


def inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(4, 4, 8, 8, generator=g), torch.tensor([0, 250, 600, 999]), torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("layout", ["forced_first", "all"])
def test_detect_router_layout(layout):
    sd = trained_like(layout).state_dict()
    assert detect_router_layout(sd, 2) == layout
    assert detect_router_layout(DiT(tiny_config()).state_dict(), 2) is None
    with pytest.raises(CheckpointError, match="fits neither layout"):
        detect_router_layout(sd, 4)


@pytest.mark.parametrize("layout", ["forced_first", "all"])
@pytest.mark.parametrize("fmt", ["pt", "train_dict", "safetensors"])
def test_round_trip_both_layouts(tmp_path, layout, fmt):
    model = trained_like(layout)
    cfg = model.config
    x, t, y = inputs()
    with torch.no_grad():
        ref, stats = model.forward_with_routing(x, t, y)
    assert 0 < stats.heads.mean() < 1  # routing matters for this comparison
    sd = model.state_dict()
    if fmt == "pt":
        path = tmp_path / "model.pt"
        torch.save(sd, path)
        loaded = load_dydit_checkpoint(path, config=tiny_config())  # layout comes from the shapes
    elif fmt == "train_dict":
        path = tmp_path / "0001000.pt"
        ema = {"module." + k: v for k, v in sd.items()}  # DDP prefix, removed on load
        torch.save({"model": {}, "ema": ema, "config": cfg.to_dict()}, path)
        loaded = load_dydit_checkpoint(path)
    else:
        path = tmp_path / "model.safetensors"
        meta = {"config": json.dumps(cfg.to_dict())}
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta)
        loaded = load_dydit_checkpoint(path)
    assert isinstance(loaded, DyDiT) and loaded.router_layout == layout and not loaded.training
    assert loaded.state_dict().keys() == sd.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), ref, atol=0, rtol=0)


def test_plain_dit_reports_exactly_the_router_keys():
    dit = DiT(tiny_config())
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.1)
    model = DyDiT(tiny_config(dynamic=True))
    fresh = load_dydit_state_dict(model, dit.state_dict())
    router_keys = {k for k in model.state_dict() if any(m in k for m in ROUTER_KEY_MARKERS)}
    assert set(fresh) == router_keys and len(fresh) == 2 * 8  # 2 blocks x (2 width + 2x2 token) tensors
    assert all(torch.equal(model.state_dict()[k], v) for k, v in dit.state_dict().items())
    dit.eval()
    model.eval()
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), dit(x, t, y), atol=1e-6, rtol=0)


def test_plain_dit_checkpoint_of_a_preset_is_recognised():
    sd = create_model("DiT-S/8", input_size=16, num_classes=10).state_dict()
    model = load_dydit_checkpoint(sd, layout="all")
    cfg = model.config
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (12, 384, 6, 8)
    assert (cfg.input_size, cfg.num_classes, cfg.router_layout, cfg.dynamic) == (16, 10, "all", True)


def test_checkpoint_of_another_model_size_is_rejected():
    other = trained_like("forced_first", hidden_size=48).state_dict()
    with pytest.raises(CheckpointError, match="hidden_size 32 in the config, width 48 in the weights"):
        load_dydit_checkpoint(other, config=tiny_config())
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_dydit_checkpoint(trained_like("forced_first", num_heads=4).state_dict(), config=tiny_config())
    preset = create_model("DiT-S/8").state_dict()
    with pytest.raises(CheckpointError, match="looks like DiT-S/8"):
        load_dydit_checkpoint(preset, config="DyDiT-S/4")


def test_forced_layout_must_match_the_file():
    sd = trained_like("all").state_dict()
    with pytest.raises(CheckpointError, match="layout 'forced_first' was requested.*'all'"):
        load_dydit_checkpoint(sd, config=tiny_config(), layout="forced_first")
    with pytest.raises(CheckpointError, match="build the model with router_layout='all'"):
        load_dydit_state_dict(DyDiT(tiny_config(dynamic=True)), sd)


def test_partial_router_keys_are_not_tolerated():
    sd = trained_like("forced_first").state_dict()
    del sd["blocks.1.token_selection.mlp_head.2.bias"]
    with pytest.raises(CheckpointError, match="missing keys: blocks.1.token_selection.mlp_head.2.bias"):
        load_dydit_checkpoint(sd, config=tiny_config())
