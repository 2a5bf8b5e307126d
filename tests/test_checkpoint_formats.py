"""Official training dicts (pickled argparse.Namespace), SiT checkpoints and ``dydit.load_model``."""

from __future__ import annotations

import argparse
import copy
import os
import pathlib

import pytest
import torch
from conftest import tiny_config
from dit_reference import reference_forward, relative_error

import dydit
from dydit.checkpoint import Checkpoint, model_config, open_checkpoint
from dydit.errors import CheckpointError, DyditError
from dydit.models.dit import DiT
from dydit.models.dydit import DyDiT
from dydit.presets import SIT_NAMES, get_model_config, preset_name


def randomised(model: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """``model`` with every weight but the sin-cos table random (adaLN-Zero would make outputs 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, std)
    return model.eval()


def inputs(cfg, n: int = 3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    return x, torch.tensor([999, 400, 3][:n]), torch.tensor([0, 1, cfg.num_classes - 1][:n])


def save_official(
    path: pathlib.Path, model: torch.nn.Module, args: argparse.Namespace, step: bool = True
) -> None:
    """Save the way DiT's (and DyDiT's, SiT's) train.py does: model, EMA, AdamW state and the args."""
    ema = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    if step:  # a real optimizer state: step counters and moments as tensors
        x, t, y = inputs(model.config, 2)
        model.train()
        model(x, t, y).square().mean().backward()
        opt.step()
        model.eval()
    torch.save(
        {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": args}, path
    )


def dit_args(model: str, **extra) -> argparse.Namespace:
    """The Namespace of DiT's train.py (its default options)."""
    base = dict(data_path="/data/imagenet/train", results_dir="results", model=model, image_size=256,
                num_classes=1000, epochs=1400, global_batch_size=256, global_seed=0, vae="ema",
                num_workers=4, log_every=100, ckpt_every=50_000)  # fmt: skip
    return argparse.Namespace(**(base | extra))


def test_official_training_dict_loads_with_its_args_and_ema(tmp_path) -> None:
    source = randomised(DiT(tiny_config()))
    ref_sd = {k: v.clone() for k, v in source.state_dict().items()}  # the EMA = weights before the step
    path = tmp_path / "0004000.pt"
    save_official(path, source, dit_args("DiT-XL/2", image_size=64, num_classes=4))
    ckpt = open_checkpoint(path)
    assert ckpt.format == "training_dict" and ckpt.entry == "ema" and ckpt.step == 4000
    assert ckpt.args["model"] == "DiT-XL/2" and ckpt.args["global_batch_size"] == 256
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in ref_sd.items())
    # The args name DiT-XL/2, whose shapes these tiny weights do not have: a refusal naming the sizes.
    with pytest.raises(CheckpointError, match=r"does not fit the model: depth 28 in the config, 2 blocks"):
        dydit.load_model(path)
    model = dydit.load_model(path, tiny_config())
    assert isinstance(model, DiT) and not model.training
    x, t, y = inputs(model.config)
    with torch.no_grad():
        out = model(x, t, y)
    assert relative_error(out, reference_forward(ref_sd, x, t, y, num_heads=2)) < 1e-5
    raw = dydit.load_model(path, tiny_config(), weights="model")  # the raw weights after one AdamW step
    assert not torch.equal(raw.state_dict()["blocks.0.attn.qkv.weight"], ref_sd["blocks.0.attn.qkv.weight"])


def test_the_args_pick_the_preset(tmp_path) -> None:
    """A real preset, saved as DiT's train.py saves it, loads with no model named at all."""
    torch.manual_seed(3)
    source = randomised(dydit.create_model("DiT-Ti/4"), std=0.05)
    path = tmp_path / "0000100.pt"
    save_official(path, source, dit_args("DiT-Ti/4", image_size=32, num_classes=10), step=False)
    model = dydit.load_model(path)
    assert model.config == get_model_config("DiT-Ti/4")
    x, t, y = inputs(model.config, 2)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), source(x, t, y))


def test_args_decide_sit_and_the_null_class_row() -> None:
    """What the args say beyond the shapes (checked on meta tensors: no memory for XL weights)."""
    with torch.device("meta"):
        xl = DiT(get_model_config("DiT-XL/2")).state_dict()
        no_null = DiT(get_model_config("DiT-XL/2", class_dropout_prob=0.0)).state_dict()
    sit = Checkpoint("0400000.pt", "training_dict", xl, args={"model": "SiT-XL/2", "path_type": "Linear"})
    cfg = model_config(sit)
    assert cfg == get_model_config("SiT-XL/2") and cfg.objective == "flow" and cfg.learn_sigma
    assert preset_name(cfg) == "SiT-XL/2"
    plain = model_config(Checkpoint("x.pt", "state_dict", xl))
    assert plain == get_model_config("DiT-XL/2")  # shapes alone cannot tell SiT from DiT
    assert model_config(Checkpoint("x.pt", "state_dict", xl), "SiT-XL/2").objective == "flow"
    exact = model_config(
        Checkpoint("x.pt", "training_dict", no_null, args={"model": "DiT-XL/2", "num_classes": 1000})
    )
    assert (exact.num_classes, exact.class_dropout_prob) == (1000, 0.0)
    assert (
        model_config(Checkpoint("x.pt", "state_dict", no_null)).num_classes == 999
    )  # the guess without args


