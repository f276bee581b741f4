"""Atomic writes of files and folders: a reader sees the old content or the new, never a
half-written file or a missing folder, and a crash (even SIGKILL) leaves the old content.

A file is written to a temporary name unique to the process and the call, in the same
folder (so the rename stays on one filesystem), flushed and fsynced, then renamed over
the target with :func:`os.replace`, and the folder is fsynced so that the rename itself
survives a power loss.

A folder is built beside its target and swapped in with Linux's
``renameat2(RENAME_EXCHANGE)``, which exchanges two paths in one step; where that call
does not exist (other systems, old kernels, some filesystems) the old folder is renamed
aside and the new one renamed in, which leaves a window of two renames in which the path
is missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

_TMP_MARK = ".tmp-"


def temp_name(path: Path) -> Path:
    """A fresh temporary name beside ``path``: ``.NAME.tmp-PID-RANDOM``."""
    return path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:12]}")


def fsync_dir(folder: Path) -> None:
    """Make renames inside ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> int:
    """Call ``write(fh)`` on a temporary file beside ``path``, fsync, rename it over
    ``path``; returns the size written. On any error the temporary file is removed and
    ``path`` is untouched. Temporary files that killed writers of ``path`` left behind
    are removed first (:func:`stale_temporaries`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return path.stat().st_size


def atomic_write_bytes(path: str | Path, data: bytes) -> int:
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> int:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> int:
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def atomic_torch_save(payload: Any, path: str | Path) -> int:
    """``torch.save`` atomically; returns the file's size."""
    import torch

    return atomic_write(path, lambda fh: torch.save(payload, fh))


def stale_temporaries(path: str | Path, quiet_s: float = 5.0, max_age_s: float = 86400.0) -> Iterator[Path]:
    """Temporary files that an earlier, killed writer of ``path`` left beside it.

    One is stale when the process named in it no longer runs and it has not been
    written to for ``quiet_s`` seconds (a writer in another PID namespace keeps its
    file's mtime fresh while it writes), or when it is older than ``max_age_s``."""
    path = Path(path)
    prefix = f".{path.name}{_TMP_MARK}"
    if not path.parent.is_dir():
        return
    now = time.time()
    for candidate in path.parent.iterdir():
        if not candidate.name.startswith(prefix):
            continue
        pid_text = candidate.name[len(prefix) :].split("-", 1)[0]
        pid = int(pid_text) if pid_text.isdigit() else None
        if pid == os.getpid():
            continue  # a write of this process may be in flight
        try:
            age = now - candidate.stat().st_mtime
        except FileNotFoundError:
            continue
        if age > max_age_s or (age > quiet_s and (pid is None or not _pid_alive(pid))):
            yield candidate


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove what :func:`stale_temporaries` finds; returns the removed paths."""
    removed = []
    for candidate in stale_temporaries(path):
        with contextlib.suppress(FileNotFoundError):
            if candidate.is_dir():
                shutil.rmtree(candidate)
            else:
                candidate.unlink()
            removed.append(candidate)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - another user's process
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2``); ``False`` where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # pragma: no cover - glibc < 2.28, musl
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # pragma: no cover - kernel/filesystem
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(staging: str | Path, dest: str | Path) -> None:
    """Put the folder ``staging`` at ``dest``, replacing what is there, so that ``dest``
    is never missing (see the module doc); ``staging`` is consumed."""
    staging, dest = Path(staging), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        try:
            os.rename(staging, dest)
            fsync_dir(dest.parent)
            return
        except OSError as exc:  # another writer created dest meanwhile: swap with it
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    if _exchange(staging, dest):
        shutil.rmtree(staging, ignore_errors=True)  # staging now holds the old folder
    else:  # pragma: no cover - systems without renameat2
        old = temp_name(dest)
        os.rename(dest, old)
        os.rename(staging, dest)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(dest.parent)


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Build a folder in a temporary sibling, then :func:`replace_dir` it into ``dest``::

        with atomic_dir(out) as tmp:
            (tmp / "a.json").write_text(...)

    On an error the temporary folder is removed and ``dest`` is untouched."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(dest)
    tmp.mkdir()
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as fh:
                    os.fsync(fh.fileno())
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
