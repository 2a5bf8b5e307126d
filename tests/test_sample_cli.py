"""``dydit sample``: dry run, outputs, one-line errors, DyDiT execution modes, and a 2-process torchrun
run that reproduces the 1-process images exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from faultkit import HANG_GUARD_S
from safetensors.torch import save_file

from dydit.cli import main
from dydit.factory import build_model

FAST = ["--steps", "3", "--device", "cpu", "--no-progress"]


def _save(model, path: Path) -> Path:
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata={"config": json.dumps({"model": model.config.to_dict()})})
    return path


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    model = build_model(tiny_config(in_channels=3))
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.2)
    torch.nn.init.normal_(model.final_layer.adaLN_modulation[-1].weight, std=0.2)
    return _save(model, tmp_path / "tiny.safetensors")


def test_dry_run_prints_settings_and_writes_nothing(ckpt: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = [
        "sample",
        "--checkpoint",
        str(ckpt),
        "--sampler",
        "ddim",
        "--steps",
        "ddim50",
        "--eta",
        "0.5",
        "--classes",
        "1,3",
        "--num-samples",
        "3",
        "--dry-run",
    ]
    assert main(args) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["sampling"]["sampler"] == "ddim" and plan["sampling"]["eta"] == 0.5
    assert plan["timesteps"].startswith("50 original timesteps 980..0")
    assert plan["labels"] == [1, 3, 1] and plan["model"]["num_classes"] == 4 and plan["codec"] == "pixel"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.safetensors"]


def test_grid_out_dir_and_npz(ckpt: Path, tmp_path: Path) -> None:
    grid, out = tmp_path / "grid.png", tmp_path / "imgs"
    args = [
        "sample",
        "--checkpoint",
        str(ckpt),
        *FAST,
        "--classes",
        "0,2",
        "--num-samples",
        "5",
        "--batch-size",
        "2",
        "--grid",
        str(grid),
        "--out-dir",
        str(out),
        "--npz",
    ]
    assert main(args) == 0
    assert grid.exists() and len(list(out.glob("*.png"))) == 5
    data = np.load(tmp_path / "imgs.npz")
    assert data["arr_0"].shape == (5, 8, 8, 3) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].tolist() == [0, 2, 0, 2, 0]
    # Without --out-dir the grid is sampled in memory: the same images.
    from PIL import Image

    grid2 = tmp_path / "grid2.png"
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(ckpt),
                *FAST,
                "--classes",
                "0,2",
                "--num-samples",
                "5",
                "--grid",
                str(grid2),
            ]
        )
        == 0
    )
    with Image.open(grid) as a, Image.open(grid2) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--checkpoint", "{tmp}/missing.pt"], "checkpoint not found"),
        (["--checkpoint", "{tmp}/corrupt.pt"], "corrupt"),
        (["--model", "DiT-Q/2"], "unknown model"),
        (["--checkpoint", "{ckpt}", "--classes", "1,4"], "class 4 is out of range"),
        (["--checkpoint", "{ckpt}", "--eta", "0.5"], "ddim sampler only"),
        (["--model", "DiT-S/2", "--random-weights"], "needs --vae"),
        (["--model", "DiT-Ti/4"], "--random-weights"),
        (["--checkpoint", "{ckpt}", "--random-weights"], "without a checkpoint"),
        (["--checkpoint", "{ckpt}", "--execution", "sliced"], "DyDiT models only"),
        (["--checkpoint", "{ckpt}", "--npz"], "--out-dir"),
        ([], "give --checkpoint or --model"),
    ],
)
def test_bad_input_is_a_one_line_error(extra, needle, ckpt: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint at all")
    extra = [e.format(tmp=tmp_path, ckpt=ckpt) for e in extra]
    assert main(["sample", *extra, *FAST, "--grid", str(tmp_path / "g.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--cfg-scale", "-1"),
        ("--steps", "0"),
        ("--steps", "ddim0"),
        ("--num-samples", "-2"),
        ("--seed", "-1"),
    ],
)
def test_bad_option_values_exit_nonzero(option: str, value: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["sample", "--model", "DiT-Ti/2", option, value, "--dry-run"])
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_dydit_checkpoint_in_sliced_execution(tmp_path: Path) -> None:
    dit = build_model(tiny_config(in_channels=3))
    torch.nn.init.normal_(dit.final_layer.linear.weight, std=0.2)
    from dydit.models.dydit import DyDiT

    ck = _save(DyDiT.from_dit(dit), tmp_path / "dydit.safetensors")
    for mode in ("masked", "sliced"):
        out = tmp_path / f"{mode}.png"
        assert (
            main(
                [
                    "sample",
                    "--checkpoint",
                    str(ck),
                    *FAST,
                    "--execution",
                    mode,
                    "--num-samples",
                    "2",
                    "--grid",
                    str(out),
                ]
            )
            == 0
        )
        assert out.exists()


def _dydit_ckpt(tmp_path: Path) -> Path:
    dit = build_model(tiny_config(in_channels=3))
    torch.nn.init.normal_(dit.final_layer.linear.weight, std=0.2)
    from dydit.models.dydit import DyDiT

    return _save(DyDiT.from_dit(dit), tmp_path / "dydit.safetensors")


def test_a_dydit_samples_sliced_by_default_and_says_so(tmp_path: Path, capsys, monkeypatch) -> None:
    from dydit.models.dydit import DyDiT

    ck = _dydit_ckpt(tmp_path)
    args = ["sample", "--checkpoint", str(ck), *FAST, "--num-samples", "2", "--out-dir", str(tmp_path / "s")]
    assert main([*args, "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["execution"] == "sliced"

    def masked_forward(*a, **k):  # the masked execution: must not run
        raise AssertionError("sampled in masked execution")

    monkeypatch.setattr(DyDiT, "forward_with_routing", masked_forward)
    assert main(args) == 0
    assert "execution: sliced" in capsys.readouterr().err
    assert json.loads((tmp_path / "s" / "sampling.json").read_text())["execution"] == "sliced"
    # masked stays selectable, and a sample directory never mixes executions
    monkeypatch.undo()
    assert main([*args, "--execution", "masked"]) == 1
    assert "differs in: execution" in capsys.readouterr().err
    assert main([*args[:-1], str(tmp_path / "m"), "--execution", "masked"]) == 0
    assert "execution: masked" in capsys.readouterr().err


def test_a_dit_says_it_runs_dense(ckpt: Path, tmp_path: Path, capsys) -> None:
    assert main(["sample", "--checkpoint", str(ckpt), *FAST, "--num-samples", "1",
                 "--grid", str(tmp_path / "g.png")]) == 0  # fmt: skip
    assert "execution: dense (a DiT)" in capsys.readouterr().err


def test_random_weights_need_the_flag(tmp_path: Path, capsys) -> None:
    base = ["sample", "--model", "DiT-Ti/4", "--image-size", "8", *FAST, "--num-samples", "1"]
    assert main([*base, "--grid", str(tmp_path / "g.png")]) == 1
    assert "--random-weights" in capsys.readouterr().err and not (tmp_path / "g.png").exists()
    assert main([*base, "--random-weights", "--grid", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").exists()


def test_default_grid_goes_beside_the_out_dir_not_into_the_current_folder(
    ckpt: Path, tmp_path: Path, monkeypatch
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "runs" / "imgs"
    assert (
        main(["sample", "--checkpoint", str(ckpt), *FAST, "--num-samples", "3", "--out-dir", str(out)]) == 0
    )
    assert list(cwd.iterdir()) == []
    assert (tmp_path / "runs" / "imgs.png").is_file()
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    # without --out-dir the default is still sample.png here
    assert main(["sample", "--checkpoint", str(ckpt), *FAST, "--num-samples", "1"]) == 0
    assert [p.name for p in cwd.iterdir()] == ["sample.png"]


def test_no_progress_silences_every_bar(ckpt: Path, tmp_path: Path, capfd) -> None:
    args = [
        "sample",
        "--checkpoint",
        str(ckpt),
        *FAST,
        "--num-samples",
        "3",
        "--out-dir",
        str(tmp_path / "s"),
    ]
    assert main([*args, "--npz", "--grid", str(tmp_path / "g.png")]) == 0
    err = capfd.readouterr().err
    assert (tmp_path / "s.npz").is_file()
    assert "packing npz" not in err and "sampling" not in err and "%|" not in err, err


@pytest.mark.distributed
def test_two_process_torchrun_matches_one_process(ckpt: Path, tmp_path: Path) -> None:
    common = [
        "sample",
        "--checkpoint",
        str(ckpt),
        *FAST,
        "--cfg-scale",
        "2",
        "--num-samples",
        "5",
        "--batch-size",
        "2",
    ]
    # Reference: one process, one thread (torchrun gives each rank one thread).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = ["--out-dir", str(tmp_path / "one"), "--npz", "--grid", str(tmp_path / "g1.png")]
        assert main([*common, *one]) == 0
    finally:
        torch.set_num_threads(threads)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=2",
    ]

    def run2(*args: str) -> None:
        cmd = [*torchrun, "-m", "dydit", *common, *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_GUARD_S, env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]

    run2("--out-dir", str(tmp_path / "two"), "--npz", "--grid", str(tmp_path / "g2.png"))
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    np.testing.assert_array_equal(one["arr_0"], two["arr_0"])
    np.testing.assert_array_equal(one["arr_1"], two["arr_1"])
    assert len(list((tmp_path / "two").glob("*.png"))) == 5
    assert (tmp_path / "g2.png").read_bytes() == (tmp_path / "g1.png").read_bytes()
    # In-memory path: each rank samples its share and the shares are gathered for the grid.
    run2("--grid", str(tmp_path / "g3.png"))
    assert (tmp_path / "g3.png").read_bytes() == (tmp_path / "g1.png").read_bytes()


def test_engine_options_reach_the_sliced_engine(tmp_path: Path, capsys, monkeypatch) -> None:
    import dydit.models.sliced as sliced

    ck = _dydit_ckpt(tmp_path)
    args = ["sample", "--checkpoint", str(ck), *FAST, "--num-samples", "2"]
    assert main([*args, "--token-bucket", "3", "--compile", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["engine"] == {"compile": True, "token_bucket": 3}
    seen = []
    real = sliced.engine

    def engine(model, **options):  # records the options; compiles nothing (slow on a CPU)
        seen.append(options)
        return real(model, **{k: v for k, v in options.items() if not k.startswith("compile")})

    monkeypatch.setattr(sliced, "engine", engine)
    extra = ["--compile", "--compile-mode", "max-autotune-no-cudagraphs", "--token-bucket", "3"]
    assert main([*args, *extra, "--pack-budget", "0", "--grid", str(tmp_path / "a.png")]) == 0
    assert seen == [
        {"compile": True, "compile_mode": "max-autotune-no-cudagraphs", "token_bucket": 3, "pack_budget": 0.0}
    ]
    assert main([*args, "--grid", str(tmp_path / "b.png")]) == 0  # the model's default engine
    assert len(seen) == 1
    a, b = (np.asarray(__import__("PIL.Image").Image.open(tmp_path / f"{n}.png")) for n in "ab")
    assert np.array_equal(a, b)  # bucket padding and gathered packs change no image


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--execution", "masked", "--compile"], "--compile: options of the sliced engine; this run's "),
        (["--execution", "dense", "--token-bucket", "8"], "--token-bucket: options of the sliced engine"),
        (["--compile-mode", "reduce-overhead"], "--compile-mode applies only with --compile"),
    ],
)
def test_engine_options_outside_sliced_execution_are_one_line_errors(extra, needle, tmp_path, capsys) -> None:
    ck = _dydit_ckpt(tmp_path)
    assert main(["sample", "--checkpoint", str(ck), *FAST, *extra, "--dry-run"]) == 1
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_engine_options_on_a_dit_are_one_line_errors(ckpt: Path, capsys) -> None:
    assert main(["sample", "--checkpoint", str(ckpt), *FAST, "--pack-budget", "0.2", "--dry-run"]) == 1
    assert (
        "--pack-budget: options of the sliced engine; this run's execution is dense"
        in capsys.readouterr().err
    )
