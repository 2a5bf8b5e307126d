"""The command line reads its choices from the registries, and one function says which model a run of
a file trains (``dydit finetune`` and :func:`dydit.train.finetune` alike)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

import dydit
from dydit import presets
from dydit.cli import build_parser, main
from dydit.cli.train import config_from_args
from dydit.diffusion import GUIDANCE_CHANNELS, SAMPLERS
from dydit.flow import FLOW_SAMPLERS
from dydit.train import config as train_config
from dydit.train import loop

ASSETS = Path(dydit.__file__).parent / "assets"
DIT = str(ASSETS / "dit-ti4-fmnist.safetensors")
SIT = str(ASSETS / "sit-ti4-fmnist.safetensors")


def _action(command: str, flag: str) -> argparse.Action:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return next(a for a in sub.choices[command]._actions if flag in a.option_strings)


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # unwrapped


def test_every_registered_sampler_is_accepted_and_listed(monkeypatch, capsys) -> None:
    # a sampler registered later (here: a copy of ddim under a new name) reaches the CLI too
    monkeypatch.setitem(SAMPLERS, "ddim-copy", SAMPLERS["ddim"])
    monkeypatch.setitem(FLOW_SAMPLERS, "heun-copy", FLOW_SAMPLERS["heun"])
    names = [*SAMPLERS, *FLOW_SAMPLERS]
    parser = build_parser()
    for name in names:
        assert parser.parse_args(["sample", "--sampler", name]).sampler == name
    assert tuple(_action("sample", "--sampler").choices) == tuple(names)
    sample_help, flops_help = _help("sample", capsys), _help("flops", capsys)
    for name in names:
        assert name in sample_help and name in flops_help
    assert "heun-copy (2 network evaluations per step)" in sample_help  # the registry's summary
    with pytest.raises(SystemExit):
        parser.parse_args(["sample", "--sampler", "euler_a"])


@pytest.mark.parametrize(
    "command, flag, registry",
    [
        ("sample", "--guidance-channels", GUIDANCE_CHANNELS),
        ("flops", "--router-layout", presets.ROUTER_LAYOUTS),
        ("train", "--objective", presets.OBJECTIVES),
        ("finetune", "--flow-path", presets.FLOW_PATHS),
        ("finetune", "--flow-prediction", presets.FLOW_PREDICTIONS),
        ("train", "--fit", train_config.FITS),
        ("train", "--grad-guard", train_config.GRAD_GUARDS),
    ],
)
def test_choice_lists_are_the_registry_objects(command: str, flag: str, registry: tuple) -> None:
    assert _action(command, flag).choices is registry  # the registry itself, not a copy of its values


def test_the_flow_transport_checks_against_the_preset_registry() -> None:
    from dydit.flow import PATHS, PREDICTIONS

    assert PATHS is presets.FLOW_PATHS and PREDICTIONS is presets.FLOW_PREDICTIONS


@pytest.mark.parametrize(
    "init_from, model, options, objective",
    [
        (DIT, None, [], "ddpm"),
        (SIT, None, [], "flow"),  # a SiT file: the SiT with routers
        (DIT, None, ["class_dropout_prob=0.2"], "ddpm"),  # the user's override wins over the file's
        (SIT, "DiT-Ti/4", [], "flow"),  # a named preset keeps the file's objective
        (DIT, "SiT-S/8", ["depth=2"], "flow"),
    ],
    ids=["dit", "sit", "dit-override", "sit-as-dit-preset", "dit-as-sit-preset"],
)
def test_a_finetune_of_a_file_is_one_model_from_the_cli_and_the_api(
    monkeypatch, tmp_path, init_from: str, model: str | None, options: list[str], objective: str
) -> None:
    captured = []
    monkeypatch.setattr(loop, "train", lambda cfg, **kw: captured.append(cfg))
    overrides = dict(o.split("=") for o in options)
    overrides = {k: (float(v) if "." in v else int(v)) for k, v in overrides.items()}
    loop.finetune(init_from, 0.5, model=model, model_overrides=overrides, out_dir=str(tmp_path))
    argv = ["finetune", "--init-from", init_from, "--target", "0.5", "--out-dir", str(tmp_path)]
    argv += ["--model", model] if model else []
    argv += [x for o in options for x in ("--model-option", o)]
    cli = config_from_args(build_parser().parse_args(argv), finetune=True)
    (api,) = captured
    assert (api.model, api.model_overrides) == (cli.model, cli.model_overrides)
    mc = api.model_config()
    assert mc.dynamic and mc == cli.model_config()
    assert mc.objective == (
        "flow" if SIT in (init_from, model) or (model or "").startswith("SiT") else "ddpm"
    )
    for key, value in overrides.items():
        assert getattr(mc, key) == value
