"""Files written safely: atomic replacement, and one writer per directory (docs/ARCHITECTURE.md §6.5).

- :func:`atomic_write` writes a file through a hidden temporary file, flushed and renamed: the file
  either exists whole or not at all, and a failed write keeps the previous version.
- :func:`locked_dir` holds an exclusive OS lock (``fcntl.flock``) on ``DIR/.dydit.lock`` while a
  command writes ``DIR``. A second writer of the same directory stops at once with a one-line
  :class:`~dydit.errors.DyditError` naming the directory and the process that holds it, and touches
  nothing; shared caches wait for the holder instead (``wait=True``) and then reuse its work. The
  kernel releases the lock when its process exits in any way, SIGKILL included, so a lock can
  never outlive its holder (unlike a pid file). The holder writes its pid and host into the lock
  file for the message and removes the file when done; the ranks of one torchrun job share the
  directory, rank 0 holding the lock.

These are the one implementation of each: every run, sample, demo, latent-cache and evaluation-cache
directory is locked through :func:`locked_dir`; every file dydit publishes (checkpoints, exports,
``config.json``, the stats log when rewritten, latent shards, evaluation-cache entries, sample PNGs
and ``.npy`` files, grids and ``.npz`` files, :func:`save_npz`) is written by :func:`atomic_write`.
Per-image sample files pass ``durable=False``: no fsync and no stale-file scan per image, for
directories of tens of thousands of PNGs.

What a write may replace (:func:`output_target`, also called by commands before they start work):
only a regular file. A path that exists as anything else (a directory, a device such as
``/dev/null``, a FIFO, a socket, or a symbolic link to one of these) is refused with one line naming
it, and left untouched: an atomic rename would replace the device node itself. A symbolic link to a
regular file is written through: the file it points to is replaced atomically and the link is kept,
as ``cp`` or a shell redirection would. The directory of a file must exist: a missing folder is an
error, not created, except below an output directory the command owns (``parents=True``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from safetensors import SafetensorError

from dydit import distributed
from dydit.errors import DyditError

LOCK_FILE = ".dydit.lock"
_FILE_MODE = 0o666
# Lock files cannot be created or written in these cases; the directory is then unwritable anyway.
_UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT)


# Atomic writes ---------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of ``path`` left by writers killed mid-write (their process is gone).

    A SIGKILL during :func:`atomic_write` leaves ``.NAME.tmp-PID`` behind; for a large model that is
    gigabytes per interruption, so the next write of the same file clears them first.
    """
    path = Path(path)
    return _remove_dead_writers(path.parent.glob(f".{path.name}.tmp-*"))


def remove_stale_temps_in(directory: str | os.PathLike) -> list[Path]:
    """:func:`remove_stale_temps` for every file of ``directory`` at once (one scan): for directories
    of many small files written with ``durable=False``, cleaned once per command instead of per file."""
    return _remove_dead_writers(Path(directory).glob(".*.tmp-*"))


def _remove_dead_writers(temps: Iterable[Path]) -> list[Path]:
    removed = []
    for tmp in temps:
        pid = tmp.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _disk_full(directory: Path, margin: int = 1 << 20) -> bool:
    try:
        return shutil.disk_usage(directory).free < margin
    except OSError:
        return False


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}  # fmt: skip


def _missing_parent(directory: Path, tree: str | os.PathLike | None) -> str | None:
    """Why files cannot be created in ``directory`` without creating it; None if they can, or where
    ``directory`` is on the way to or inside ``tree``, an output directory the command creates."""
    try:
        if stat.S_ISDIR(os.stat(directory).st_mode):
            return None
        return f"{directory} is not a directory"
    except FileNotFoundError:
        if tree is not None:
            top, here = Path(os.path.abspath(tree)), Path(os.path.abspath(directory))
            if here == top or top in here.parents or here in top.parents:
                return None
        return f"directory {directory} does not exist"
    except OSError as e:
        return f"{directory}: {e.strerror or e}"


