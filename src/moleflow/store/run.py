"""What a run folder holds, so that a new run never silently replaces an old one, and the writers of its
files (every one atomic, through `store.atomic`).

    RUN/config.yaml  RUN/model/  RUN/results.json  RUN/final.csv  RUN/matrix_*.csv  RUN/scores/  RUN/examples/
    RUN/report.md  RUN/report.html  RUN/figures/  RUN/summary.json  RUN/seed_<s>/ (several seeds)
"""

from __future__ import annotations

import csv
import io
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import MoleflowError
from .atomic import atomic_write_bytes, atomic_write_json, atomic_write_text

VERDICT_STORE_FILE = "verdicts.sqlite"  # the run's default verdict store (store/verdicts.py)

if TYPE_CHECKING:
    from ..config import Config

RUN_FILES = ("config.yaml", "model.pt", "results.json", "final.csv", "report.md", "report.html", "summary.json")
RUN_FOLDERS = ("model", "scores", "examples", "figures")
RUN_GLOBS = ("matrix_*.csv", "seed_*")
#: The columns of RUN/scores/<class>.csv: one row per test image.
SCORE_COLUMNS = ("file", "defect_type", "label", "score", "routed_task", "routed_name", "known", "anomalous")


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


# ---------------------------------------------------------------------------------------------- files


def save_json(path: str | Path, data: Any) -> Path:
    """`data` as indented JSON (results.json, summary.json, trials.json, ...)."""
    return atomic_write_json(path, data)


def write_config(path: str | Path, cfg: "Config") -> Path:
    """A configuration as YAML (RUN/config.yaml), readable by `moleflow train --config`."""
    import yaml

    return atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A header and rows as CSV text (the csv module's dialect: \\r\\n line ends, None as an empty cell)."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    return text.getvalue()


def dict_rows_csv_text(rows: Sequence[Mapping[str, Any]], exclude: tuple[str, ...] = ()) -> str:
    """Rows (dicts with the first row's keys) as CSV text, without the columns `exclude`; a key missing from a
    row is an empty cell, keys the first row lacks are left out."""
    header = [k for k in rows[0] if k not in exclude]
    return csv_text(header, ([row.get(k, "") for k in header] for row in rows))


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """A CSV file (final.csv, matrix_<metric>.csv, scores/<class>.csv) of a header and rows."""
    return atomic_write_text(path, csv_text(header, rows))


def read_csv_rows(path: str | Path) -> list[dict[str, str]]:
    """The rows of a CSV file with a header, as {column: text}."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def write_npz(path: str | Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """Named arrays as a compressed .npz (examples/<class>.npz)."""
    return atomic_write_bytes(path, lambda fh: np.savez_compressed(fh, **arrays))
