"""The worker side of a sweep: one trial run where it was sent (in this process, a local worker process or a Ray
actor), never raising, with the files it wrote under [`trial_folder`][lightning_flat.sweep.trial_folder] collected
for the driver; and an exception described in one line. [`lightning_flat.sweep`][lightning_flat.sweep] (the driver)
and its worker pools build on this module."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _describe(err: BaseException) -> str:
    """An exception in one line without colour codes: ``Type: message (at file.py:12 in function)``."""
    text = _ANSI.sub("", "".join(traceback.format_exception_only(type(err), err)).strip())
    text = " ".join(text.split())
    frames = traceback.extract_tb(err.__traceback__)
    if frames:
        last = frames[-1]
        text += f" (at {os.path.basename(last.filename)}:{last.lineno} in {last.name})"
    return text


# -------------------------------------------------------------------------------------------------- worker side
_SCRATCH: dict[str, Any] | None = None  # under Ray, while a trial runs: {"root": dir, "folders": {path: stand-in}}


def trial_folder(path: str) -> str:
    """The folder a trial writes the files of ``path`` (a folder on the driver's machine, e.g. the output folder
    given in its config) into; created if missing.

    On the local engine (and outside a sweep) it is ``path`` itself. Under Ray it is a scratch folder on the node
    that runs the trial, with the same base name (a wandb group named after it keeps its name): when the trial ends,
    every regular file written there comes back with the trial's result and is written under ``path`` on the
    driver, before the trial's row is kept, whichever node ran it. Symbolic links are not sent. A trial should
    return paths relative to ``path``, not the scratch folder's."""
    if _SCRATCH is None:
        os.makedirs(path, exist_ok=True)
        return path
    folders = _SCRATCH["folders"]
    if path not in folders:
        base = os.path.basename(os.path.normpath(path)) or "out"
        folders[path] = os.path.join(_SCRATCH["root"], str(len(folders)), base)
        os.makedirs(folders[path], exist_ok=True)
    return folders[path]


def _run_trial(trial_fn: Callable[[dict], dict], config: dict, collect: bool = False) -> dict:
    """Run one trial where it was sent; never raises. Returns ``{"ok", "result", "seconds"}`` or ``{"ok": False,
    "error", "traceback", "seconds"}``, with ``files`` (``[path, relative name, bytes]``) where ``collect``."""
    global _SCRATCH
    _SCRATCH = {"root": tempfile.mkdtemp(prefix="lightning-flat-trial-"), "folders": {}} if collect else None
    t0 = time.perf_counter()
    try:
        result = trial_fn(config)
        try:
            json.dumps(result, allow_nan=True)
        except (TypeError, ValueError) as err:
            raise TypeError(f"trial_fn must return a JSON-able dict, got {type(result).__name__} ({err})") from None
        out = {"ok": True, "result": result}
    except (Exception, SystemExit) as err:
        out = {"ok": False, "error": _describe(err), "traceback": _ANSI.sub("", traceback.format_exc())}
    out["seconds"] = time.perf_counter() - t0
    if collect:
        scratch, _SCRATCH = _SCRATCH, None
        try:
            out["files"] = [[path, os.path.relpath(os.path.join(d, f), local), _read(os.path.join(d, f))]
                            for path, local in scratch["folders"].items() for d, _, files in os.walk(local)
                            for f in sorted(files) if not os.path.islink(os.path.join(d, f))]
        finally:
            shutil.rmtree(scratch["root"], ignore_errors=True)
    return out


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
