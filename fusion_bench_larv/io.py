"""Atomic writes: every file (or folder) the package writes appears whole or not at all.

One mechanism: write to a temporary name beside the target, then ``os.replace`` it over the
target (atomic on POSIX within one file system), so an interrupted run never leaves a half-written
report, cache entry or checkpoint that a later ``--resume`` would read back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike, directory: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` for the caller to write a file (or, with ``directory``,
    a folder) to; on normal exit it replaces ``path``, on an exception it is removed and
    ``path`` is left as it was. A new file gets the mode a plain ``open(path, "w")`` would give
    (an existing one keeps its mode)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if directory:
            shutil.rmtree(path, ignore_errors=True)  # os.replace cannot replace a non-empty folder
        else:
            os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json_atomic(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> None:
    """``json.dump(obj, indent=2)`` to ``path`` atomically; a serialisation error halfway leaves
    ``path`` as it was."""
    dump_kwargs.setdefault("indent", 2)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, **dump_kwargs)
            f.flush()
            os.fsync(f.fileno())


def _file_mode(path: Path) -> int:
    """The existing file's mode, or 0666 minus the umask (what ``open(path, "w")`` would give)."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask
