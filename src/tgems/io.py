"""Atomic writes: every output is written under a temporary name and renamed, so a failed or killed
run never leaves a partial file. Files get the usual permissions (umask), not mkstemp's 0600."""
from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path


def _umask_mode(base: int = 0o666) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def is_disk_full(exc: BaseException) -> bool:
    """An OSError for a full disk (pyarrow's may carry the errno only in its text)."""
    return isinstance(exc, OSError) and (exc.errno in (errno.ENOSPC, errno.EDQUOT)
                                         or "No space left on device" in str(exc))


def tmp_path(path) -> Path:
    """The temporary sibling a write goes to before it is renamed onto `path`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def is_tmp(p: Path) -> bool:
    """A temporary left by a write that never finished (a killed run)."""
    return p.name.startswith(".") and p.name.endswith(".tmp")


def commit(tmp: Path, path) -> None:
    """Make a finished temporary file durable, give it the usual permissions, rename it onto `path`."""
    if tmp.is_file():
        os.chmod(tmp, _umask_mode())
        with open(tmp, "rb") as f:  # durable before it becomes visible: a resumed job trusts what it finds
            os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def atomic_path(path):
    """Yield a temporary sibling path; rename it onto `path` when the block succeeds, remove it otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        yield tmp
        commit(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_json(path, obj) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=float))
    return Path(path)


@contextmanager
def atomic_dir(path, marker: str, what: str = "a previous output"):
    """Yield a fresh temporary directory that replaces `path` when the block succeeds. An existing `path` is
    replaced only when it holds `marker` (an earlier output of the same kind) or is empty."""
    from tgems.errors import TGEMError

    path = Path(path)
    if path.exists() and not (path.is_dir() and ((path / marker).is_file() or not any(path.iterdir()))):
        raise TGEMError(f"{path} exists and is not {what} (no {marker}); refusing to replace it")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, _umask_mode())
        os.chmod(tmp, _umask_mode(0o777))
        swap_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def swap_dir(new: Path, path) -> None:
    """Put directory `new` at `path` so that a reader of `path` finds the old or the new output at every
    moment, never none: swapped in one step where the system can (Linux), else the old one renamed aside,
    the new one renamed in, and only then the old one deleted."""
    path = Path(path)
    if not path.exists():
        os.replace(new, path)
        return
    if _exchange(Path(new), path):
        shutil.rmtree(new, ignore_errors=True)  # now the old output
        return
    old = path.with_name(f".{path.name}.old.{os.getpid()}.tmp")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    try:
        os.replace(new, path)
    except OSError:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
