"""benchmarks/memory_plan.py: FLUX parameter counts from config shapes equal diffusers' own model."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import load_benchmark

plan = load_benchmark("memory_plan")


@pytest.mark.parametrize("shape", [plan.FLUX_1, plan.FLUX_LITE, replace(plan.FLUX_1, guidance_embeds=False)])
def test_base_parameters_equal_diffusers_flux_transformer(shape):
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        model = diffusers.FluxTransformer2DModel(
            num_layers=shape.num_layers,
            num_single_layers=shape.num_single_layers,
            guidance_embeds=shape.guidance_embeds,
        )
    assert plan.base_params(shape) == sum(p.numel() for p in model.parameters())
    # The adapted linears per block are the nn.Linear layers of its attention and MLPs.
    double = {
        (m.in_features, m.out_features)
        for n, m in model.transformer_blocks[0].named_modules()
        if isinstance(m, torch.nn.Linear) and not n.startswith("norm")
    }
    assert set(plan.double_block(shape)["linears"]) == double


def test_the_table_scales_with_gpus_and_lora_trains_little():
    full = [plan.plan(plan.FLUX_1, n, False, 64, 4, 2) for n in (1, 8)]
    lora = plan.plan(plan.FLUX_1, 8, True, 64, 4, 2)
    assert full[0]["adamw"] == pytest.approx(8 * full[1]["adamw"])
    assert lora["trainable_m"] < 0.03 * full[1]["trainable_m"] and lora["total"] < full[1]["total"]
    assert "| FLUX.1 |" in plan.table(64, 4, [1, 8, 64], 2)
