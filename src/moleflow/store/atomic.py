"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Every file the package writes into a run (checkpoint shards, manifest, results, reports) goes through
`atomic_write_bytes`; a crash, an error or a full disk leaves the previous file untouched.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, BinaryIO

from ..errors import MoleflowError


def atomic_write_bytes(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Call `write(fileobj)` on a temporary file beside `path`, fsync it, then rename it over `path`.

    A crash or an error leaves any existing file at `path` untouched. A folder that cannot be written
    is a `MoleflowError` naming it.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise MoleflowError(f"{path.parent}: cannot write here ({exc.strerror or exc}); choose a writable "
                            "folder or fix its permissions") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, lambda fh: fh.write(text.encode()))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=1))


def check_writable(folder: str | Path) -> Path:
    """Create `folder` if needed and prove a file can be written in it, before any long work starts."""
    folder = Path(folder)
    atomic_write_bytes(folder / ".moleflow-write-test", lambda fh: fh.write(b""))
    (folder / ".moleflow-write-test").unlink(missing_ok=True)
    return folder
