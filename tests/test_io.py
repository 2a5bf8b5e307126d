"""The bottom-layer helpers every command shares: atomic writes (also of .npz files), the seed
parser, preset names, and the machine and number formatting of reports."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from faultkit import temp_files

from dydit import io
from dydit.errors import DyditError
from dydit.io import atomic_write, npz_name, remove_stale_temps_in, save_npz, save_text
from dydit.log import device_name, format_number, machine_description
from dydit.presets import (
    DIT_NAMES,
    MODEL_NAMES,
    SIT_NAMES,
    dit_name,
    dydit_name,
    is_dynamic_name,
    is_sit_name,
)
from dydit.seeds import SeedError, parse_seed


# Atomic writes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("durable", [True, False])
def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path, durable):
    target = tmp_path / "a.npy"
    atomic_write(target, lambda p: Path(p).write_bytes(b"old"), durable=durable)

    def full_disk(path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DyditError, match="no space left on device; the previous a.npy is kept"):
        atomic_write(target, full_disk, durable=durable)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.npy"]


def test_save_npz_is_atomic_and_keeps_its_name(tmp_path):
    path = save_npz(tmp_path / "x.npz", {"arr_0": np.arange(3)})
    assert path == tmp_path / "x.npz" and [p.name for p in tmp_path.iterdir()] == ["x.npz"]
    with np.load(path) as data:
        assert data["arr_0"].tolist() == [0, 1, 2]

    class Unsaveable:  # np.savez fails on it halfway through writing the archive
        def __array__(self, *args, **kwargs):
            raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(DyditError, match="cannot write .*x.npz"):
        save_npz(path, {"arr_0": np.zeros(2), "arr_1": Unsaveable()})
    with np.load(path) as data:  # the previous archive is whole
        assert data["arr_0"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["x.npz"]
    assert npz_name(tmp_path / "ref") == tmp_path / "ref.npz" and npz_name(path) == path


def test_stale_temps_of_dead_writers_are_removed_once_per_directory(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)  # that process has exited
    stale = tmp_path / f".000001.png.tmp-{dead_pid}"
    live = tmp_path / f".000002.png.tmp-{os.getppid()}"  # a live process (this one's parent)
    mine = tmp_path / f".000003.png.tmp-{os.getpid()}"
    for p in (stale, live, mine):
        p.write_bytes(b"x")
    assert remove_stale_temps_in(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and mine.exists()


def _node(path: Path | str) -> tuple[int, int, int, int]:
    """What identifies a directory entry (not following links): type and mode, inode, device numbers."""
    st = os.lstat(path)
    return st.st_mode, st.st_ino, st.st_dev, st.st_rdev


def test_writes_refuse_anything_that_is_not_a_regular_file(tmp_path):
    """A FIFO, a socket, a folder, links to them and to /dev/null, a dangling link, /dev/null itself:
    refused with one line naming the path; each stays what it was and no temporary file is left.

    /dev/null comes last: code without the refusal fails on the FIFO before it could replace the
    system's /dev/null (which an atomic rename does as root)."""
    fifo, folder = tmp_path / "fifo", tmp_path / "folder"
    os.mkfifo(fifo)
    folder.mkdir()
    links = {"fifo-link": fifo, "folder-link": folder, "null-link": Path(os.devnull)}
    links["dangling"] = tmp_path / "nowhere"
    for name, to in links.items():
        (tmp_path / name).symlink_to(to)
    targets = [fifo, tmp_path / "fifo-link", folder, tmp_path / "folder-link", tmp_path / "null-link"]
    targets.append(tmp_path / "dangling")
    with contextlib.closing(socket.socket(socket.AF_UNIX)) as sock:
        with contextlib.suppress(OSError):  # a path too long for a socket: the other cases remain
            sock.bind(str(tmp_path / "sock"))
            targets.insert(1, tmp_path / "sock")
        targets.append(Path(os.devnull))
        for target in targets:
            before, null_before = _node(target), _node(os.devnull)
            for durable in (True, False):
                with pytest.raises(DyditError, match=f"^cannot write {re.escape(str(target))}: ") as e:
                    save_text(target, "replaced?", durable=durable)
                assert "\n" not in str(e.value)
                assert _node(target) == before and _node(os.devnull) == null_before, target
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode) and not list(Path("/dev").glob(".null.tmp-*"))
    assert not list(folder.iterdir()) and not temp_files(tmp_path)
    assert "is a FIFO (through a symbolic link)" in _error(tmp_path / "fifo-link")
    assert "is a character device" in _error(os.devnull) and "is a directory" in _error(folder)
    assert "symbolic link to a missing file" in _error(tmp_path / "dangling")


