"""One writer per run: `with run_lock(run_dir): ...` around anything that changes a run.

An OS-level lock (filelock: fcntl/msvcrt), so a crashed or killed writer never leaves a stale lock behind.
A second writer stops at once with a clear message, or waits up to `wait` seconds when asked to.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from ..errors import MoleflowError

LOCK_NAME = ".moleflow.lock"


@contextmanager
def run_lock(run_dir: str | Path, wait: float = 0.0, create: bool = False) -> Iterator[Path]:
    """Hold the writer's lock of `run_dir` for the duration of the block (`create`: make the folder first)."""
    run_dir = Path(run_dir)
    if run_dir.is_file():  # a model file or folder given instead of the run: lock the run around it
        run_dir = run_dir.parent
    if not create and not run_dir.is_dir():
        raise MoleflowError(f"{run_dir}: no such run folder; train a run first (moleflow train ... --out DIR)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MoleflowError(f"{run_dir}: cannot create the run folder ({exc.strerror or exc})") from None
    path = run_dir / LOCK_NAME
    lock = FileLock(str(path), timeout=wait)
    try:
        lock.acquire()
    except Timeout:
        raise MoleflowError(f"{run_dir} is being changed by another moleflow process (lock {path}); wait until it "
                            "finishes (or pass --wait SECONDS) and run the command again") from None
    except OSError as exc:
        raise MoleflowError(f"{run_dir}: cannot take the writer's lock ({exc.strerror or exc}); "
                            "is the folder writable?") from None
    try:
        yield run_dir
    finally:
        lock.release()
