"""``dydit inspect`` on TD-LoRA files (docs/METHOD.md §18): a file written by a real TD-LoRA fine-tune
is recognised, with its rank, groups, adapted layers, base, parameter counts and usage; a file that
does not fit its stored config, a moved or changed base are reported; other files read as before."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_train import tiny_run

from dydit.checkpoint.lora import LORA_FILE, read_lora
from dydit.checkpoint.lora_info import lora_facts, lora_file_of
from dydit.cli import main
from dydit.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fine_tune(tmp_path_factory):
    """(base file, the TD-LoRA run's result): a tiny DiT, then dydit finetune --lora 4 --lora-groups 2."""
    root = tmp_path_factory.mktemp("lora-inspect")
    base = train(tiny_run(root, "dit", steps=2)).export
    options = dict(
        model="DyDiT-Ti/2", init_from=str(base), target=0.5, lora_rank=4, lora_groups=2, steps=2,
        complete_steps=1,
    )  # fmt: skip
    return base, train(tiny_run(root, "lora", **options))


def _rows(text: str) -> dict[str, str]:
    """inspect's output as {label: text with its wrapped lines joined}."""
    rows: dict[str, str] = {}
    label = None
    for line in text.splitlines():
        if line[:12].strip():
            label = line[:12].strip()
            rows[label] = line[12:].strip()
        elif label is not None:
            rows[label] += " " + line.strip()
    return rows


def _inspect(capsys, path) -> tuple[int, dict[str, str], str]:
    code = main(["inspect", str(path)])
    out = capsys.readouterr()
    return code, _rows(out.out), out.err


def test_inspect_describes_a_td_lora_file(fine_tune, capsys):
    base, res = fine_tune
    code, rows, _ = _inspect(capsys, res.export)
    assert code == 0
    assert rows["format"].startswith("TD-LoRA adapter file")
    assert "rank 4 in 2 group(s) of 2" in rows["adapters"]
    depth = len(res.model.blocks)
    paths = res.model.blocks[0].lora.paths
    assert rows["layers"].startswith(f"block{'s' if depth > 1 else ''} ")
    assert f"(all {depth})" in rows["layers"] and ", ".join(paths) in rows["layers"]
    assert f"({depth * len(paths)} adapted linears)" in rows["layers"]
    assert str(base) in rows["base"] and "sha256 matches" in rows["base"]
    assert "DyDiT" in rows["model"] and rows["loads"].startswith("onto the base")
    # Parameter counts: the file's tensors, and the fraction the fine-tune really trained.
    tensors, _, _ = read_lora(res.export)
    trained = sum(p.numel() for p in res.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in res.model.parameters())
    facts = lora_facts(res.export)
    n = facts["parameters"]
    assert n["file"] == sum(v.numel() for v in tensors.values()) == trained
    assert n["model"] == total and n["trainable_fraction"] == pytest.approx(trained / total)
    assert n["adapters"] == sum(v.numel() for k, v in tensors.items() if ".lora.adapters." in k)
    assert rows["parameters"].startswith(f"{trained:,} in the file")
    assert f"trainable {100 * trained / total:.3g}% of {total:,}" in rows["parameters"]
    assert rows["step"] == "2" and "lora_rank=4" in rows["run"]
    assert rows["sample"].startswith(f"dydit sample --lora {res.export} ")
    assert rows["merge"].startswith(f"dydit export {res.export} --merge-lora ")
    # The run directory names the same file.
    assert lora_file_of(res.run_dir) == res.export
    assert _inspect(capsys, res.run_dir)[1] == rows


def test_inspect_reports_a_moved_or_changed_base_and_a_file_that_does_not_fit(fine_tune, tmp_path, capsys):
    base, res = fine_tune
    with safe_open(str(res.export), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    config = json.loads(meta["config"])

    def naming(base_path) -> dict[str, str]:
        return {**meta, "config": json.dumps({**config, "base": str(base_path)})}

    moved = tmp_path / "moved.safetensors"
    save_file(tensors, str(moved), metadata=naming(tmp_path / "x"))
    code, rows, _ = _inspect(capsys, moved)
    assert code == 0 and "missing: give the base weights" in rows["base"]
    assert "--checkpoint BASE" in rows["sample"] and "--base BASE" in rows["merge"]
    changed_base = tmp_path / "base.safetensors"
    shutil.copy(base, changed_base)
    with open(changed_base, "ab") as f:
        f.write(b" ")
    changed = tmp_path / "changed.safetensors"
    save_file(tensors, str(changed), metadata=naming(changed_base))
    code, rows, _ = _inspect(capsys, changed)
    assert code == 0 and "CHANGED" in rows["base"]
    # A file whose tensors do not fit its stored config: described, then exit status 1.
    up = next(k for k in tensors if k.endswith(".up"))
    wrong = tmp_path / "wrong.safetensors"
    save_file({**tensors, up: torch.zeros(3, 3)}, str(wrong), metadata=meta)
    code, rows, err = _inspect(capsys, wrong)
    assert code != 0 and rows["loads"].startswith("NO:") and "1 of another shape" in rows["loads"]
    assert "does not load" in err and rows["format"].startswith("TD-LoRA")


def test_other_files_are_described_as_before(fine_tune, capsys):
    base, res = fine_tune
    assert lora_file_of(base) is None
    code, rows, _ = _inspect(capsys, base)
    assert code == 0 and rows["format"] == "dydit .safetensors export with its config"
    assert rows["loads"] == "strictly, every key and shape" and rows["routers"].startswith("none")
    assert "adapters" not in rows and "TD-LoRA" not in " ".join(rows.values())
    # The fine-tune's training state is still a training dict, not a TD-LoRA file.
    state = res.run_dir / "checkpoints" / "state.pt"
    assert state.is_file() and lora_file_of(state) is None and (res.run_dir / LORA_FILE).is_file()
