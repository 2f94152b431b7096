"""What a run folder holds, so that a new run never silently replaces an old one.

    RUN/config.yaml  RUN/model/  RUN/results.json  RUN/final.csv  RUN/matrix_*.csv  RUN/scores/  RUN/examples/
    RUN/report.md  RUN/report.html  RUN/figures/  RUN/summary.json  RUN/seed_<s>/ (several seeds)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import MoleflowError

RUN_FILES = ("config.yaml", "model.pt", "results.json", "final.csv", "report.md", "report.html", "summary.json")
RUN_FOLDERS = ("model", "scores", "examples", "figures")
RUN_GLOBS = ("matrix_*.csv", "seed_*")


def run_outputs(run_dir: str | Path) -> list[Path]:
    """The files and folders of a moleflow run found in `run_dir` (empty: no run there)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [run_dir / n for n in RUN_FILES + RUN_FOLDERS if (run_dir / n).exists()]
    for pattern in RUN_GLOBS:
        found += sorted(run_dir.glob(pattern))
    return found


def refuse_existing_run(run_dir: str | Path) -> None:
    outputs = run_outputs(run_dir)
    if outputs:
        names = ", ".join(p.name for p in outputs[:4]) + (" ..." if len(outputs) > 4 else "")
        raise MoleflowError(f"{run_dir} already holds a run ({names}); choose another --out, continue it with "
                            "--resume, or replace it with --overwrite")


def clear_run(run_dir: str | Path) -> list[Path]:
    """Delete the run outputs of `run_dir` (nothing else in the folder); return what was deleted."""
    outputs = run_outputs(run_dir)
    for path in outputs:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return outputs
