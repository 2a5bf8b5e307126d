"""The public API reads like the workflow: DiT -> DyDiT.from_dit -> finetune -> sliced sampling."""

from __future__ import annotations

import pytest
import torch

import dydit
from dydit.train.state import export_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_public_name_resolves_and_no_function_hides_a_subpackage() -> None:
    import importlib
    import pkgutil

    assert all(hasattr(dydit, name) for name in dydit.__all__)
    for info in pkgutil.iter_modules(dydit.__path__):  # `import dydit.train.loop` needs dydit.train
        if info.name == "__main__":
            continue
        assert getattr(dydit, info.name, None) in (None, importlib.import_module(f"dydit.{info.name}"))


def test_the_readme_workflow_on_a_tiny_model(tmp_path) -> None:
    mc = dydit.get_model_config(
        "DiT-Ti/2", input_size=8, num_classes=10, depth=1, hidden_size=32, num_heads=2
    )
    dit = dydit.build_model(mc).eval()
    base = tmp_path / "dit.safetensors"
    export_weights(base, dit, {"model": mc.to_dict()})

    dy = dydit.DyDiT.from_dit(dydit.load_model(base)).eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([999, 10]), torch.tensor([1, 2])
    assert torch.allclose(dy(x, t, y), dit(x, t, y), atol=1e-6)  # routers start fully open

    out = str(tmp_path / "dy")
    result = dydit.finetune(base, 0.5, data="digits", steps=2, batch_size=4, out_dir=out, progress=False)
    dy = dydit.load_model(result.export).eval()
    assert dy.config.dynamic and result.step == 2
    dy.execution = "sliced"
    settings = dydit.SamplingSettings(sampler="ddim", steps=3)
    kw = dict(seeds=range(3), shape=(1, 8, 8), num_classes=10, progress=False)
    sliced = torch.cat(
        [b.samples for b in dydit.generate(dy, dydit.create_process(dy.config), settings, **kw)]
    )
    dy.execution = "masked"
    masked = torch.cat(
        [b.samples for b in dydit.generate(dy, dydit.create_process(dy.config), settings, **kw)]
    )
    assert torch.allclose(sliced, masked, atol=1e-4)
