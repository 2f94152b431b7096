"""Trials (moleflow.trials, `moleflow sweep`, `ablate --seeds`, `train --seeds`): sweep parsing, a small serial
sweep, mean ± std, reuse of finished trials after an interruption, and the same sweep on a local Ray."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moleflow import Config
from moleflow.cli import main
from moleflow.data.synthetic import write_mvtec_layout
from moleflow.errors import MoleflowError
from moleflow.metrics import METRICS
from moleflow.trials import build_trials, parse_sweep, split_values, sweep_configurations

# a run of two tiny products in about half a second
TINY = ["--preset", "tiny", "--set", "train.epochs=1", "--set", "train.min_steps=0", "--set", "data.image_size=64",
        "--no-progress"]
SWEEP = ["--sweep", "model.lora_rank=2,4", "--seeds", "0", "1"]
TRIALS = [("model.lora_rank=2", 0), ("model.lora_rank=2", 1), ("model.lora_rank=4", 0), ("model.lora_rank=4", 1)]


def sweep_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["sweep", "--data", str(root), "--classes", "brick", "grass", "--out", str(out)] + SWEEP + TINY + list(extra)


def trial_dir(out: Path, name: str, seed: int) -> Path:
    return out / name / f"seed_{seed}"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trials") / "data"
    return write_mvtec_layout(root, ["brick", "grass"], n_train=12, n_test_good=2, n_test_defect=2, size=112, seed=0)


@pytest.fixture(scope="module")
def serial_sweep(data_root) -> Path:
    """The 2 x 2 sweep run serially with one torch thread (what a Ray task with one CPU uses)."""
    out = data_root.parent / "serial"
    threads = torch.get_num_threads()
    try:
        assert main(sweep_args(data_root, out, "--threads", "1")) == 0
    finally:
        torch.set_num_threads(threads)
    return out


# ---------------------------------------------------------------------------------------------- parsing


def test_sweep_is_the_cartesian_product_of_typed_values(tmp_path):
    base = Config.from_preset("tiny")
    axes = parse_sweep(["model.lora_rank=8,16", "train.epochs=1,2,3"], base)
    configurations = sweep_configurations(axes)
    assert [c.name for c in configurations] == [f"model.lora_rank={r},train.epochs={e}"
                                                for r in (8, 16) for e in (1, 2, 3)]
    trials = build_trials(base, tmp_path, configurations, [0, 1])
    assert len(trials) == 12
    assert [(t.config.model.lora_rank, t.config.train.epochs, t.config.train.seed) for t in trials[:3]] == \
        [(8, 1, 0), (8, 1, 1), (8, 2, 0)]
    assert trials[0].run_dir == tmp_path / "model.lora_rank=8,train.epochs=1" / "seed_0"
    single = build_trials(base, tmp_path, sweep_configurations(parse_sweep(["model.lora_rank=8"], base)), [3])
    assert single[0].run_dir == tmp_path / "model.lora_rank=8" and single[0].config.train.seed == 3
    assert split_values("8, 16,[1,2]") == ["8", "16", "[1,2]"]


@pytest.mark.parametrize("item, words", [
    ("model.lora_rnk=8,16", ["model.lora_rnk", "lora_rank"]),      # unknown key: named, with a suggestion
    ("modle.lora_rank=8", ["modle"]),                               # unknown section
    ("model.lora_rank=8,x", ["model.lora_rank", "'x'"]),            # not an integer
    ("model.lora_rank=8,0", ["model.lora_rank", ">= 1"]),           # out of range
    ("model.lora_rank", ["section.key=V1,V2"]),                     # no values
    ("model.lora_rank=8,,16", ["empty value"]),
    ("model.lora_rank=8,8", ["'8' is given twice"]),
    ("train.seed=0,1", ["--seeds"]),
])
def test_a_bad_sweep_is_one_clear_error(item, words):
    with pytest.raises(MoleflowError) as err:
        parse_sweep([item], Config.from_preset("tiny"))
    assert all(w in str(err.value) for w in words), str(err.value)


def test_bad_sweep_and_missing_ray_stop_before_any_work(data_root, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(["sweep", "--data", str(data_root), "--out", str(out), "--sweep", "model.lora_rnk=8"] + TINY) == 2
    assert "model.lora_rnk" in capsys.readouterr().err and not out.exists()
    with pytest.raises(MoleflowError, match="given twice"):
        parse_sweep(["model.lora_rank=8", "model.lora_rank=16"], Config.from_preset("tiny"))
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(sweep_args(data_root, out, "--parallel", "2")) == 2
    assert "pip install" in capsys.readouterr().err and not out.exists()
    assert main(["train", "--data", str(data_root), "--out", str(out), "--seeds", "0", "1",
                 "--parallel-trials", "2"] + TINY) == 2
    assert "pip install" in capsys.readouterr().err and not (out / "seed_0").exists()


# ---------------------------------------------------------------------------------------------- serial runs


def test_serial_sweep_writes_every_trial_and_mean_std_matches_numpy(serial_sweep):
    report = json.loads((serial_sweep / "trials.json").read_text())
    assert [(t["configuration"], t["seed"], t["status"]) for t in report["trials"]] == \
        [(n, s, "ran") for n, s in TRIALS]
    for row in report["configurations"]:
        runs = [json.loads((trial_dir(serial_sweep, row["configuration"], s) / "results.json").read_text())
                for s in (0, 1)]
        assert [r["config"]["model"]["lora_rank"] for r in runs] == [int(row["configuration"][-1])] * 2
        assert [r["seed"] for r in runs] == [0, 1]
        for key in METRICS:
            values = [r["final_mean"][key] for r in runs]
            assert row["metrics"][key]["mean"] == pytest.approx(np.mean(values), abs=1e-12)
            assert row["metrics"][key]["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    table = (serial_sweep / "trials.md").read_text()
    assert "model.lora_rank=4" in table and " ± " in table and "Every trial" in table
    assert (serial_sweep / "trials.csv").read_text().count("\n") == 5  # header + 4 trials
    assert "image_auroc_std" in (serial_sweep / "trials_summary.csv").read_text()


def test_after_an_interruption_only_the_unfinished_trial_runs_again(serial_sweep, data_root, tmp_path, capsys):
    out = tmp_path / "sweep"
    shutil.copytree(serial_sweep, out)
    lost = trial_dir(out, "model.lora_rank=4", 0) / "results.json"
    before = json.loads(lost.read_text())
    lost.unlink()  # as if the sweep had been stopped while this trial was being scored
    kept = {p: (p.read_bytes(), p.stat().st_mtime_ns) for n, s in TRIALS if (n, s) != ("model.lora_rank=4", 0)
            for p in sorted(trial_dir(out, n, s).rglob("*")) if p.is_file()}
    assert main(sweep_args(data_root, out)) == 2  # without --resume an existing run is never touched
    assert "already holds a run" in capsys.readouterr().err
    assert main(sweep_args(data_root, out, "--resume", "--threads", "1")) == 0
    report = json.loads((out / "trials.json").read_text())
    assert [(t["configuration"], t["seed"], t["status"]) for t in report["trials"]] == \
        [(n, s, "ran" if (n, s) == ("model.lora_rank=4", 0) else "reused") for n, s in TRIALS]
    assert (report["ran"], report["reused"]) == (1, 3)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in kept} == kept
    assert json.loads(lost.read_text())["final_mean"] == before["final_mean"]  # re-scored from its saved model


def test_train_seeds_and_ablate_seeds_run_as_trials(data_root, tmp_path, capsys):
    out = tmp_path / "seeds"
    args = ["train", "--data", str(data_root), "--classes", "brick", "grass", "--out", str(out), "--no-report",
            "--seeds", "0", "1"] + TINY
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["runs"] == [str(out / "seed_0"), str(out / "seed_1")]
    values = [json.loads((out / f"seed_{s}" / "results.json").read_text())["final_mean"]["image_auroc"] for s in (0, 1)]
    assert summary["final_mean"]["image_auroc"]["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    assert "mean ± std over seeds [0, 1]" in capsys.readouterr().out
    assert main(args + ["--resume"]) == 0
    assert "reused: finished before" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["final_mean"] == summary["final_mean"]
    assert {t["status"] for t in json.loads((out / "trials.json").read_text())["trials"]} == {"reused"}

    abl = tmp_path / "abl"
    assert main(["ablate", "--data", str(data_root), "--classes", "brick", "grass", "--out", str(abl),
                 "--ablations", "no_router", "--seeds", "0", "1"] + TINY) == 0
    rows = {r["run"]: r for r in json.loads((abl / "ablation.json").read_text())["rows"]}
    assert set(rows) == {"full", "no_router"} and rows["full"]["seeds"] == "0 1"
    full = [json.loads((abl / "full" / f"seed_{s}" / "results.json").read_text())["final_mean"] for s in (0, 1)]
    assert rows["full"]["image_auroc"] == pytest.approx(np.mean([f["image_auroc"] for f in full]), abs=1e-12)
    assert rows["full"]["std_image_auroc"] == pytest.approx(np.std([f["image_auroc"] for f in full], ddof=1),
                                                            abs=1e-12)
    assert " ± " in (abl / "ablation.md").read_text() and (abl / "trials.md").is_file()


# ---------------------------------------------------------------------------------------------- Ray


def test_the_same_sweep_on_a_local_ray_gives_the_same_metrics(serial_sweep, data_root, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'moleflow[ray]'): no Ray test")
    out = tmp_path / "ray"
    assert main(sweep_args(data_root, out, "--parallel", "2", "--cpus-per-trial", "1")) == 0
    report = json.loads((out / "trials.json").read_text())
    assert [(t["configuration"], t["seed"], t["status"]) for t in report["trials"]] == \
        [(n, s, "ran") for n, s in TRIALS]
    for name, seed in TRIALS:
        ray_run = json.loads((trial_dir(out, name, seed) / "results.json").read_text())
        serial = json.loads((trial_dir(serial_sweep, name, seed) / "results.json").read_text())
        assert ray_run["final"] == serial["final"] and ray_run["final_mean"] == serial["final_mean"], (name, seed)
        assert ray_run["oracle_mean"] == serial["oracle_mean"]
        assert ray_run["environment"]["threads"] == 1
