"""Safe checkpoint loading (weights_only / safetensors) and clear mismatch errors."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import save_file

import dydit
from dydit.checkpoint import checkpoint_config, fit_state_dict, guess_preset
from dydit.errors import CheckpointError
from dydit.models.dit import DiT


@pytest.fixture
def sd() -> dict[str, torch.Tensor]:
    return DiT(tiny_config()).state_dict()


def test_raw_state_dict(tmp_path, sd) -> None:
    torch.save(sd, tmp_path / "raw.pt")
    loaded = dydit.load_checkpoint(tmp_path / "raw.pt")
    assert loaded.keys() == sd.keys()


def test_training_dict_prefers_ema_and_strips_prefixes(tmp_path, sd) -> None:
    ema = {f"module.{k}": v + 1 for k, v in sd.items()}
    model = {f"_orig_mod.{k}": v for k, v in sd.items()}
    torch.save({"model": model, "ema": ema, "opt": {}, "step": 3}, tmp_path / "train.pt")
    loaded = dydit.load_checkpoint(tmp_path / "train.pt")
    assert loaded.keys() == sd.keys()
    assert torch.equal(loaded["pos_embed"], sd["pos_embed"] + 1)
    torch.save({"model": model}, tmp_path / "model_only.pt")
    assert torch.equal(dydit.load_checkpoint(tmp_path / "model_only.pt")["pos_embed"], sd["pos_embed"])


def test_safetensors_with_config(tmp_path, sd) -> None:
    cfg = tiny_config()
    meta = {"config": json.dumps({"model": cfg.to_dict()})}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "m.safetensors"), metadata=meta)
    assert dydit.load_checkpoint(tmp_path / "m.safetensors").keys() == sd.keys()
    assert checkpoint_config(tmp_path / "m.safetensors") == cfg


def test_missing_and_corrupt_files(tmp_path, sd) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        dydit.load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(os.urandom(300))
    with pytest.raises(CheckpointError, match="corrupt"):
        dydit.load_checkpoint(tmp_path / "junk.pt")
    torch.save(sd, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        dydit.load_checkpoint(tmp_path / "trunc.pt")
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(100))
    with pytest.raises(CheckpointError, match="safetensors"):
        dydit.load_checkpoint(tmp_path / "junk.safetensors")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_code_executing_pickle_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"w": _Evil()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="refusing to load"):
        dydit.load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_mismatch_names_keys_and_preset(sd) -> None:
    target = DiT(tiny_config(depth=1))
    with pytest.raises(CheckpointError) as e:
        fit_state_dict(target, sd)
    assert "unexpected keys: blocks.1." in str(e.value)
    bad = dict(sd)
    bad["final_layer.linear.weight"] = torch.zeros(3, 3)
    del bad["pos_embed"]
    with pytest.raises(CheckpointError, match=r"missing keys: pos_embed.*mis-shaped keys: final_layer"):
        fit_state_dict(DiT(tiny_config()), bad)


def test_guess_preset_from_shapes() -> None:
    with torch.device("meta"):
        sd = dydit.create_model("DiT-B/4").state_dict()
    assert guess_preset(sd) == "DiT-B/4"
    with torch.device("meta"):
        small = DiT(tiny_config())
    with pytest.raises(CheckpointError, match="looks like DiT-B/4"):
        fit_state_dict(small, sd)
