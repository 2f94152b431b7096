"""A fixed-seed run reduced to what must not change when the code is reorganised (issue 25).

`fingerprint(run_dir, data_root)` keeps results.json without the fields that change from run to run (time,
command line, durations, paths) and every per-image score file with the data folder's path replaced. Run this
file as a script to write `golden/fixed_seed_run.json` from the current code; do that only when a change is meant
to change outputs, and say so in the commit.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

GOLDEN = Path(__file__).parent / "golden" / "fixed_seed_run.json"
CLASSES = ["brick", "grass"]
TRAIN_ARGS = ["--preset", "cpu", "--set", "train.epochs=1", "--set", "train.min_steps=6",
              "--set", "score.memory_coreset=200", "--no-progress", "--no-report"]
VOLATILE = {"created", "command", "timing", "train_seconds", "eval_seconds", "total_seconds", "environment",
            "moleflow_version"}


def make_data(root: Path) -> None:
    """Two generated products, 24 normal training images and 6 + 6 test images each (224 px, seed 3)."""
    from moleflow.data.synthetic import write_mvtec_layout

    write_mvtec_layout(root, CLASSES, n_train=24, n_test_good=6, n_test_defect=6, size=224, seed=3)


def _strip(value: Any, root: str) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v, root) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(root, "DATA")
    return value


def fingerprint(run_dir: Path, data_root: Path) -> dict[str, Any]:
    """{'results': stripped results.json, 'scores': {class: csv text with paths made relative}}."""
    root = str(data_root)
    results = _strip(json.loads((run_dir / "results.json").read_text()), root)
    scores = {p.stem: p.read_text().replace(root, "DATA") for p in sorted((run_dir / "scores").glob("*.csv"))}
    return {"results": results, "scores": scores}


def made_on() -> dict[str, str]:
    """Where floats are reproducible bit for bit: the same torch build on the same kind of CPU."""
    import torch

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {"torch": torch.__version__, "cpu": cpu, "sha256": ""}


def run(tmp: Path) -> dict[str, Any]:
    from moleflow.cli import main

    data, out = tmp / "data", tmp / "run"
    make_data(data)
    assert main(["train", "--data", str(data), "--out", str(out)] + TRAIN_ARGS) == 0
    return fingerprint(out, data)


def digest(print_: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(print_, sort_keys=True).encode()).hexdigest()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        got = run(Path(tmp))
    env = made_on()
    env["sha256"] = digest(got)
    GOLDEN.write_text(json.dumps({"made_on": env, **got}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN} ({env['sha256'][:12]})", file=sys.stderr)
