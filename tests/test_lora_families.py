"""TD-LoRA over the backbone seam (docs/METHOD.md §18, issue 27): a TD-LoRA fine-tune of a FLUX
(the text-to-image FLUX-t2i, with its own text encoder) and of a U-ViT writes an adapter file that
loads back onto its base as the fine-tuned network, merges into plain weights, changes no base
tensor, and samples through ``dydit sample --lora`` (with ``--prompt`` for the t2i model)."""

from __future__ import annotations

import copy
import hashlib
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_t2i import FMNIST

from dydit.checkpoint import load_model
from dydit.checkpoint.lora import (
    apply_lora,
    load_with_lora,
    merge_times,
    read_lora,
    save_lora,
    stored_model_config,
)
from dydit.checkpoint.lora_info import lora_facts
from dydit.cli import build_parser, main
from dydit.cli.train import config_from_args
from dydit.data import compose_grammar as G
from dydit.flow import create_process
from dydit.models.dydit import DyDiT
from dydit.models.lora import remove_lora
from dydit.models.sliced import SlicedDyDiT
from dydit.presets import FluxConfig, UViTConfig
from dydit.sample import SamplingSettings
from dydit.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = ["--batch-size", "4", "--device", "cpu", "--no-progress", "--log-every", "1"]
UVIT_TINY = ["--model-option", "depth=2", "--model-option", "hidden_size=32", "--model-option", "num_heads=2"]
# (base training options, fine-tune options) per family; the fine-tune: TD-LoRA rank 4 in 2 groups.
FAMILIES = {
    "flux-t2i": (
        ["--model", "FLUX-t2i-tiny", "--data", "fmnist-compose"],
        ["--model", "DyFLUX-t2i-tiny", "--data", "fmnist-compose"],
    ),
    "uvit": (["--model", "U-ViT-Ti/2", *UVIT_TINY, "--data", "digits"], ["--data", "digits"]),
}
PROMPTS = ["two bags", "a blue shirt and a yellow trouser"]


