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
    ``path`` is left as it was. A new file (or folder) gets the mode a plain ``open(path, "w")``
    (or ``os.mkdir(path)``) would give; an existing one's mode is kept.

    A folder is replaced whole: the old one is first renamed aside (inside a temporary folder
    beside it), the new one renamed into place, then the old one deleted; if the second rename
    fails the old folder is put back. ``path`` is never a mixture of old and new contents."""
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
        os.chmod(tmp, _file_mode(path, directory))  # mkstemp / mkdtemp make 0600 / 0700
        if directory:
            _replace_folder(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _replace_folder(new: Path, path: Path) -> None:
    """``os.replace(new, path)`` for a folder ``new`` when ``path`` may be a non-empty folder
    (which ``os.replace`` cannot overwrite)."""
    if not os.path.lexists(path):
        os.replace(new, path)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    old = aside / path.name
    os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(old, path)
        aside.rmdir()
        raise
    _remove(aside)


def _remove(path: Path) -> None:
    """Delete a temporary file or folder, if it is (still) there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


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


def _file_mode(path: Path, directory: bool = False) -> int:
    """The existing ``path``'s mode, or what ``open(path, "w")`` (0666) or, for a folder,
    ``os.mkdir(path)`` (0777) would give under the current umask."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return (0o777 if directory else 0o666) & ~umask
