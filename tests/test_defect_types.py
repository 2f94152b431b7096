"""Per-defect-type image AUROC: the helpers (hand-computed values, sklearn), evaluate_class, the outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from moleflow.cli.train import defect_type_lines, print_final_table
from moleflow.data.batch import Prepared
from moleflow.data.datasets import ClassSplit, Sample
from moleflow.data.transforms import ImageTransform
from moleflow.evaluation import (continual_metrics, evaluate_class, per_defect_auroc, per_defect_counts,
                                 write_final_csv, write_matrices)
from moleflow.metrics import METRICS, mean_metrics

# normal: 0.1 0.2 0.3 0.4; crack above every normal (1.0), scratch below every normal (0.0);
# hole 0.25 0.35 0.3 beats 2, 3 and 2 + 1/2 (tie) of the 4 normals: 7.5 / 12 = 0.625
SAMPLES = [  # (defect type, label, score)
    ("good", 0, 0.1), ("crack", 1, 0.9), ("hole", 1, 0.25), ("good", 0, 0.2), ("scratch", 1, 0.0),
    ("hole", 1, 0.35), ("good", 0, 0.3), ("crack", 1, 0.8), ("scratch", 1, 0.05), ("hole", 1, 0.3),
    ("good", 0, 0.4),
]
EXPECTED = {"crack": 1.0, "hole": 0.625, "scratch": 0.0}
COUNTS = {"crack": 2, "hole": 3, "scratch": 2}


def _arrays() -> tuple[np.ndarray, np.ndarray, list[str]]:
    types, labels, scores = zip(*SAMPLES)
    return np.array(labels), np.array(scores, dtype=np.float64), list(types)


def test_hand_computed_values_sorted_by_type():
    labels, scores, types = _arrays()
    result = per_defect_auroc(labels, scores, types)
    assert list(result) == ["crack", "hole", "scratch"]
    assert result == pytest.approx(EXPECTED, abs=1e-12)
    assert per_defect_counts(labels, types) == COUNTS
    assert list(per_defect_counts(labels, types)) == sorted(COUNTS)


def test_types_come_from_anomalous_images_only():
    labels, scores, types = _arrays()
    types[0] = "mislabelled_normal"  # a normal image's type is not a defect type
    assert list(per_defect_auroc(labels, scores, types)) == ["crack", "hole", "scratch"]
    assert per_defect_counts(labels, types) == COUNTS


def test_no_normal_images_gives_none():
    labels, scores, types = _arrays()
    keep = labels == 1
    result = per_defect_auroc(labels[keep], scores[keep], [t for t, k in zip(types, keep) if k])
    assert result == {"crack": None, "hole": None, "scratch": None}
    assert per_defect_counts(labels[keep], [t for t, k in zip(types, keep) if k]) == COUNTS


def test_no_anomalous_images_gives_empty_dicts():
    assert per_defect_auroc(np.zeros(3, int), np.arange(3.0), ["good"] * 3) == {}
    assert per_defect_counts(np.zeros(3, int), ["good"] * 3) == {}


def test_shape_mismatch_raises():
    labels, scores, types = _arrays()
    with pytest.raises(ValueError, match="defect_types"):
        per_defect_auroc(labels, scores, types[:-1])
    with pytest.raises(ValueError, match="scores"):
        per_defect_auroc(labels, scores[:-1], types)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn_on_random_data_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 300
    labels = (rng.random(n) < 0.5).astype(int)
    types = np.where(labels == 1, rng.choice(["a", "b", "c"], n), "good")
    scores = np.round(rng.normal(size=n) + labels * (types == "a") * 2.0 - labels * (types == "c"), 1)
    result = per_defect_auroc(labels, scores, list(types))
    for t in ("a", "b", "c"):
        keep = (labels == 0) | (types == t)
        assert result[t] == pytest.approx(roc_auc_score(labels[keep], scores[keep]), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# evaluate_class with a stand-in model (scores = mean of the normalised image; gray level sets the rank)


def _fake_model(size: int = 16) -> SimpleNamespace:
    def inspect_prepared(prep: Prepared, backend, task_ids=None, among=None) -> SimpleNamespace:
        images, n = prep.pixels, prep.n_images
        return SimpleNamespace(scores=images.mean(dim=(1, 2, 3)), task_ids=torch.zeros(n, dtype=torch.long),
                               known=torch.ones(n, dtype=torch.bool), anomalous=torch.zeros(n, dtype=torch.bool),
                               ambiguous=torch.zeros(n, dtype=torch.bool), alternatives=[[] for _ in range(n)],
                               maps=torch.zeros(n, size, size))

    config = SimpleNamespace(data=SimpleNamespace(tiling="none"), router=SimpleNamespace(enabled=True))
    return SimpleNamespace(transform=ImageTransform(size), prepare=Prepared.square, inspect_prepared=inspect_prepared,
                           inspector=None, config=config)


def _split(root: Path) -> ClassSplit:
    test = []
    for i, (t, label, score) in enumerate(SAMPLES):
        path = root / "tile" / "test" / t / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16, 3), int(round(score * 200)), np.uint8)).save(path)
        test.append(Sample(path, label, None, "tile", t, "test"))
    return ClassSplit("tile", [], test, has_masks=False)


@pytest.fixture()
def evaluated(tmp_path):
    return evaluate_class(_fake_model(), _split(tmp_path), true_task=0, batch_size=4)


def test_evaluate_class_adds_per_defect_metrics(evaluated):
    m = evaluated.metrics
    assert m["per_defect_image_auroc"] == pytest.approx(EXPECTED, abs=1e-12)
    assert list(m["per_defect_image_auroc"]) == ["crack", "hole", "scratch"]
    assert m["per_defect_count"] == COUNTS
    assert m["n_anomalous"] == sum(COUNTS.values())
    assert json.loads(json.dumps(m)) == m  # results.json round trip


def test_outputs_that_read_metrics_ignore_the_dicts(evaluated, tmp_path, capsys):
    final = {"tile": evaluated.metrics}
    mean = mean_metrics(final)
    assert list(mean) == list(METRICS) and mean["image_auroc"] == evaluated.metrics["image_auroc"]
    steps = [{"step": 0, "task_name": "tile", "classes": ["tile"], "results": final}] * 2
    assert set(continual_metrics(steps, ["tile"], {"tile": 0})) == set(METRICS)
    write_final_csv(tmp_path, final, mean)
    write_matrices(tmp_path, steps, ["tile"])
    with open(tmp_path / "final.csv") as fh:
        assert next(csv.reader(fh)) == ["class"] + list(METRICS)
    print_final_table({"final": final, "final_mean": mean, "oracle_mean": mean})
    out = capsys.readouterr().out
    assert "  tile: crack 100.0 (2), hole 62.5 (3), scratch 0.0 (2)" in out


def test_defect_type_lines_skip_single_type_and_old_results():
    final = {"one": {"per_defect_image_auroc": {"bad": 0.9}, "per_defect_count": {"bad": 4}},
             "old": {"image_auroc": 0.8},
             "two": {"per_defect_image_auroc": {"a": 0.5, "b": None}, "per_defect_count": {"a": 1, "b": 2}}}
    assert defect_type_lines(final) == ["  two: a 50.0 (1), b n/a (2)"]