def _run(argv: list[str]):
    """The run ``dydit train/finetune ARGV`` makes (its TrainConfig, as the CLI builds it), returning
    the in-memory result (the trained model and EMA) as well as its files."""
    args = build_parser().parse_args(argv)
    return train(config_from_args(args, finetune=args.command == "finetune"))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(family, base file, the TD-LoRA fine-tune's result, model inputs (x, t, condition))."""
    name = request.param
    if name == "flux-t2i" and not FMNIST.exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    root = tmp_path_factory.mktemp(f"lora-{name}")
    base_opts, ft_opts = FAMILIES[name]
    # A base trained enough for every adaLN-zero gate to have moved (a FLUX text stream's gates are
    # reached at step 3), so that every adapter gets a gradient.
    steps = ["--steps", "4", "--lr", "3e-3"]
    base = _run(["train", *base_opts, *COMMON, *steps, "--out-dir", str(root / "base")])
    ft = ["finetune", "--init-from", str(base.export), "--target", "0.5", "--lora", "4", "--lora-groups", "2"]
    res = _run([*ft, *ft_opts, *COMMON, "--steps", "2", "--lr", "1e-2", "--out-dir", str(root / "lora")])
    g = torch.Generator().manual_seed(5)
    cfg = res.model.config
    if isinstance(cfg, FluxConfig):
        x = torch.randn(2, cfg.latent_channels, cfg.sample_size, cfg.sample_size, generator=g)
        t = torch.tensor([0.3, 0.8])  # FLUX's sigma
        cond = res.model.text_encoder.tokenizer(PROMPTS)
    else:
        x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
        t, cond = torch.tensor([850.0, 120.0]), torch.tensor([1, 7])  # 999 (1 - t) of the VP-SDE
    return name, Path(base.export), res, (x, t, cond)


def _out(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(*inputs)


def test_the_file_stores_its_family_and_loads_onto_its_base_as_the_fine_tuned_network(family):
    name, base, res, inputs = family
    tensors, _, stored = read_lora(res.export)
    cfg = stored_model_config(stored)
    assert isinstance(cfg, FluxConfig if name == "flux-t2i" else UViTConfig) and cfg.dynamic
    assert cfg == res.model.config and stored["base"] == str(base)
    model = load_with_lora(res.export)
    assert isinstance(model, DyDiT) and type(model.backbone) is type(res.ema.backbone)
    want = _out(res.ema, inputs)  # the run's own EMA network, in memory
    torch.testing.assert_close(_out(model, inputs), want, rtol=1e-6, atol=1e-6)
    # The same adapters from a base loaded apart (the library path: a plain network becomes the DyDiT).
    plain = load_model(base)
    assert not isinstance(plain, DyDiT)
    torch.testing.assert_close(_out(apply_lora(plain, res.export), inputs), want, rtol=1e-6, atol=1e-6)
    # The adapters trained, and they change the output; zeroed, the network is the one without them.
    ups = {k: v for k, v in tensors.items() if k.endswith(".up")}
    assert ups and all(v.abs().sum() > 0 for v in ups.values())
    without = remove_lora(copy.deepcopy(model))  # same routers, no adapters
    assert not torch.allclose(_out(model, inputs), _out(without, inputs), rtol=0, atol=1e-7)
    with torch.no_grad():
        for block in model.blocks:
            for a in block.lora.adapters.values():
                a.up.zero_()
    torch.testing.assert_close(_out(model, inputs), _out(without, inputs), rtol=0, atol=0)


def test_the_sliced_engine_merges_the_adapters_per_step(family):
    _, _, res, inputs = family
    model = load_with_lora(res.export)
    x, t, cond = inputs
    for times in (t, t[:1].expand(2)):
        with torch.no_grad():
            masked = model(x, times, cond)
            sliced = SlicedDyDiT(model)(x, times, cond)
        torch.testing.assert_close(sliced, masked, rtol=1e-5, atol=1e-6)


def test_a_fine_tune_changes_no_base_tensor_and_the_file_holds_none(family):
    _, base, res, _ = family
    digest = hashlib.sha256(base.read_bytes()).hexdigest()
    base_sd = load_file(str(base))
    tensors, _, stored = read_lora(res.export)
    assert stored["base_sha256"] == digest and not set(tensors) & set(base_sd)
    for net in (res.model, res.ema):
        state = net.state_dict()
        for k, v in base_sd.items():
            assert torch.equal(state[k], v), k
    assert all(p.requires_grad == (k in tensors) for k, p in res.model.named_parameters())
    load_with_lora(res.export)  # loading does not touch the base file
    assert hashlib.sha256(base.read_bytes()).hexdigest() == digest


def test_merge_lora_export_equals_the_unmerged_network(family, tmp_path, capsys):
    _, base, res, inputs = family
    model = load_with_lora(res.export)
    _, _, stored = read_lora(res.export)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for block in model.blocks:
            block.lora.router.weight.zero_()
            block.lora.router.bias.copy_(torch.tensor([2.0, -2.0]))  # group 0 on, group 1 off at every t
            for a in block.lora.adapters.values():
                a.up.copy_(0.05 * torch.randn(a.up.shape, generator=g))
    constant = save_lora(tmp_path / "constant.safetensors", model, stored)
    merged = tmp_path / "merged.safetensors"
    digest = hashlib.sha256(base.read_bytes()).hexdigest()
    assert main(["export", str(constant), "--merge-lora", "--out", str(merged)]) == 0
    plain = load_model(merged)
    assert isinstance(plain, DyDiT) and type(plain.config) is type(model.config)
    assert not any(".lora." in k for k in plain.state_dict())
    want = _out(model, inputs)
    assert not torch.allclose(want, _out(remove_lora(copy.deepcopy(model)), inputs), rtol=0, atol=1e-6)
    torch.testing.assert_close(_out(plain, inputs), want, rtol=1e-5, atol=1e-5)
    assert hashlib.sha256(base.read_bytes()).hexdigest() == digest
    with torch.no_grad():
        for block in model.blocks:
            block.lora.router.weight.normal_(0, 10.0, generator=g)
    varying = save_lora(tmp_path / "varying.safetensors", model, stored)
    capsys.readouterr()
    assert main(["export", str(varying), "--merge-lora", "--out", str(tmp_path / "no.safetensors")]) != 0
    assert "change with t" in capsys.readouterr().err


def test_merges_are_checked_at_the_times_the_network_sees(family):
    """The merge grid spans the times a sampler hands the network: a U-ViT's VP-SDE 999 (1 - t),
    FLUX's sigma in [0, 1]."""
    _, _, res, _ = family
    cfg = res.model.config
    grid = merge_times(cfg)
    process = create_process(cfg)
    for sampler in {"euler", getattr(cfg, "default_sampler", None) or cfg.recipe_sampler}:
        times = SamplingSettings(sampler=sampler, steps=7).network_times(process)
        times = torch.tensor(times, dtype=grid.dtype)
        assert grid.min() <= times.min() and times.max() <= grid.max(), sampler
    assert float(grid.max()) == pytest.approx(999.0 if isinstance(cfg, UViTConfig) else 1.0)


def test_sample_with_lora_and_inspect_usage_through_the_cli(family, tmp_path, capsys):
    name, base, res, _ = family
    facts = lora_facts(res.export)
    depth = len(res.model.blocks)
    assert facts["problem"] is None and facts["layers"]["blocks"] == list(range(depth))
    assert facts["layers"]["same_in_every_block"]
    assert facts["layers"]["adapted_linears"] == sum(len(b.lora.paths) for b in res.model.blocks)
    usage = facts["usage"]["sample"].split(" (")[0]  # the command, before its note
    words = shlex.split(usage)[1:]
    assert words[:3] == ["sample", "--lora", str(res.export)]
    if name == "flux-t2i":
        assert words[3:] == ["--prompt", "TEXT"]  # a t2i model samples prompts, not classes
        words[4] = PROMPTS[0]
        assert set(" ".join(PROMPTS).split()) <= set(G.VOCAB)
    grid = tmp_path / "grid.png"
    extra = ["--num-samples", "2", "--steps", "2", "--grid", str(grid), "--no-progress", "--device", "cpu"]
    capsys.readouterr()
    assert main([*words, *extra]) == 0, capsys.readouterr().err
    assert grid.is_file() and "execution: sliced" in capsys.readouterr().err
    if name == "flux-t2i":  # without a prompt: refused in one line, as for any t2i checkpoint
        assert main(["sample", "--lora", str(res.export), *extra]) == 1
        assert "needs --prompt" in capsys.readouterr().err
    assert main([*words, "--checkpoint", str(base), *extra, "--dry-run"]) == 0  # the base given
    assert f"{base.resolve()} + TD-LoRA {res.export.resolve()}" in capsys.readouterr().out
