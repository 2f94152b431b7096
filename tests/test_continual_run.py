"""The continual run from the library (`moleflow.continual`), without the command line: a typed request makes
the whole run folder, the library modules never import `moleflow.cli`, and the run folder is refused,
replaced or resumed as the request says."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest

from moleflow import Config
from moleflow.continual import ContinualRequest, DataSource, parse_scenario, run_continual
from moleflow.data.synthetic import write_mvtec_layout
from moleflow.errors import MoleflowError
from moleflow.metrics import METRICS

SRC = Path(__file__).resolve().parents[1] / "src" / "moleflow"
LIBRARY = ("continual.py", "trials.py", "evaluation.py", "metrics.py", "tuning.py", "store/run.py", "store/atomic.py")


def imported_modules(path: Path) -> set[str]:
    """The absolute names of the modules a file of the moleflow package imports (relative imports resolved)."""
    package = ["moleflow"] + list(path.relative_to(SRC).parent.parts)
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("name", LIBRARY)
def test_the_library_never_imports_the_command_line(name):
    found = sorted(m for m in imported_modules(SRC / name) if m == "moleflow.cli" or m.startswith("moleflow.cli.")
                   or m == "argparse")
    assert not found, f"{name} imports {found}"


@pytest.fixture(scope="module")
def request_(tmp_path_factory) -> ContinualRequest:
    root = tmp_path_factory.mktemp("continual")
    data = write_mvtec_layout(root / "data", ["brick", "grass"], n_train=12, n_test_good=2, n_test_defect=2,
                              size=112, seed=0)
    cfg = Config.from_preset("tiny").with_overrides({"train.epochs": 1, "train.min_steps": 0,
                                                     "data.image_size": 64})
    return ContinualRequest(cfg, DataSource(data), parse_scenario("1-1", ["brick", "grass"]), root / "run",
                            scenario="1-1", report=False, progress=False)


@pytest.fixture(scope="module")
def results(request_) -> dict:
    return run_continual(request_)


def test_a_request_makes_the_whole_run_folder(request_, results):
    run = request_.run_dir
    for name in ["config.yaml", "results.json", "final.csv", "scores/brick.csv", "scores/grass.csv",
                 "examples/brick.npz", "model/manifest.json"] + [f"matrix_{k}.csv" for k in METRICS]:
        assert (run / name).is_file(), name
    assert not list(run.rglob(".*.tmp"))  # every file written atomically, no temporary left behind
    saved = json.loads((run / "results.json").read_text())
    assert saved["final_mean"] == results["final_mean"] and saved["metrics"] == list(METRICS)
    assert saved["dataset"] == {"root": str(request_.data.root), "name": "folder", "scenario": "1-1",
                                "classes": ["brick", "grass"], "tasks": [["brick"], ["grass"]], "discover": None}
    assert [s["task_name"] for s in saved["steps"]] == ["brick", "grass"]


def test_the_request_says_what_happens_to_a_run_already_there(request_, results):
    with pytest.raises(MoleflowError, match="already holds a run"):
        run_continual(request_)
    resumed = run_continual(dataclasses.replace(request_, existing="resume"))
    assert resumed["final"] == results["final"]  # both steps re-scored from the saved model, none learned again
    with pytest.raises(MoleflowError, match="existing='resum'"):
        dataclasses.replace(request_, existing="resum")
