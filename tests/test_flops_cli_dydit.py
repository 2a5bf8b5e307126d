"""``dydit flops`` with DyDiT checkpoints: per-timestep and schedule-averaged FLOPs (docs/METHOD.md §7.3)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import save_file

from dydit.cli import main
from dydit.flops.formulas import layer_costs, linear_macs
from dydit.models.dit import DiT
from dydit.models.dydit import DyDiT

XL_TABLE = """DiT-XL/2: input 4x32x32, 256 tokens
| component | GFLOPs | share |
|---|---:|---:|
| patch_embed | 0.0047 | 0.00% |
| t_embedder | 0.0016 | 0.00% |
| adaLN | 0.2230 | 0.19% |
| attention | 42.2786 | 35.64% |
| mlp | 76.1015 | 64.15% |
| final_layer | 0.0121 | 0.01% |
| **total** | **118.62** | 100% |
"""


def save(model, path) -> str:
    save_file(model.state_dict(), str(path), metadata={"config": json.dumps(model.config.to_dict())})
    return str(path)


def routed_model(layout: str = "forced_first") -> DyDiT:
    """Tiny DyDiT with known routing at every t: head 0 and group 0 only (forced_first), all tokens
    kept in block 0 and none in block 1."""
    model = DyDiT(tiny_config(dynamic=True, router_layout=layout))
    with torch.no_grad():
        for block in model.blocks:
            for rate in (block.attn_rate, block.mlp_rate):
                rate.router.weight.zero_()
                rate.router.bias.fill_(-1.0)
            block.token_selection.mlp_head[2].weight.zero_()
        model.blocks[0].token_selection.mlp_head[2].bias.fill_(1.0)
        model.blocks[1].token_selection.mlp_head[2].bias.fill_(-1.0)
    return model


def test_plain_table_is_unchanged(capsys):
    assert main(["flops", "--model", "DiT-XL/2"]) == 0
    assert capsys.readouterr().out == XL_TABLE
    assert main(["flops"]) == 0  # the default model is still DiT-XL/2
    assert capsys.readouterr().out == XL_TABLE


def test_dydit_checkpoint_per_timestep_and_average(tmp_path, capsys):
    path = save(routed_model(), tmp_path / "dydit.safetensors")
    assert main(["flops", "--checkpoint", path, "--steps", "4", "--per-timestep", "--samples", "2"]) == 0
    out = capsys.readouterr().out
    a, m = layer_costs(16, 32)
    rho = (2 * 0.5 * a + 0.5 * m) / (2 * (a + m))  # §5.3 with r_h = r_g = 1/2, r_t = 1 then 0
    other = (
        linear_macs(16, 4 * 4, 32)  # patch embed
        + linear_macs(1, 256, 32)
        + linear_macs(1, 32, 32)  # t-embedder
        + 2 * linear_macs(1, 32, 6 * 32)  # adaLN
        + linear_macs(1, 32, 64)
        + linear_macs(16, 32, 4 * 8)  # final layer
    )
    routers = 2 * (linear_macs(16, 32, 2) + linear_macs(16, 2, 1))
    total = other + routers + a + 0.5 * m
    for t in (999, 666, 333, 0):  # 4 evenly spaced original timesteps
        assert f"| {t} | 50.0% | 50.0% | 50.0% | {total / 1e9:.6g} | {rho:.4f} |" in out
    assert f"| **total** | **{total / 1e9:.6g}** | 100% |" in out
    assert f"attn+MLP ratio {rho:.4f};" in out
    assert "router layout forced_first" in out


def test_token_keep_rates_come_from_forward_passes(tmp_path, capsys):
    model = routed_model("all")
    with torch.no_grad():
        for block in model.blocks:  # all heads and groups on; tokens decided by the input
            for rate in (block.attn_rate, block.mlp_rate):
                rate.router.bias.fill_(1.0)
            block.token_selection.mlp_head[2].weight.normal_(0, 3.0)
            block.token_selection.mlp_head[2].bias.zero_()
    path = save(model, tmp_path / "dydit.safetensors")
    assert main(["flops", "--checkpoint", path, "--steps", "3", "--per-timestep", "--cfg-scale", "1"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| 999 |")]
    kept = float(rows[0][3].rstrip("%"))
    assert 0 < kept < 100  # neither all nor none: a measured rate


def test_plain_dit_checkpoint_gets_the_static_table(tmp_path, capsys):
    dit = DiT(tiny_config())
    path = save(dit, tmp_path / "dit.safetensors")
    assert main(["flops", "--checkpoint", path]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: input 4x8x8, 16 tokens\n| component | GFLOPs | share |")
    assert main(["flops", "--checkpoint", path, "--per-timestep"]) == 1
    assert "plain DiT checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--router-layout", "all"], "layout 'all' was requested"),
        (["--model", "DyDiT-S/2"], "does not fit the model"),
        (["--sampler", "euler_a"], "unknown sampler 'euler_a'"),
        (["--sampler", "euler"], "euler is a flow-matching sampler and this is a DDPM model"),
        (["--image-size", "64"], "come from the checkpoint"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, extra, needle):
    path = save(routed_model(), tmp_path / "dydit.safetensors")
    assert main(["flops", "--checkpoint", path, "--steps", "2", *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_dynamic_options_need_a_checkpoint(capsys):
    assert main(["flops", "--model", "DyDiT-S/2", "--steps", "10"]) == 1
    assert "pass --checkpoint" in capsys.readouterr().err