def _error(path) -> str:
    with pytest.raises(DyditError) as e:
        save_text(path, "x")
    return str(e.value)


def test_a_link_to_a_regular_file_is_written_through(tmp_path):
    """The file the link names is replaced atomically; the link stays a link (as ``cp`` or ``>``)."""
    (tmp_path / "runs").mkdir()
    real = tmp_path / "runs" / "bench.json"
    real.write_text("old")
    link = tmp_path / "latest.json"
    link.symlink_to(Path("runs") / "bench.json")
    assert save_text(link, "new") == link
    assert link.is_symlink() and os.readlink(link) == str(Path("runs") / "bench.json")
    assert real.read_text() == "new" and not temp_files(tmp_path) and not temp_files(tmp_path / "runs")


def test_a_missing_folder_of_a_file_is_an_error_not_created(tmp_path):
    """``--grid /nonexistent/dir/g.png`` created /nonexistent/dir; only output trees a command owns
    (``parents=True``) get their folders created."""
    target = tmp_path / "no" / "such" / "g.png"
    with pytest.raises(DyditError, match=f"directory {re.escape(str(target.parent))} does not exist"):
        save_text(target, "x")
    assert not (tmp_path / "no").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(DyditError, match="(?i)not a directory"):
        save_text(tmp_path / "file" / "x.json", "x")
    assert io.output_target(target, tree=tmp_path / "no") == target  # inside the tree a command creates
    assert save_text(target, "x", parents=True).read_text() == "x"


# Seeds ------------------------------------------------------------------------------------------
def test_one_seed_parser_for_every_command():
    assert parse_seed("0") == 0 and parse_seed(" 7 ") == 7 and parse_seed(2**63 - 1) == 2**63 - 1
    for bad in ("-1", str(2**63), "1.5", "x", ""):
        with pytest.raises(SeedError):
            parse_seed(bad)
    assert issubclass(SeedError, DyditError)
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=parse_seed)
    assert p.parse_args(["--seed", "3"]).seed == 3
    with pytest.raises(SystemExit):
        p.parse_args(["--seed", "-1"])


# Preset names -----------------------------------------------------------------------------------
def test_preset_names_convert_between_dit_and_dydit():
    assert dydit_name("DiT-S/2") == "DyDiT-S/2" and dydit_name("DyDiT-S/2") == "DyDiT-S/2"
    assert dit_name("DyDiT-XL/2") == "DiT-XL/2" and dit_name("DiT-XL/2") == "DiT-XL/2"
    assert dit_name("SiT-XL/2") == "SiT-XL/2" and is_sit_name("SiT-XL/2") and not is_sit_name("DiT-XL/2")
    assert is_dynamic_name("DyDiT-Ti/2") and not is_dynamic_name("DiT-Ti/2")
    assert all(dit_name(dydit_name(n)) == n for n in DIT_NAMES)
    assert {dydit_name(n) for n in DIT_NAMES} <= set(MODEL_NAMES)
    assert dydit_name("SiT-XL/2") not in MODEL_NAMES and set(SIT_NAMES) <= set(MODEL_NAMES)


# Reports ----------------------------------------------------------------------------------------
def test_machine_and_number_formatting():
    assert device_name("cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert machine_description("cpu").endswith(", 2 torch threads")
        torch.set_num_threads(1)
        assert machine_description("cpu").endswith(", 1 torch thread")
    finally:
        torch.set_num_threads(threads)
    assert format_number(None) == "–" and format_number(float("nan")) == "–"
    assert format_number(1.23456) == "1.235" and format_number(2.5, ".1f") == "2.5"
