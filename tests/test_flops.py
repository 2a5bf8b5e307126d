"""FLOPs accounting (MAC convention, docs/METHOD.md §1.1, §7.3) and the `dydit flops` command."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dydit.cli import main
from dydit.flops import config_macs_table, count_flops, layer_costs, token_router_macs
from dydit.models.dit import DiT
from dydit.presets import get_model_config

# Per-layer attention / MLP constants in GFLOPs, docs/METHOD.md §1.1 (the released FLOPs dict).
CONSTANTS = {
    ("DiT-S/2", 32): (0.201326592, 0.301989888),
    ("DiT-B/2", 32): (0.704643072, 1.207959552),
    ("DiT-L/2", 32): (1.207959552, 2.147483648),
    ("DiT-XL/2", 32): (1.509949440, 2.717908992),
    ("DiT-XL/2", 64): (7.851737088, 10.871635968),
}


@pytest.mark.parametrize(("name", "latent"), list(CONSTANTS))
def test_per_layer_constants(name: str, latent: int) -> None:
    cfg = get_model_config(name, input_size=latent)
    a, m = layer_costs(cfg.num_tokens, cfg.hidden_size)
    assert (a / 1e9, m / 1e9) == pytest.approx(CONSTANTS[(name, latent)], abs=1e-12)


def _table(name: str, **kw) -> dict[str, int]:
    return config_macs_table(get_model_config(name, **kw))


@pytest.mark.parametrize(
    ("name", "gflops"),
    [("DiT-S/2", 6.06), ("DiT-B/4", 5.56), ("DiT-L/8", 5.01), ("DiT-XL/2", 118.64), ("DiT-XL/8", 7.39)],
)
def test_totals_match_dit_paper(name: str, gflops: float) -> None:
    assert sum(_table(name).values()) / 1e9 == pytest.approx(gflops, abs=0.05)


def test_cli_reports_xl2_total(capsys) -> None:
    assert main(["flops", "--model", "DiT-XL/2", "--image-size", "256"]) == 0
    out = capsys.readouterr().out
    total = float(out.split("**total** | **")[1].split("**")[0])
    assert abs(total - 118.6) <= 0.1
    assert "| attention |" in out and "| mlp |" in out


def test_cli_xl2_at_512() -> None:
    table = _table("DiT-XL/2", input_size=64)
    assert (table["attention"] + table["mlp"]) / 1e9 == pytest.approx(524.254, abs=1e-3)


def test_counter_agrees_with_torch_flop_counter() -> None:
    """torch's FlopCounterMode counts 2 FLOPs per MAC; the math SDPA backend exposes QKᵀ and AV as bmm."""
    model = DiT(tiny_config()).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as ref:
        model(x, t, y)
    with count_flops() as ours:
        model(x, t, y)
    assert 2 * ours.total == ref.get_total_flops()
    assert ours.total == 3 * sum(config_macs_table(model.config).values())


def test_counter_is_inactive_outside_context() -> None:
    model = DiT(tiny_config()).eval()
    with count_flops() as c:
        pass
    model(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.tensor([0]))
    assert c.total == 0


def test_token_router_formula_is_what_the_router_records() -> None:
    from dydit.models.routers import TokenRouter

    x = torch.randn(2, 16, 64)
    with count_flops() as c:
        TokenRouter(64).logits(x)
    assert c.by_component["token_router"] == 2 * token_router_macs(16, 64)
