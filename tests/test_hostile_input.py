"""Bad and hostile input, through the CLI: every broken or malicious file to every command that loads one.

Each case must end in one line ``dydit CMD: error: ...`` and exit status 1 (2 for argparse), never a
traceback or an "internal error", write nothing, and never run code carried by a file (the evil
pickles below would create ``PWNED`` if they were ever unpickled unsafely). docs/RELIABILITY.md lists
the cases.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import random
import shutil
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from faultkit import HANG_GUARD_S, cli_error, error_line, run_cli, save_tiny, temp_files, train_args
from PIL import Image
from safetensors.torch import load_file, save_file

from dydit.cli import main
from dydit.errors import DyditError
from dydit.evaluate import write_npz
from dydit.factory import build_model
from dydit.models.dit import DiT
from dydit.models.dydit import DyDiT

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


class _Evil:
    """Unpickling this runs ``touch MARKER``; weights_only loading must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _random_bytes(n: int, seed: int = 0) -> bytes:
    r = random.Random(seed)
    return bytes(r.getrandbits(8) for _ in range(n))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[dict[str, Path], Path]:
    """(name -> broken or malicious checkpoint file, the marker an executed pickle would create)."""
    d = tmp_path_factory.mktemp("hostile")
    marker = d / "PWNED"
    real = save_tiny(d / "real.safetensors")
    sd = load_file(str(real))
    torch.save(sd, d / "real.pt")
    files = {"missing.pt": d / "missing.pt", "directory.pt": d / "directory.pt"}
    files["directory.pt"].mkdir()
    blobs = {
        "empty.pt": b"",
        "random.pt": _random_bytes(2048),
        "random-2.pt": _random_bytes(2048, seed=7),  # this one made torch.load raise IndexError
        "truncated.pt": (d / "real.pt").read_bytes()[: (d / "real.pt").stat().st_size // 2],
        "text.pt": b"weights: see the attached spreadsheet\n",
        "random.safetensors": _random_bytes(2048),
        "truncated.safetensors": real.read_bytes()[: real.stat().st_size // 2],
        "evil-pickle.pt": pickle.dumps({"w": _Evil(marker)}, protocol=2),
    }
    for name, data in blobs.items():
        files[name] = d / name
        files[name].write_bytes(data)
    files["evil-torch.pt"] = d / "evil-torch.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Evil(marker)}, files["evil-torch.pt"])
    files["list.pt"] = d / "list.pt"
    torch.save([torch.zeros(1)], files["list.pt"])
    files["no-tensors.pt"] = d / "no-tensors.pt"
    torch.save({"step": 3}, files["no-tensors.pt"])
    files["bad-json.safetensors"] = d / "bad-json.safetensors"
    save_file(sd, str(files["bad-json.safetensors"]), metadata={"config": "{not json"})
    files["bad-config.safetensors"] = d / "bad-config.safetensors"
    save_file(sd, str(files["bad-config.safetensors"]), metadata={"config": '{"model": {"depth": "two"}}'})
    return files, marker


def _loading_commands(f: Path, work: Path, images: Path) -> dict[str, list[str]]:
    """Every command that reads a checkpoint (or network) file the user names."""
    return {
        "sample": ["sample", "--checkpoint", str(f), "--steps", "2", "--device", "cpu", "--no-progress",
                   "--num-samples", "2", "--grid", str(work / "grid.png")],
        "flops": ["flops", "--checkpoint", str(f), "--device", "cpu"],
        "bench": ["bench", "--checkpoint", str(f), "--batch", "1", "--repeats", "1", "--warmup", "0",
                  "--device", "cpu", "--modes", "dense"],
        "finetune": ["finetune", "--init-from", str(f), "--target", "0.5", "--data", "digits", "--steps", "1",
                     "--device", "cpu", "--no-progress", "--out-dir", str(work / "ft")],
        "train": [*train_args(work / "run", 1), "--init-from", str(f)],
        "export": ["export", str(f), "--out", str(work / "out.safetensors")],
        "export-diffusers": ["export", str(f), "--to", "diffusers", "--out", str(work / "hf")],
        "inspect": ["inspect", str(f)],
        "resume": train_args(work / "resumed", 1),
        "evaluate": ["evaluate", str(images), "--ref", str(images), "--inception", str(f), "--metrics", "fid",
                     "--no-cache", "--device", "cpu", "--quiet"],
    }  # fmt: skip


FILES = [
    "missing.pt", "directory.pt", "empty.pt", "random.pt", "random-2.pt", "truncated.pt", "text.pt",
    "random.safetensors", "truncated.safetensors", "evil-pickle.pt", "evil-torch.pt", "list.pt",
    "no-tensors.pt", "bad-json.safetensors", "bad-config.safetensors",
]  # fmt: skip
COMMANDS = [
    "sample", "flops", "bench", "finetune", "train", "export", "export-diffusers", "inspect", "resume",
    "evaluate",
]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", FILES)
def test_bad_checkpoint_files_to_every_loading_command(name, command, hostile, tmp_path, capsys):
    files, marker = hostile
    f = files[name]
    if command == "resume":
        if name == "missing.pt":
            pytest.skip("no training state is a fresh run, not an error")
        state = tmp_path / "resumed" / "checkpoints" / "state.pt"
        state.parent.mkdir(parents=True)
        (shutil.copytree if f.is_dir() else shutil.copy)(f, state)
    images = tmp_path / "images.npz"
    write_npz(images, np.random.default_rng(0).integers(0, 255, (4, 8, 8, 3), dtype=np.uint8))
    name = {"resume": "train", "export-diffusers": "export"}.get(command, command)
    line = cli_error(_loading_commands(f, tmp_path, images)[command], capsys, name)
    assert not marker.exists(), "a pickle in a checkpoint ran code"
    if name.startswith("evil") and command != "evaluate":  # evaluate reads TorchScript, not pickles
        assert "refusing to load" in line and "GLOBAL" in line
    if name == "missing.pt":
        assert "not found" in line
    made = {p.name for p in tmp_path.iterdir()} - {"images.npz", "resumed"}
    assert not made, f"files written despite the error: {made}"
    assert not temp_files(tmp_path)


# Broken diffusers folders and official training dicts ----------------------------------------------
def _diffusers_folder(path: Path) -> Path:
    from dydit.checkpoint import write_diffusers

    model = build_model(tiny_config(in_channels=3))
    return write_diffusers(path, model.state_dict(), model.config)


def _broken_folders(d: Path, marker: Path) -> dict[str, Path]:
    import argparse

    good = _diffusers_folder(d / "good")
    cases = {}
    for name in BROKEN:
        if name != "evil-training-dict":
            cases[name] = shutil.copytree(good, d / name)
    (cases["not-json"] / "config.json").write_text("{not json")
    config = json.loads((good / "config.json").read_text())
    (cases["other-network"] / "config.json").write_text(json.dumps(config | {"norm_type": "ada_norm_single"}))
    weights = "diffusion_pytorch_model.safetensors"
    (cases["no-weights"] / weights).unlink()
    data = (good / weights).read_bytes()
    (cases["truncated-weights"] / weights).write_bytes(data[: len(data) // 2])
    (cases["evil-bin"] / weights).unlink()
    with open(cases["evil-bin"] / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump({"w": _Evil(marker)}, f, protocol=2)
    split = load_file(str(good / weights))
    split["transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"] += 1
    save_file(split, str(cases["split-embedders"] / weights))
    (cases["missing-shard"] / weights).unlink()
    index = {"weight_map": {"proj_out_1.weight": "diffusion_pytorch_model-00001-of-00002.safetensors"}}
    (cases["missing-shard"] / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    cases["evil-training-dict"] = d / "0001000.pt"
    sd = build_model(tiny_config(in_channels=3)).state_dict()
    args = argparse.Namespace(model="DiT-XL/2", image_size=256, num_classes=1000, vae=_Evil(marker))
    torch.save({"model": sd, "ema": sd, "opt": {}, "args": args}, cases["evil-training-dict"])
    return cases


BROKEN = {
    "not-json": "config.json is not valid JSON (Expecting property name enclosed in double quotes at line 1",
    "other-network": "describes another network than DiT",
    "no-weights": "has a DiT config.json but no diffusion_pytorch_model.safetensors",
    "truncated-weights": "cannot read safetensors checkpoint",
    "evil-bin": "refusing to load",
    "split-embedders": "copy of the label embedder differs from block 0's",
    "missing-shard": "checkpoint not found",
    "evil-training-dict": "refusing to load",
}


def test_broken_diffusers_folders_and_official_training_dicts(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    cases = _broken_folders(tmp_path / "in", marker)
    work = tmp_path / "work"
    work.mkdir()
    for name, needle in BROKEN.items():
        f = cases[name]
        for command in (
            ["sample", "--checkpoint", str(f), "--steps", "1", "--grid", str(work / "g.png")],
            ["flops", "--checkpoint", str(f)],
            ["finetune", "--init-from", str(f), "--target", "0.5", "--dry-run"],
            ["inspect", str(f)],
            ["export", str(f), "--to", "diffusers", "--out", str(work / "hf")],
        ):  # fmt: skip
            line = cli_error(command, capsys, command[0])
            assert needle in line, (name, command[0], line)
        assert not marker.exists(), "a pickle in a checkpoint ran code"
        assert not list(work.iterdir()) and not temp_files(tmp_path)


# Checkpoints of the wrong model or router layout ---------------------------------------------------
def _dydit(layout: str, path: Path) -> Path:
    model = DyDiT(tiny_config(in_channels=3, dynamic=True, router_layout=layout))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n != "pos_embed":
                p.normal_(0, 0.3)
    return save_tiny(path, model)


def test_wrong_model_or_router_layout(tmp_path, capsys):
    ck = save_tiny(tmp_path / "dit.safetensors")
    sd = load_file(str(ck))
    cfg = tiny_config(in_channels=3, depth=3).to_dict()
    lying = tmp_path / "lying.safetensors"  # its config says 3 blocks; the tensors hold 2
    save_file(sd, str(lying), metadata={"config": json.dumps({"model": cfg})})
    common = ["--steps", "2", "--device", "cpu", "--no-progress", "--grid", str(tmp_path / "g.png")]
    line = cli_error(["sample", "--checkpoint", str(lying), *common], capsys, "sample")
    assert "lying.safetensors does not fit its weights: depth 3 in the config, 2 blocks in the" in line

    every = _dydit("all", tmp_path / "all.safetensors")
    line = cli_error(
        ["flops", "--checkpoint", str(every), "--router-layout", "forced_first"], capsys, "flops"
    )
    assert "layout 'forced_first' was requested" in line
    partial = load_file(str(every))
    del partial["blocks.1.token_selection.mlp_head.2.bias"]
    broken = tmp_path / "partial.safetensors"
    save_file(partial, str(broken), metadata={"config": json.dumps({"model": DyDiT(
        tiny_config(in_channels=3, dynamic=True, router_layout="all")).config.to_dict()})})  # fmt: skip
    line = cli_error(["sample", "--checkpoint", str(broken), *common], capsys, "sample")
    assert "missing keys: blocks.1.token_selection.mlp_head.2.bias" in line

    # A DiT-S/2-sized file as the start of a tiny run: named mismatches, no run directory.
    line = cli_error([*train_args(tmp_path / "run", 1), "--init-from", str(ck)], capsys, "train")
    assert "does not fit the model" in line and not (tmp_path / "run").exists()
    line = cli_error(["sample", "--checkpoint", str(ck), "--execution", "sliced", *common], capsys, "sample")
    assert "DyDiT models only" in line and not (tmp_path / "g.png").exists()
    for option, needle in (("depth=abc", "depth must be an integer, got 'abc'"),
                           ("learn_sigma=maybe", "learn_sigma must be true or false"),
                           ("mlp_ratio=-1", "mlp_ratio must be a positive number")):  # fmt: skip
        args = [*train_args(tmp_path / "run", 1), "--model-option", option, "--dry-run"]
        assert needle in cli_error(args, capsys, "train")


# Hostile model sizes in configs -------------------------------------------------------------------
@pytest.fixture
def refuse_builds(monkeypatch):
    """Call it once the test's files exist: from then on, building any DiT or DyDiT (even on the meta
    device) fails the test. Hostile sizes must be refused before a model of their size exists, without
    the memory or the time building it would take."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("a model was built for a hostile config")

    return lambda: monkeypatch.setattr(DiT, "__init__", refuse)


def _commands(f: Path, work: Path) -> list[list[str]]:
    """The commands that read a model config from a checkpoint; none may write anything."""
    return [
        ["inspect", str(f)],
        ["sample", "--checkpoint", str(f), "--steps", "1", "--device", "cpu", "--grid", str(work / "g.png")],
        ["flops", "--checkpoint", str(f), "--device", "cpu"],
        ["finetune", "--init-from", str(f), "--target", "0.5", "--dry-run"],
        ["export", str(f), "--to", "diffusers", "--out", str(work / "hf")],
    ]  # fmt: skip


HOSTILE_DIFFUSERS = {  # config.json entries -> the error
    "huge": ({"num_layers": 100000, "num_attention_heads": 1000, "attention_head_dim": 1000},
             "num_layers 100000 is over dydit's limit of 512 for depth"),
    "sample-size": ({"sample_size": 1000000000},
                    "sample_size 1000000000 is over dydit's limit of 4,096 for input_size"),
    "width": ({"num_attention_heads": 512, "attention_head_dim": 1024},
              "num_attention_heads x attention_head_dim 524288 is over dydit's limit of 16,384"),
    "classes": ({"num_embeds_ada_norm": 10**12}, "num_embeds_ada_norm 1000000000000 is over dydit's limit"),
    "text-heads": ({"num_attention_heads": "16"}, "num_attention_heads must be an integer, got '16'"),
    "text-eps": ({"norm_eps": "tiny"}, "norm_eps must be a number, got 'tiny'"),
    "lying-depth": ({"num_layers": 20},
                    "config.json does not fit its weights: num_layers 20 in the config, 2 blocks"),
    "lying-patch": ({"patch_size": 4}, "patch_size 4 in the config, 2 in the weights"),
}  # fmt: skip


@pytest.mark.parametrize("name", HOSTILE_DIFFUSERS)
def test_hostile_sizes_in_a_diffusers_config_are_refused_before_building(
    name, tmp_path, capsys, refuse_builds
):
    """``num_layers 100000`` used to build the model block by block (GBs after 2 minutes); a billion
    ``sample_size`` tried to allocate 5e17 bytes; a config that lies within the limits was built."""
    entries, needle = HOSTILE_DIFFUSERS[name]
    folder = _diffusers_folder(tmp_path / name)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | entries))
    work = tmp_path / "work"
    work.mkdir()
    refuse_builds()
    for command in _commands(folder, work):
        line = cli_error(command, capsys, command[0])
        assert needle in line and str(folder / "config.json") in line, (command[0], line)
    assert not list(work.iterdir()) and not temp_files(tmp_path)


def test_a_block_index_of_10_to_the_12_in_diffusers_weights_is_no_hang(tmp_path):
    """A weights key naming block 10**12 made the key conversion loop over every block index up to it."""
    folder = _diffusers_folder(tmp_path / "far")
    weights = folder / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))
    sd[f"transformer_blocks.{10**12}.norm1.linear.weight"] = torch.zeros(1)
    save_file(sd, str(weights))
    proc = run_cli(["inspect", str(folder)], timeout=HANG_GUARD_S)  # a guard against a hang, not a timing
    assert proc.returncode == 1
    assert "num_layers 2 in the config, 1000000000001 blocks" in error_line(proc.stderr)


def _foreign_folders(d: Path) -> dict[str, Path]:
    good = _diffusers_folder(d / "good")
    cases = {name: shutil.copytree(good, d / name) for name in FOREIGN}
    config = {
        "nested": "[" * 100000,
        "invalid": '{"_class_name": "DiTTransformer2DModel",\n "num_layers": 2,,}',
        "list": "[1, 2]",
        "unet": json.dumps({"_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4}),
        "sd3": json.dumps({"_class_name": "SD3Transformer2DModel", "num_layers": 24}),
        "transformers": json.dumps({"architectures": ["BertModel"], "model_type": "bert"}),
        "run-dir": json.dumps({"train": {"steps": 10}, "model": tiny_config().to_dict(), "data": {}}),
        "old-class-lacking": json.dumps({"_class_name": "Transformer2DModel", "num_layers": 2}),
    }
    for name, text in config.items():
        (cases[name] / "config.json").write_text(text)
    (cases["pipeline"] / "config.json").unlink()
    pipeline = json.dumps({"_class_name": "StableDiffusionPipeline"})
    (cases["pipeline"] / "model_index.json").write_text(pipeline)
    weights = cases["nested-index"] / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    weights.with_name(weights.name + ".index.json").write_text('{"weight_map": ' + "[" * 100000)
    cases["nested-metadata"] = d / "nested.safetensors"
    save_file(load_file(str(save_tiny(d / "tiny.safetensors"))), str(cases["nested-metadata"]),
              metadata={"config": "[" * 100000})  # fmt: skip
    return cases


FOREIGN = {
    "nested": "config.json is not usable JSON: it nests deeper than Python parses",
    "invalid": "config.json is not valid JSON (Expecting property name enclosed in double quotes at line 2 "
               "column 18)",
    "list": "config.json holds a JSON list, not a model config",
    "unet": "config.json is the config of a 'UNet2DConditionModel', not of a DiT (DiTTransformer2DModel)",
    "sd3": "config.json is the config of a 'SD3Transformer2DModel', not of a DiT",
    "transformers": "config.json has no _class_name, so it is no diffusers model config (model_type 'bert'",
    "run-dir": "config.json is a dydit run's configuration",
    "old-class-lacking": "config.json lacks ['activation_fn', 'attention_bias', 'attention_head_dim'",
    "pipeline": "a diffusers pipeline without transformer/config.json",
    "nested-index": "index.json is not usable JSON: it nests deeper than Python parses",
    "nested-metadata": "the config stored in",
}  # fmt: skip


def test_invalid_or_foreign_config_json_says_what_it_is(tmp_path, capsys):
    """An invalid or foreign ``config.json`` was reported as "no config.json"; 100000 nested ``[`` (in a
    config.json, a shard index or a safetensors' stored config) was an internal RecursionError."""
    cases = _foreign_folders(tmp_path / "in")
    work = tmp_path / "work"
    work.mkdir()
    for name, needle in FOREIGN.items():
        for command in _commands(cases[name], work):
            line = cli_error(command, capsys, command[0])
            assert needle in line, (name, command[0], line)
        assert not list(work.iterdir()) and not temp_files(tmp_path)
    line = cli_error(["inspect", str(cases["nested-metadata"])], capsys, "inspect")
    assert "nested.safetensors is not usable JSON: it nests deeper than Python parses" in line


def test_a_stored_config_that_lies_about_its_weights_is_refused_before_building(
    tmp_path, capsys, refuse_builds
):
    """A 2-block file whose stored config says depth 1000, width 200000 was an internal error (an
    allocation of 160 GB) in ``finetune --init-from``, and ``flops --checkpoint`` printed a table for
    the config without reading the weights; lies within the limits were built."""
    gray = build_model(tiny_config(in_channels=1, num_classes=10))
    sd = {k: v.contiguous() for k, v in gray.state_dict().items()}

    def stored(name: str, **lie) -> Path:
        meta = {"config": json.dumps({"model": tiny_config(in_channels=1, num_classes=10).to_dict() | lie})}
        save_file(sd, str(tmp_path / name), metadata=meta)
        return tmp_path / name

    state = tmp_path / "state.pt"  # a dydit training state whose config says 16x16 inputs
    torch.save({"format": "dydit-train-state", "step": 3, "model": sd, "ema": sd,
                "config": {"model": gray.config.to_dict() | {"input_size": 16}}}, state)  # fmt: skip
    official = tmp_path / "0001000.pt"  # official args naming DiT-XL/2 and hostile sizes
    args = argparse.Namespace(model="DiT-XL/2", image_size=10**9, num_classes=10**12)
    torch.save({"model": sd, "ema": sd, "opt": {}, "args": args}, official)
    raw = tmp_path / "raw.pt"
    torch.save(sd, raw)
    cases = {
        stored("huge.safetensors", depth=1000, hidden_size=200000):
            "config stored in {f} is invalid: depth 1000 is over dydit's limit of 512",
        stored("lying.safetensors", depth=100, hidden_size=2048, num_heads=16):
            "config stored in {f} does not fit its weights: depth 100 in the config, 2 blocks in the "
            "weights; hidden_size 2048 in the config, width 32 in the weights",
        stored("classes.safetensors", num_classes=1000):
            "num_classes 1000 (1001 label rows) in the config, 11 label rows in the weights",
        stored("sigma.safetensors", learn_sigma=False):
            "learn_sigma false (1 output channels) in the config, 2 output channels in the weights",
        state: "input_size 16 (64 tokens) in the config, 16 tokens in the weights",
        official: "does not fit the model: depth 28 in the config, 2 blocks in the weights",
    }  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    refuse_builds()
    for f, needle in cases.items():
        run = ["finetune", "--init-from", str(f), "--target", "0.5", "--data", "digits", "--steps", "1",
               "--device", "cpu", "--no-progress", "--out-dir", str(work / "ft")]  # fmt: skip
        for command in [*_commands(f, work), run]:
            if f == official and ("inspect" in command or "--dry-run" in command):
                continue  # the args name a preset: inspect says "loads NO: ...", a dry run reads no weights
            line = cli_error(command, capsys, command[0])
            assert needle.format(f=f) in line, (f.name, command[0], line)
        assert not list(work.iterdir()) and not temp_files(tmp_path)
    # No stored config: a preset named on the command line is checked against the weights too.
    line = cli_error(["flops", "--checkpoint", str(raw), "--model", "DiT-B/4"], capsys, "flops")
    assert "does not fit the model: depth 12 in the config, 2 blocks in the weights" in line
    xl = ["train", "--data", "digits", "--model", "DiT-XL/2", "--init-from", str(raw), "--steps", "1",
          "--device", "cpu", "--no-progress", "--out-dir", str(work / "run")]  # fmt: skip
    line = cli_error(xl, capsys, "train")
    assert f"{raw} does not fit the model: depth 28 in the config, 2 blocks" in line
    assert not list(work.iterdir())


def test_model_sizes_over_the_limits_are_refused(tmp_path, capsys, refuse_builds):
    """Sizes from the command line are bounded as those from files are (docs/METHOD.md §1.1)."""
    refuse_builds()
    run = train_args(tmp_path / "run", 1)
    for option, needle in (
        (f"depth={'[' * 100000}", "depth must be an integer, got '[[[["),  # was an internal RecursionError
        ("depth=100000", "depth 100000 is over dydit's limit of 512"),
        ("mlp_ratio=1000", "mlp_ratio 1000 is over dydit's limit of 64"),
        ("num_classes=1e12", "num_classes must be an integer, got 1000000000000.0"),
    ):
        assert needle in cli_error([*run, "--model-option", option, "--dry-run"], capsys, "train")
    big = [a for kv in ("hidden_size=16384", "num_heads=16", "depth=200") for a in ("--model-option", kv)]
    line = cli_error([*run, *big], capsys, "train")
    assert "about 967.2 B parameters" in line and "over dydit's limit of 20 B" in line
    line = cli_error(["sample", "--model", "DiT-XL/2", "--image-size", "32768", "--steps", "1", "--device",
                      "cpu", "--grid", str(tmp_path / "g.png")], capsys, "sample")  # fmt: skip
    assert "num_tokens ((input_size / patch_size)^2) 4194304 is over dydit's limit of 65,536" in line
    assert not list(tmp_path.iterdir())


HUGE = 10**5000  # over 4300 digits: Python refuses to print it (ValueError); float() overflows on it


def test_integers_too_long_to_print_are_one_line_errors_in_every_config_field():
    """An int of more than 4300 digits crashed the DiT config's mlp_ratio, mlp_norm_eps and
    timestep_freq_shift checks and the FLUX config's axes_dims_rope, router_layout and text_encoder
    messages (ValueError, OverflowError). Files cannot carry one (JSON and the safe unpickler refuse
    it); the Python API can (``get_model_config(name, **overrides)``, ``replace``). Every field of
    every family, given one alone or inside a list, is accepted or refused with one short line."""
    import dataclasses

    from dydit.presets import get_model_config, get_uvit_config

    dit, flux = get_model_config("DiT-S/2"), get_model_config("FLUX-t2i-tiny")
    shown = "a number of 5001 digits"
    for config, field, value, needle in (
        (dit, "mlp_ratio", HUGE, f"mlp_ratio {shown} is over dydit's limit of 64"),
        (dit, "mlp_norm_eps", HUGE, f"mlp_norm_eps must be in (0, 1), got {shown}"),
        (dit, "timestep_freq_shift", HUGE, f"or 1 (diffusers), got {shown}"),
        (flux, "axes_dims_rope", HUGE, f"axes_dims_rope must be a list of 3 integers, got {shown}"),
        (flux, "axes_dims_rope", [HUGE, 2, 2], f"axes_dims_rope [{shown}, 2, 2] must sum to"),
        (flux, "router_layout", HUGE, f"router_layout must be one of ('forced_first', 'all'), got {shown}"),
        (flux, "text_encoder", HUGE, f"text_encoder must be a dict, got {shown}"),
    ):
        with pytest.raises(DyditError) as refused:
            dataclasses.replace(config, **{field: value})
        assert needle in str(refused.value), (field, str(refused.value))
    for config in (dit, flux, get_uvit_config("U-ViT-S/2")):
        for field in dataclasses.fields(config):
            for value in (HUGE, -HUGE, [HUGE, 2, 2]):
                try:
                    dataclasses.replace(config, **{field.name: value})
                except DyditError as e:
                    assert "\n" not in str(e) and len(str(e)) < 200, (field.name, str(e)[:300])


def test_nan_weights_are_caught_before_they_reach_disk(tmp_path, capsys):
    """A checkpoint holding NaN: sampling refuses to write black images, training stops at step 1."""
    model = build_nan_model()
    ck = save_tiny(tmp_path / "nan.safetensors", model)
    args = ["sample", "--checkpoint", str(ck), "--steps", "2", "--device", "cpu", "--no-progress",
            "--num-samples", "4", "--out-dir", str(tmp_path / "s"), "--npz"]  # fmt: skip
    assert "non-finite samples for seed(s) [0, 1, 2, 3]" in cli_error(args, capsys, "sample")
    assert not list((tmp_path / "s").glob("*.png")) and not (tmp_path / "s.npz").exists()

    dit = tmp_path / "nan-dit.pt"
    from dydit.factory import build_model
    from dydit.presets import get_model_config

    gray = build_model(get_model_config("DiT-Ti/2", input_size=8, num_classes=10, depth=1, hidden_size=32,
                                        num_heads=2, in_channels=1))  # fmt: skip
    sd = gray.state_dict()
    sd["final_layer.linear.weight"][0, 0] = float("nan")
    torch.save(sd, dit)
    line = cli_error([*train_args(tmp_path / "run", 2), "--init-from", str(dit)], capsys, "train")
    assert "non-finite loss (nan) at step 1" in line and "no checkpoint had been written yet" in line


def _tiny_state(path: Path, model=None) -> Path:
    """A dydit training state of a tiny DiT (or ``model``), as ``dydit train`` writes it."""
    from dydit.train.state import make_state, save_state

    model = model if model is not None else build_model(tiny_config(in_channels=3))
    optimizer = torch.optim.AdamW(model.parameters())
    state = make_state(model=model, ema=model, optimizer=optimizer, step=1, data={"epoch": 0},
                       config={}, model_config=model.config.to_dict(), data_info={})  # fmt: skip
    return save_state(path, state)


def test_nan_weights_are_not_exported(tmp_path, capsys):
    """``export`` of NaN weights said "max relative difference 0" (NaN compared as 0) and wrote them."""
    model = build_nan_model()
    state = _tiny_state(tmp_path / "state.pt", model)
    line = cli_error(["export", str(state), "--out", str(tmp_path / "ema.safetensors")], capsys, "export")
    assert "tensor final_layer.linear.weight holds NaN values" in line and str(state) in line
    ck = save_tiny(tmp_path / "nan.safetensors", model)
    line = cli_error(
        ["export", str(ck), "--to", "diffusers", "--out", str(tmp_path / "hf")], capsys, "export"
    )
    assert "tensor final_layer.linear.weight holds NaN values" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors", "state.pt"]


def build_nan_model():
    from dydit.factory import build_model

    model = build_model(tiny_config(in_channels=3))
    with torch.no_grad():
        model.final_layer.linear.weight.fill_(float("nan"))
    return model


# Image folders for --data folder:PATH --------------------------------------------------------------
def _png(path: Path, size: tuple[int, int], mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 128 if mode in ("L", "P", "I;16") else (200, 10, 10)[: len(mode)]).save(path)


def _bomb_png(path: Path, side: int = 30000) -> None:
    """A 100-byte PNG whose header claims side x side pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(100))) + chunk(b"IEND", b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def _truncated_png(path: Path) -> None:
    """A noisy PNG cut in half: its header reads fine, its pixels do not."""
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def _folder_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--data", f"folder:{root}", "--image-size", "8", "--model", "DiT-Ti/2",
        "--model-option", "depth=1", "--model-option", "hidden_size=32", "--model-option", "num_heads=2",
        "--batch-size", "2", "--steps", "2", "--no-progress", "--device", "cpu", "--out-dir", str(out),
        *extra,
    ]  # fmt: skip


def test_image_folders_that_are_empty_missing_or_without_images(tmp_path, capsys):
    out = tmp_path / "run"
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    assert "is empty" in cli_error(_folder_args(tmp_path / "empty", out), capsys, "train")
    (tmp_path / "notes" / "cats").mkdir(parents=True)
    (tmp_path / "notes" / "cats" / "readme.txt").write_text("no images here")
    assert "is empty" in cli_error(_folder_args(tmp_path / "notes", out), capsys, "train")
    assert "does not exist" in cli_error(_folder_args(tmp_path / "nowhere", out), capsys, "train")
    _png(tmp_path / "one" / "cats" / "a.png", (8, 8))
    assert "fewer than one global batch" in cli_error(_folder_args(tmp_path / "one", out), capsys, "train")
    assert not out.exists()


@pytest.mark.parametrize("workers", ["0", "1"])
@pytest.mark.parametrize("kind", ["random-bytes", "bomb", "truncated"])
def test_unreadable_image_in_a_folder_names_the_file(tmp_path, capsys, workers, kind):
    """Found when the folder is first read, whatever --num-workers (a file spoiled later, drawn in a
    DataLoader worker whose errors used to lose the message: test_data.py)."""
    bad = tmp_path / "data" / "cats" / "a.png"
    if kind == "random-bytes":
        bad.parent.mkdir(parents=True)
        bad.write_bytes(_random_bytes(300))
    else:
        (_bomb_png if kind == "bomb" else _truncated_png)(bad)
    _png(tmp_path / "data" / "cats" / "b.png", (9, 9))
    args = _folder_args(tmp_path / "data", tmp_path / "run", "--num-workers", workers)
    line = cli_error(args, capsys, "train")
    needle = {
        "random-bytes": "cannot identify image file",
        "bomb": "decompression bomb",
        "truncated": "truncated",
    }
    assert f"cannot read image {bad}: " in line and needle[kind] in line


def test_truncated_jpeg_stops_a_folder_run_before_it_starts(tmp_path, capsys):
    """Every image is decoded when the folder is first read: the run stops before writing anything,
    naming the first bad file and counting the others (it used to fail when first drawn, mid-run)."""
    data = tmp_path / "data"
    for i in range(6):
        _png(data / "cats" / f"{i}.png", (9, 9))
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="JPEG")
    for name in ("x.jpg", "y.jpg"):
        (data / "dogs").mkdir(exist_ok=True)
        (data / "dogs" / name).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    out = tmp_path / "run"
    line = cli_error(_folder_args(data, out, "--batch-size", "8", "--steps", "1"), capsys, "train")
    assert f"cannot read image {data / 'dogs' / 'x.jpg'}: " in line and "truncated" in line
    assert line.endswith("(and 1 more unreadable images)") and not out.exists()


def test_mixed_sizes_and_modes_in_a_folder_train(tmp_path):
    """Mixed sizes, aspect ratios and modes are what ADM's centre crop is for: training runs."""
    mixed = tmp_path / "mixed"
    for i, (size, mode) in enumerate(
        [((40, 30), "RGB"), ((8, 64), "L"), ((13, 13), "RGBA"), ((100, 9), "P")]
    ):
        _png(mixed / ("cats" if i % 2 else "dogs") / f"{i}.png", size, mode)
    assert main(_folder_args(mixed, tmp_path / "ok")) == 0


# Malformed reference or sample sets for dydit evaluate -----------------------------------------------
def _bad_sets(d: Path, marker: Path) -> dict[str, Path]:
    good = np.random.default_rng(0).integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)
    sets = {}

    def npz(name: str, **arrays) -> None:
        sets[name] = d / f"{name}.npz"
        np.savez(sets[name], **arrays)

    npz("float-images", arr_0=good.astype(np.float32))
    npz("no-arr_0", images=good)
    npz("zero-images", arr_0=good[:0])
    npz("evil-arr_0", arr_0=np.array([_Evil(marker)] * 2, dtype=object))
    npz("labels-mismatch", arr_0=good, arr_1=np.zeros(3))
    npz("stats-without-sigma", mu=np.zeros(3))
    for name, data in {"random": _random_bytes(999), "empty": b""}.items():
        sets[name] = d / f"{name}.npz"
        sets[name].write_bytes(data)
    write_npz(d / "good.npz", good)
    whole = (d / "good.npz").read_bytes()
    sets["truncated"] = d / "truncated.npz"
    sets["truncated"].write_bytes(whole[: len(whole) // 2])
    sets["empty-folder"] = d / "empty-folder"
    sets["empty-folder"].mkdir()
    sets["mixed-folder"] = d / "mixed-folder"
    _png(sets["mixed-folder"] / "a.png", (8, 8))
    _png(sets["mixed-folder"] / "b.png", (8, 9))
    sets["corrupt-folder"] = d / "corrupt-folder"
    _png(sets["corrupt-folder"] / "a.png", (8, 8))
    (sets["corrupt-folder"] / "b.png").write_bytes(_random_bytes(200))
    sets["bomb-folder"] = d / "bomb-folder"
    _bomb_png(sets["bomb-folder"] / "a.png")
    sets["truncated-png-folder"] = d / "truncated-png-folder"
    _truncated_png(sets["truncated-png-folder"] / "a.png")
    _png(sets["truncated-png-folder"] / "b.png", (64, 64))
    sets["text-file"] = d / "samples.txt"
    sets["text-file"].write_text("0 1 2 3")
    return sets


SETS = [
    "float-images", "no-arr_0", "zero-images", "evil-arr_0", "labels-mismatch", "stats-without-sigma",
    "random", "empty", "truncated", "empty-folder", "mixed-folder", "corrupt-folder", "bomb-folder",
    "truncated-png-folder", "text-file",
]  # fmt: skip
# Known bugs in src/dydit/evaluate/images.py (owned by the evaluate work; listed in docs/RELIABILITY.md).


@pytest.mark.parametrize("role", ["samples", "ref"])
@pytest.mark.parametrize("name", SETS)
def test_malformed_image_sets_to_evaluate(name, role, tmp_path, capsys, request):
    marker = tmp_path / "PWNED"
    sets = _bad_sets(tmp_path, marker)
    if name == "stats-without-sigma" and role == "samples":
        pytest.skip("statistics are a reference format")
    good, bad = str(tmp_path / "good.npz"), str(sets[name])
    samples, ref = (bad, good) if role == "samples" else (good, bad)
    net = tmp_path / "net.pt"
    torch.jit.script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())).save(str(net))
    args = ["evaluate", samples, "--ref", ref, "--inception", str(net), "--metrics", "fid", "--no-cache",
            "--device", "cpu", "--quiet"]  # fmt: skip
    line = cli_error(args, capsys, "evaluate")
    assert not marker.exists()
    if name.endswith("folder") or name == "text-file":
        assert Path(bad).name in line


def test_object_label_array_in_an_npz_is_a_clear_error(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    images = np.zeros((3, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "evil.npz", arr_0=images, arr_1=np.array([_Evil(marker), 1, 2], dtype=object))
    write_npz(tmp_path / "good.npz", images)
    net = tmp_path / "net.pt"
    torch.jit.script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())).save(str(net))
    try:
        cli_error(["evaluate", str(tmp_path / "evil.npz"), "--ref", str(tmp_path / "good.npz"), "--inception",
                   str(net), "--no-cache", "--device", "cpu", "--quiet"], capsys, "evaluate")  # fmt: skip
    finally:
        assert not marker.exists()


# Outputs onto what is not a regular file -------------------------------------------------------------
def _output_commands(ck: Path, state: Path, work: Path) -> dict[str, tuple[str, list[str]]]:
    """command -> (suffix of its output, its arguments without the output path)."""
    sample = ["sample", "--checkpoint", str(ck), "--steps", "1", "--num-samples", "2", "--device", "cpu",
              "--no-progress"]  # fmt: skip
    bench = ["bench", "--checkpoint", str(ck), "--batch", "1", "--repeats", "1", "--warmup", "0",
             "--modes", "dense", "--cfg-scale", "1", "--device", "cpu", "--timesteps", "500"]  # fmt: skip
    return {
        "sample --grid": (".png", [*sample, "--grid"]),
        "sample --npz": (
            ".npz",
            [*sample, "--out-dir", str(work / "s"), "--grid", str(work / "g.png"), "--npz"],
        ),
        "bench --json": (".json", [*bench, "--json"]),
        "export --out": (".safetensors", ["export", str(state), "--out"]),
    }


def test_outputs_never_replace_devices_fifos_or_folders(tmp_path, capsys):
    """As root, ``--grid /dev/full`` replaced /dev/full with a PNG (an atomic rename replaces any
    directory entry). Every command's output onto a FIFO, a folder, a link to /dev/null, a dangling
    link, a file below a missing folder, and /dev/null itself: one line naming the path before any
    work, and the target, its folder and /dev/null are left as they were.

    /dev/null comes last: code without the refusal fails on the FIFO before it could replace the
    system's /dev/null."""
    ck = save_tiny(tmp_path / "tiny.safetensors")
    state = _tiny_state(tmp_path / "state.pt")
    work = tmp_path / "work"
    work.mkdir()
    kinds = ("fifo", "folder", "null", "dangling")
    for command, (suffix, args) in _output_commands(ck, state, work).items():
        fifo, folder, link, dangling = (work / f"{kind}{suffix}" for kind in kinds)
        os.mkfifo(fifo)
        folder.mkdir()
        link.symlink_to(os.devnull)
        dangling.symlink_to(work / "nowhere")
        for target in (fifo, folder, link, dangling, work / "missing" / f"x{suffix}", Path(os.devnull)):
            before, null_before = _node(target), _node(os.devnull)
            line = cli_error([*args, str(target)], capsys, command.split()[0])
            if target == Path(os.devnull) and command == "export --out":
                assert "must be a .safetensors file" in line, line
            else:
                assert f"cannot write {target}: " in line, (command, line)
            assert _node(target) == before and _node(os.devnull) == null_before, (command, target)
        assert stat.S_ISCHR(os.stat(os.devnull).st_mode) and not list(folder.iterdir()), command
    assert sorted(p.name for p in work.iterdir() if not p.name.startswith(kinds)) == []  # no s/, no g.png
    assert not temp_files(tmp_path) and not list(Path("/dev").glob(".null.tmp-*"))


def _node(path: Path | str) -> tuple[int, ...] | None:
    """The directory entry itself (links not followed): type and mode, inode, device numbers."""
    if not os.path.lexists(path):
        return None
    st = os.lstat(path)
    return st.st_mode, st.st_ino, st.st_dev, st.st_rdev
