"""Files written whole or not at all: a temporary file in the target's folder, renamed over it when complete, with
the permissions an ordinary ``open(path, "w")`` would give (the umask's), so a crash never leaves a truncated
figure, JSON or cache behind."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
from collections.abc import Iterator
from typing import Any

__all__ = ["atomic_path", "output_folder", "write_json"]


def _new_file(folder: str, name: str, suffix: str) -> str:
    """Create an empty, unused file in ``folder`` with mode ``0o666`` as the umask allows (what ``open(path, "w")``
    gives; ``tempfile.mkstemp`` would give 0o600), and return its path."""
    while True:
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}{suffix}")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path beside ``path``; when the block ends without an exception, the file written there
    replaces ``path`` (mode ``0o666 & ~umask``). On an exception the temporary file is removed and ``path`` is left
    as it was. The folder is created if missing."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = _new_file(folder, os.path.basename(path), suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> str:
    """Write ``obj`` as JSON to ``path`` atomically (NaN and infinity as JavaScript literals); returns the path."""
    with atomic_path(path, ".json") as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent, allow_nan=True)
    return os.fspath(path)


def output_folder(path: str | os.PathLike) -> str:
    """Create ``path`` if needed and check that files can be written there, before any work is done: a run whose
    output cannot be saved fails at once, naming the folder, instead of after hours of training."""
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise PermissionError(f"the output folder {path!r} is not writable ({err.strerror or err}); choose another "
                              f"with --out") from err
    return path
