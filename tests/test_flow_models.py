"""SiT and DyDiT on flow-matching models: training, fine-tuning and sampling end to end (tiny models)."""

from __future__ import annotations

import pytest
import torch

from dydit.checkpoint import checkpoint_config, load_model
from dydit.cli import main
from dydit.diffusion import create_diffusion
from dydit.errors import DyditError
from dydit.factory import build_model
from dydit.flow import FLOW_SAMPLERS, Transport, flow_times
from dydit.presets import get_model_config
from dydit.sample import SamplingSettings, generate

TINY_OPTS = ["--model-option", "depth=2", "--model-option", "hidden_size=32", "--model-option", "num_heads=2"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_dysit() -> torch.nn.Module:
    cfg = get_model_config("SiT-Ti/2", input_size=8, num_classes=4, depth=2, hidden_size=32, num_heads=4)
    model = build_model(cfg.replace(dynamic=True)).eval()
    g = torch.Generator().manual_seed(0)
    # Routers that switch heads, groups and tokens off at some times. On t in [0, 1] the sinusoidal
    # time features vary only in their low frequencies, so the width routers get large weights.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rate.router" in name or "token_selection" in name:
                scale = 30.0 if "rate.router.weight" in name else 1.0
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return model


def test_dydit_on_a_flow_model_sliced_equals_masked_on_the_sampler_grid() -> None:
    model = _tiny_dysit()
    tr = Transport()
    times = flow_times("heun", 6, tr)
    plan = model.width_plan(torch.tensor(times))
    kept = torch.stack([torch.stack(plan.lookup(t)) for t in times]).float().mean((1, 2, 3))
    assert kept.min() < 1 and kept.max() > kept.min()  # widths change along the flow-time grid
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2])
    outs = {}
    for mode in ("masked", "sliced"):
        model.execution = mode
        outs[mode] = FLOW_SAMPLERS["heun"](model, noise, tr, 6, model_kwargs={"y": y})
    assert torch.allclose(outs["masked"], outs["sliced"], atol=1e-5)


def test_flow_samples_do_not_depend_on_the_batch_size() -> None:
    model = _tiny_dysit()
    model.execution = "sliced"
    settings = SamplingSettings(sampler="sde", steps=5)
    kw = dict(seeds=list(range(5)), shape=(1, 8, 8), num_classes=4, progress=False)
    whole = torch.cat([b.samples for b in generate(model, Transport(), settings, batch_size=5, **kw)])
    split = torch.cat([b.samples for b in generate(model, Transport(), settings, batch_size=2, **kw)])
    assert torch.allclose(whole, split, atol=1e-5)


def test_sampler_and_model_must_belong_together() -> None:
    sit = _tiny_dysit()
    kw = dict(seeds=[0], shape=(1, 8, 8), num_classes=4, progress=False)
    with pytest.raises(DyditError, match="flow-matching"):
        next(generate(sit, create_diffusion(), SamplingSettings(), **kw))
    dit = build_model(get_model_config("DiT-Ti/2", input_size=8, num_classes=4, depth=1)).eval()
    with pytest.raises(DyditError, match="DDPM model"):
        next(generate(dit, Transport(), SamplingSettings(sampler="euler", steps=2), **kw))
    with pytest.raises(DyditError, match="number of steps"):
        SamplingSettings(sampler="heun", steps="ddim10")


def test_train_finetune_and_sample_a_flow_model(tmp_path, capsys) -> None:
    run = ["--data", "digits", "--batch-size", "8", "--steps", "2", "--no-progress", "--device", "cpu"]
    assert main(["train", *run, "--model", "SiT-Ti/2", *TINY_OPTS, "--flow-path", "gvp",
                 "--out-dir", str(tmp_path / "sit")]) == 0  # fmt: skip
    export = tmp_path / "sit" / "ema.safetensors"
    if not export.exists():
        export = next((tmp_path / "sit").glob("*.safetensors"))
    cfg = checkpoint_config(export)
    assert (cfg.objective, cfg.flow_path, cfg.flow_prediction) == ("flow", "gvp", "velocity")

    # the DDPM objective on the same preset is one flag away
    assert main(["train", *run, "--model", "SiT-Ti/2", *TINY_OPTS, "--objective", "ddpm",
                 "--out-dir", str(tmp_path / "ddpm"), "--dry-run"]) == 0  # fmt: skip
    assert '"objective": "ddpm"' in capsys.readouterr().out

    assert main(["finetune", *run, "--init-from", str(export), "--target", "0.5", "--complete-steps", "1",
                 "--out-dir", str(tmp_path / "dysit")]) == 0  # fmt: skip
    dy_export = next(p for p in (tmp_path / "dysit").glob("*.safetensors"))
    dy = load_model(dy_export)
    assert dy.config.dynamic and dy.config.objective == "flow" and dy.config.flow_path == "gvp"
    stats = (tmp_path / "dysit" / "stats.jsonl").read_text()
    assert "flops_ratio" in stats and '"mse"' in stats and '"vb"' not in stats

    grid = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(dy_export), "--steps", "3", "--num-samples", "4",
                 "--execution", "sliced", "--grid", str(grid), "--no-progress"]) == 0  # fmt: skip
    assert grid.exists()
    capsys.readouterr()
    code = main(["sample", "--checkpoint", str(dy_export), "--sampler", "ddim", "--steps", "3",
                 "--num-samples", "4", "--grid", str(tmp_path / "g2.png"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and "DDPM sampler" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("dynamic", [False, True])
def test_adaptive_sampler_runs_a_float32_model_in_its_dtype(dynamic: bool) -> None:
    # dopri5 integrates in float64; a real float32 network must still only ever see float32 inputs.
    pytest.importorskip("torchdiffeq", reason="the adaptive sampler is optional (dydit[flow])")
    from conftest import tiny_config

    model = build_model(tiny_config(objective="flow", dynamic=dynamic)).eval()
    with torch.no_grad():  # a non-trivial velocity field (the zero-initialised head outputs 0)
        g = torch.Generator().manual_seed(2)
        model.final_layer.linear.weight.normal_(std=0.2, generator=g)
        model.final_layer.adaLN_modulation[-1].weight.normal_(std=0.2, generator=g)
    seen = set()

    def net(x, t, y):
        seen.add((x.dtype, t.dtype))
        return model(x, t, y)

    net.config = model.config  # type: ignore[attr-defined]
    kw = dict(seeds=[0, 1], shape=(4, 8, 8), num_classes=4, progress=False)
    (adaptive,) = generate(net, Transport(), SamplingSettings(sampler="adaptive", steps=1), **kw)
    assert seen == {(torch.float32, torch.float32)}
    assert adaptive.samples.dtype == torch.float32 and torch.isfinite(adaptive.samples).all()
    (heun,) = generate(model, Transport(), SamplingSettings(sampler="heun", steps=32), **kw)
    assert (adaptive.samples - heun.samples).abs().max() < 0.05  # the same ODE (rtol 1e-3), two solvers
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    assert (adaptive.samples - noise).abs().max() > 0.1  # the field moved the samples
