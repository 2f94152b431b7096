"""CLI surface: info counts, help for every command, one-line errors with exit code 2, VisA csv runs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from moleflow.cli import COMMANDS, main
from moleflow.continual import parse_scenario

TINY = ["--preset", "tiny", "--no-progress", "--no-report"]


def test_info_prints_the_main_per_task_count(capsys):
    assert main(["info", "--preset", "main", "--embed-dim", "768", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["per_task"]["total"] == 3_706_368
    assert report["per_task"]["lora"] == 1_916_928
    assert main(["info", "--preset", "main", "--embed-dim", "768"]) == 0
    assert "3,706,368" in capsys.readouterr().out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "example" in capsys.readouterr().out


def test_missing_root_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run")] + TINY)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "nope" in err and "\n" not in err and "Traceback" not in err


def test_bad_override_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--set", "train.epoch=3"] + TINY)
    assert code == 2
    assert "train.epoch" in capsys.readouterr().err


@pytest.mark.parametrize("scenario, expected", [
    ("1-1", [["a"], ["b"], ["c"], ["d"], ["e"]]),
    ("3-1", [["a", "b", "c"], ["d"], ["e"]]),
    ("2-2", [["a", "b"], ["c", "d"], ["e"]]),
])
def test_parse_scenario(scenario, expected):
    assert parse_scenario(scenario, list("abcde")) == expected


def test_parse_scenario_errors():
    from moleflow import MoleflowError

    with pytest.raises(MoleflowError):
        parse_scenario("x", ["a"])
    with pytest.raises(MoleflowError):
        parse_scenario("3-1", ["a", "b"])


def _visa_fixture(root):
    """A small VisA-style tree with split_csv/1cls.csv: two objects, one anomaly each with a mask."""
    rng = np.random.default_rng(0)
    rows = [["object", "split", "label", "image", "mask"]]
    for obj, base in (("pcb1", 60), ("candle", 190)):
        for split, label, n in (("train", "normal", 10), ("test", "normal", 3), ("test", "anomaly", 3)):
            for i in range(n):
                folder = "Normal" if label == "normal" else "Anomaly"
                rel = f"{obj}/Data/Images/{folder}/{split}_{i:03d}.JPG"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                img = np.clip(base + rng.normal(0, 10, (80, 96, 3)), 0, 255).astype(np.uint8)
                mask_rel = ""
                if label == "anomaly":
                    img[30:45, 40:60] = 255 - base
                    mask_rel = f"{obj}/Data/Masks/Anomaly/{split}_{i:03d}.png"
                    (root / mask_rel).parent.mkdir(parents=True, exist_ok=True)
                    m = np.zeros((80, 96), np.uint8)
                    m[30:45, 40:60] = 255
                    Image.fromarray(m).save(root / mask_rel)
                Image.fromarray(img).save(root / rel, format="JPEG")
                rows.append([obj, split, label, rel, mask_rel])
    (root / "split_csv").mkdir()
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def test_train_and_evaluate_on_a_visa_csv_fixture(tmp_path):
    root = tmp_path / "visa"
    _visa_fixture(root)
    out = tmp_path / "run"
    assert main(["train", "--data", str(root), "--dataset", "visa", "--classes", "pcb1", "candle",
                 "--out", str(out)] + TINY) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["final"]) == ["pcb1", "candle"]
    assert results["final"]["pcb1"]["n_test"] == 6
    assert results["final"]["candle"]["pixel_ap"] is not None
    assert main(["evaluate", str(out), "--no-report"]) == 0