def output_target(
    path: str | os.PathLike, *, parents: bool = False, tree: str | os.PathLike | None = None
) -> Path:
    """The regular file a write of ``path`` replaces: ``path``, or the file a symbolic link points to.

    Raises a one-line DyditError naming ``path`` when it exists and is not a regular file (a
    directory, a device, a FIFO, a socket, or a link to one of them, or a dangling link), and when
    its directory does not exist, unless ``parents`` (the caller creates it) or the directory is
    ``tree``, inside it or on the way to it (an output directory the command will create). Nothing
    is created or modified: commands call this before they start work.
    """
    path = Path(path)
    try:
        st = os.stat(path)  # through links, as the kernel resolves them (/proc/self/fd/1 included)
    except FileNotFoundError:
        if os.path.islink(path):
            raise DyditError(f"cannot write {path}: it is a symbolic link to a missing file") from None
        reason = None if parents else _missing_parent(path.parent, tree)
        if reason is not None:
            raise DyditError(f"cannot write {path}: {reason}") from None
        return path
    except OSError as e:
        raise DyditError(f"cannot write {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "special") + (
            " (through a symbolic link)" * os.path.islink(path)
        )
        raise DyditError(
            f"cannot write {path}: it exists and is {kind}, not a regular file; choose a file path"
        )
    if not os.path.islink(path):
        return path
    target = Path(os.path.realpath(path))
    with contextlib.suppress(OSError):
        if os.path.samestat(st, os.stat(target)):
            return target
    raise DyditError(f"cannot write {path}: cannot resolve its symbolic link")


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[str], None],
    *,
    durable: bool = True,
    parents: bool = False,
) -> Path:
    """Call ``write(tmp_path)``, fsync, then ``os.replace`` onto ``path``; raise DyditError on failure.

    ``path`` is checked by :func:`output_target` first; ``parents=True`` creates its missing
    directories, for files inside an output tree the caller owns.

    The temporary file ``.NAME.tmp-PID`` is private to this process, so concurrent writers of the
    same file never mix their bytes. It is removed when anything fails, and ``path`` keeps its
    previous content. Temporary files of ``path`` left by killed processes are removed first
    (:func:`remove_stale_temps`).

    ``durable=False`` skips the fsync and the stale-file scan: for directories of tens of thousands
    of per-image files, whose writer cleans the directory once (:func:`remove_stale_temps_in`). The
    file still appears whole or not at all.
    """
    path = Path(path)
    target = output_target(path, parents=parents)
    tmp = _temp_path(target)
    try:
        if parents:
            target.parent.mkdir(parents=True, exist_ok=True)
        if durable:
            remove_stale_temps(target)
        write(str(tmp))
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE & ~_umask())  # some writers create private (0600) files
        os.replace(tmp, target)
    except (OSError, RuntimeError, SafetensorError) as e:
        # torch.save reports a full disk as a short write ("unexpected pos"), without errno: a short
        # write fills the disk, so look at the free space before the partial file is removed.
        full = _disk_full(target.parent)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        reason = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else f"{e}".strip().split("\n")[0]
        if full or (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "os error 28" in str(e):
            reason = "no space left on device"
        kept = f"; the previous {path.name} is kept" if path.exists() else ""
        raise DyditError(f"cannot write {path}: {reason}{kept}") from None
    return path


def write_with_file(write: Callable[[BinaryIO], None]) -> Callable[[str], None]:
    """Adapt a writer of an open binary file (``np.save``, ``PIL.Image.save``) to :func:`atomic_write`.

    Through a file object, numpy appends no ``.npy``/``.npz`` suffix to the temporary name.
    """

    def write_path(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)

    return write_path


def npz_name(path: str | os.PathLike) -> Path:
    """``path`` with ``.npz`` appended unless it ends so already (the name ``np.savez(path)`` writes)."""
    path = Path(path)
    return path if path.name.endswith(".npz") else path.with_name(path.name + ".npz")


def save_text(path: str | os.PathLike, text: str, *, durable: bool = True, parents: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically: a JSON or Markdown report is whole or absent."""

    def write(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")

    return atomic_write(path, write, durable=durable, parents=parents)


def save_npz(
    path: str | os.PathLike, arrays: dict[str, np.ndarray], *, durable: bool = True, parents: bool = False
) -> Path:
    """``np.savez`` to ``path`` atomically: a reader (or a crash) never sees half an npz."""
    write = write_with_file(lambda f: np.savez(f, **arrays))
    return atomic_write(path, write, durable=durable, parents=parents)


# Directory locks -------------------------------------------------------------------------------
def _holder(fd: int) -> str:
    """'pid N' (and the host when it is another machine) from a lock file, for the error message."""
    with contextlib.suppress(OSError, ValueError):
        pid, _, host = os.pread(fd, 256, 0).decode().strip().partition(" ")
        if pid.isdigit():
            return f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")
    return "pid unknown"


def _open_lock(path: Path) -> tuple[int | None, bool]:
    """An fd of the lock file (created if needed) and whether it is writable (for the pid).

    (None, False) where the file cannot be created because nothing can be written there (a
    read-only mount, no permission, a full disk): no other process can write the directory either,
    and the command's own first write reports the cause, naming its file.
    """
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE), True
    except FileNotFoundError:
        raise  # the directory was removed meanwhile by a holder that wrote nothing: retry
    except OSError as e:
        if e.errno not in _UNWRITABLE:
            raise DyditError(f"cannot lock {path.parent}: {e.strerror or e}") from None
    try:  # a lock file left by a killed process still locks through a read-only descriptor
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC), False
    except OSError:
        return None, False


def _acquire(directory: Path, wait: bool) -> int | None:
    """Create ``directory`` if needed and lock it: the locked fd, or None where it cannot be locked
    (unwritable, or a file system without locks: a warning). DyditError when another process holds it."""
    path = directory / LOCK_FILE
    while True:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DyditError(f"cannot create output directory {directory}: {e.strerror or e}") from None
        try:
            fd, writable = _open_lock(path)
        except FileNotFoundError:
            continue
        if fd is None:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise DyditError(
                        f"{directory} is in use by another dydit process ({_holder(fd)}); wait for it "
                        "to finish or use another directory"
                    ) from None
                print(f"dydit: waiting for {_holder(fd)}, which is writing {directory}", file=sys.stderr)
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as e:  # ENOLCK and the like: a file system without locks
                print(
                    f"dydit: warning: cannot lock {directory} ({e.strerror or e}); "
                    "a second writer would not be detected",
                    file=sys.stderr,
                )
                os.close(fd)
                return None
            # Holders remove the lock file on release (:func:`_release`); if that happened between
            # our open and flock, we hold a deleted file: open the current one instead.
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    if writable:
                        with contextlib.suppress(OSError):  # a full disk: the lock holds, without a pid
                            os.ftruncate(fd, 0)
                            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
                    return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _release(fd: int, directory: Path, created: Path | None) -> None:
    """Remove the lock file and unlock; directories this lock created and nobody wrote go too.

    The file is unlinked while still locked: a process that opened it meanwhile finds, once it
    gets the lock, that it holds a deleted file, and retries on a fresh one (:func:`_acquire`).
    """
    try:
        path = directory / LOCK_FILE
        if os.path.samestat(os.fstat(fd), os.stat(path)):
            path.unlink()
        d = directory
        while created is not None and not any(d.iterdir()):  # nothing was written
            d.rmdir()
            if d == created:
                break
            d = d.parent
    except OSError:
        pass  # read-only, or another writer got in: leave the rest
    finally:
        os.close(fd)


def _first_missing(directory: Path) -> Path | None:
    """The topmost ancestor of ``directory`` (itself included) that does not exist yet."""
    missing = None
    for d in (directory, *directory.parents):
        if d.exists():
            break
        missing = d
    return missing


@contextlib.contextmanager
def locked_dir(directory: str | os.PathLike, *, wait: bool = False) -> Iterator[Path]:
    """Hold the exclusive lock of ``directory`` (created if missing) while the block writes it.

    ``wait=False`` (run, sample and latent-cache directories): another holder is a DyditError
    naming the directory and its pid, raised before anything is written. Under torchrun every rank
    must enter together: rank 0 takes the lock and the others share the directory, all raising
    rank 0's error if it could not.

    ``wait=True`` (caches shared by all commands): block until the holder is done, saying once on
    stderr whom it waits for. Each calling process locks for itself (no collective), so ranks that
    fill a cache take turns and the later ones find the work done.

    The lock is released (and its file removed) when the block ends, or by the kernel when the
    process dies; a directory this call created and nobody wrote is removed again.
    """
    directory = Path(directory)
    fd: int | None = None
    created: Path | None = None
    message = None
    if wait or distributed.is_main():
        created = _first_missing(directory)
        try:
            fd = _acquire(directory, wait)
        except DyditError as e:
            message = str(e)
    if not wait:
        message = distributed.broadcast_object(message)  # every rank learns rank 0's outcome
    if message is not None:
        raise DyditError(message)
    try:
        yield directory
    finally:
        if fd is not None:
            _release(fd, directory, created)