def test_sit_checkpoint_loads_strictly_and_matches_sit_forward(tmp_path) -> None:
    cfg = tiny_config(objective="flow")  # learn_sigma: 8 output channels, as the released SiT-XL-2-256
    source = randomised(DiT(cfg))
    path = tmp_path / "SiT-tiny.pt"
    torch.save(source.state_dict(), path)
    model = dydit.load_model(path, cfg)
    assert model.config.objective == "flow" and model.out_channels == 8
    x, t, y = inputs(cfg)
    t = torch.tensor([0.9, 0.5, 0.01])  # SiT feeds continuous time in [0, 1]
    with torch.no_grad():
        out = model(x, t, y)
    sit = reference_forward(source.state_dict(), x, t, y, num_heads=2, sit=True)
    assert out.shape[1] == 8 and sit.shape[1] == 4
    assert relative_error(out[:, :4], sit) < 1e-5  # SiT's velocity is DiT's first half


def test_sit_presets_are_dit_networks_with_the_flow_objective() -> None:
    assert len(SIT_NAMES) == 12
    for name in SIT_NAMES:
        sit, dit = get_model_config(name), get_model_config("DiT-" + name[4:])
        assert sit == dit.replace(objective="flow") and preset_name(sit) == name
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in dydit.create_model("SiT-XL/2").state_dict().items()}
        assert shapes == {k: v.shape for k, v in dydit.create_model("DiT-XL/2").state_dict().items()}
    assert shapes["final_layer.linear.weight"] == (2 * 2 * 8, 1152)


def test_flow_models_are_refused_by_ddpm_sampling() -> None:
    model = DiT(tiny_config(objective="flow"))
    settings = dydit.SamplingSettings(steps=2)
    batches = dydit.generate(
        model, dydit.create_diffusion(), settings, seeds=[0], shape=(4, 8, 8), num_classes=4
    )
    with pytest.raises(DyditError, match="flow-matching \\(SiT\\) model but the process is Gaussian"):
        next(batches)
    from dydit.train import TrainConfig

    assert TrainConfig(model="SiT-S/2").model_config().objective == "flow"  # trains with flow matching


class _Evil:
    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["beside", "inside-args", "other-global"])
def test_only_the_namespace_is_allowed_in_a_training_dict(tmp_path, where) -> None:
    marker = tmp_path / "PWNED"
    sd = DiT(tiny_config()).state_dict()
    args = dit_args("DiT-XL/2")
    obj = {"model": sd, "ema": sd, "opt": {}, "args": args}
    if where == "beside":
        obj["hook"] = _Evil(marker)
    elif where == "inside-args":
        args.vae = _Evil(marker)
    else:
        args.results_dir = pathlib.PosixPath("results")  # harmless, but not on the allow-list
    torch.save(obj, tmp_path / "0000001.pt")
    with pytest.raises(CheckpointError, match="refusing to load .*GLOBAL") as e:
        dydit.load_model(tmp_path / "0000001.pt")
    assert "\n" not in str(e.value) and not marker.exists()
    assert argparse.Namespace not in torch.serialization.get_safe_globals()  # scoped to the load


def test_load_model_builds_dydit_and_respects_overrides(tmp_path) -> None:
    source = randomised(DyDiT(tiny_config(dynamic=True, router_layout="all")))
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, tmp_path / "dy.pt")  # DDP prefix
    model = dydit.load_model(tmp_path / "dy.pt", tiny_config())  # routers in the file make it a DyDiT
    assert isinstance(model, DyDiT) and model.router_layout == "all"
    x, t, y = inputs(model.config)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), source(x, t, y))
    with pytest.raises(CheckpointError, match="layout 'forced_first' was requested"):
        dydit.load_model(tmp_path / "dy.pt", tiny_config(), router_layout="forced_first")
    with pytest.raises(CheckpointError, match="loads as a DyDiT only"):
        dydit.load_model(tmp_path / "dy.pt", tiny_config(), dynamic=False)
    plain = dydit.load_model(DiT(tiny_config()).state_dict(), tiny_config(), dynamic=True)
    assert isinstance(plain, DyDiT)  # a DiT's weights with fresh routers, as fine-tuning starts


def test_configs_stored_before_the_conventions_existed_keep_the_official_ones() -> None:
    from dydit.apps.demo import BASE_CHECKPOINT

    ckpt = open_checkpoint(BASE_CHECKPOINT)  # the shipped base, exported before these fields existed
    assert "timestep_freq_shift" not in ckpt.run_config["model"]
    cfg = ckpt.config
    assert (cfg.timestep_freq_shift, cfg.mlp_norm_eps, cfg.objective) == (0, 1e-6, "ddpm")
    with pytest.raises(DyditError, match="timestep_freq_shift must be 0 .* or 1"):
        cfg.replace(timestep_freq_shift=2)
