"""--router-lr gives DyDiT's routers (and only them) their own AdamW learning rate."""

from __future__ import annotations

import pytest
from conftest import tiny_config

from dydit.errors import DyditError
from dydit.models.dydit import DyDiT
from dydit.train.config import TrainConfig
from dydit.train.run import param_groups as _param_groups


def test_router_lr_groups() -> None:
    model = DyDiT(tiny_config(dynamic=True))
    cfg = TrainConfig(model="DyDiT-S/2", target=0.5, lr=1e-4, router_lr=1e-2)
    base, routers = _param_groups(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    router_names = sorted(names[id(p)] for p in routers["params"])
    assert routers["lr"] == 1e-2 and "lr" not in base
    assert router_names and all(
        (".attn_rate." in n or ".mlp_rate." in n or ".token_selection." in n) for n in router_names
    )
    assert len(base["params"]) + len(routers["params"]) == sum(p.requires_grad for p in model.parameters())
    assert len(router_names) == 2 * 8  # per block: two width routers (w, b) and a token MLP (2 w, 2 b)


def test_default_is_one_group_and_bad_values_fail() -> None:
    model = DyDiT(tiny_config(dynamic=True))
    assert len(_param_groups(model, TrainConfig(model="DyDiT-S/2", target=0.5))) == 1
    with pytest.raises(DyditError, match="router learning rate"):
        TrainConfig(model="DyDiT-S/2", target=0.5, router_lr=0.0)
