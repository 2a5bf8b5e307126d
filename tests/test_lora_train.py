"""A TD-LoRA fine-tune (docs/METHOD.md §18): no base tensor changes, only adapters and routers train,
the adapters are saved apart from the base and load back onto it, resume is exact, and the CLI
flags (finetune --lora, sample --lora, export --merge-lora) reach the library."""

from __future__ import annotations

import pytest
import torch
from test_train import tiny_run

from dydit.checkpoint import load_checkpoint, load_model
from dydit.checkpoint.lora import LORA_FILE, apply_lora, load_with_lora, read_lora, save_lora
from dydit.cli import main
from dydit.errors import DyditError
from dydit.models.fitting import ROUTER_KEY_MARKERS
from dydit.models.lora import LoraConfig
from dydit.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return train(tiny_run(tmp_path_factory.mktemp("base"), "dit", steps=2)).export


def lora_run(tmp_path, base, name="lora", **kw):
    options = dict(
        model="DyDiT-Ti/2", init_from=str(base), target=0.5, lora_rank=4, lora_groups=2, lr=1e-2,
        complete_steps=1, grad_checkpointing=True,
    )  # fmt: skip
    return tiny_run(tmp_path, name, **{**options, **kw})


def test_a_td_lora_fine_tune_changes_no_base_tensor(tmp_path, base):
    res = train(lora_run(tmp_path, base))
    dit = load_checkpoint(base)
    trained = {n for n, p in res.model.named_parameters() if p.requires_grad}
    assert trained and all(".lora." in n or any(m in f".{n}" for m in ROUTER_KEY_MARKERS) for n in trained)
    state = res.model.state_dict()
    for k, v in dit.items():  # the base: bitwise what the file holds, in the model and in its EMA
        assert torch.equal(state[k], v), k
        assert torch.equal(res.ema.state_dict()[k], v), k
    ups = [v for k, v in state.items() if k.endswith(".up")]
    assert ups and any(u.abs().sum() > 0 for u in ups)  # the adapters did train (B started at 0)
    # The run's export is the small file: adapters and routers only, with their config.
    assert res.export == res.run_dir / LORA_FILE and not (res.run_dir / "ema.safetensors").exists()
    tensors, lc, config = read_lora(res.export)
    assert lc == LoraConfig(4, 2) and config["base"] == str(base) and config["model"]["dynamic"]
    assert not set(tensors) & set(dit)
    # Loaded back onto the base, it is the trained EMA network.
    model = load_with_lora(res.export)
    x = torch.randn(3, 1, 8, 8)
    t, y = torch.tensor([1, 500, 999]), torch.tensor([0, 3, 9])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), res.ema(x, t, y), atol=0, rtol=0)
    with pytest.raises(DyditError, match="does not fit"):
        apply_lora(load_with_lora(res.export), _other_rank_file(tmp_path, base))


def _other_rank_file(tmp_path, base):
    return train(lora_run(tmp_path, base, "rank2", steps=1, lora_rank=2)).export


def test_td_lora_resume_is_exact(tmp_path, base):
    whole = train(lora_run(tmp_path, base, "whole"))
    train(lora_run(tmp_path, base, "halves"), stop_at=2)
    halves = train(lora_run(tmp_path, base, "halves"))
    a, b = whole.model.state_dict(), halves.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_finetune_sample_and_export_with_lora(tmp_path, base, capsys):
    out = tmp_path / "cli"
    code = main([
        "finetune", "--init-from", str(base), "--target", "0.5", "--lora", "4", "--lora-groups", "2",
        "--data", "digits", "--batch-size", "8", "--steps", "2", "--out-dir", str(out), "--no-progress",
    ])  # fmt: skip
    assert code == 0 and (out / LORA_FILE).is_file()
    samples = tmp_path / "samples"
    code = main([
        "sample", "--lora", str(out / LORA_FILE), "--num-samples", "2", "--steps", "2",
        "--sampler", "ddim", "--out-dir", str(samples), "--no-progress",
    ])  # fmt: skip
    assert code == 0
    # export --merge-lora: plain weights when the gates are the same at every t, else refused.
    model = load_with_lora(out / LORA_FILE)
    _, _, stored = read_lora(out / LORA_FILE)
    with torch.no_grad():
        for block in model.blocks:
            block.lora.router.weight.zero_()
            block.lora.router.bias.copy_(torch.tensor([2.0, -2.0]))  # group 0 on, group 1 off
            for a in block.lora.adapters.values():
                a.up.normal_()
    constant = save_lora(tmp_path / "constant.safetensors", model, stored)
    merged = tmp_path / "merged.safetensors"
    assert main(["export", str(constant), "--merge-lora", "--out", str(merged)]) == 0
    plain = load_model(merged)
    assert not any(".lora." in k for k in plain.state_dict())
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([7, 700]), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(plain(x, t, y), model(x, t, y), atol=1e-5, rtol=1e-5)
        for block in model.blocks:
            block.lora.router.weight.normal_(0, 10.0)
    varying = save_lora(tmp_path / "varying.safetensors", model, stored)
    assert main(["export", str(varying), "--merge-lora", "--out", str(tmp_path / "no.safetensors")]) != 0
    assert "change with t" in capsys.readouterr().err
