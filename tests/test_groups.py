"""Whole parts held out: groups read from a product's provenance file, calibration and tune's validation split by
group (docs/decisions.md §1, "Whole parts held out")."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from moleflow import MoleFlow
from moleflow.cli import main
from moleflow.data.datasets import ClassSplit, Sample
from moleflow.data.groups import group_holdout, image_groups
from moleflow.errors import MoleflowError
from moleflow.learning import calibration_holdout
from moleflow.tuning import make_validation_split, validation_order

from helpers import tiny_config


def write_product(root, n_groups: int, per_group: int, listed: bool = True, size: int = 64) -> list:
    """root/prod/train/good/<g>_<k>.png: `per_group` images of each of `n_groups` parts (part g is a brightness
    level, each image a little noise on it); a provenance.csv naming each image's part when `listed`."""
    good = root / "prod" / "train" / "good"
    good.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths, rows = [], ["file,split,label,group"]
    for g in range(n_groups):
        for k in range(per_group):
            pixels = np.clip(60 + 3 * g + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
            path = good / f"{g:03d}_{k}.png"
            Image.fromarray(pixels).save(path)
            paths.append(path)
            rows.append(f"train/good/{path.name},train,good,part{g}")
    if listed:
        (root / "prod" / "provenance.csv").write_text("\n".join(rows) + "\n")
    return paths


def test_image_groups_reads_the_product_file(tmp_path):
    paths = write_product(tmp_path, 4, 3)
    groups = image_groups(paths, "provenance.csv")
    assert len(groups) == 12 and len(set(groups)) == 4
    assert groups[0] == groups[1] == groups[2] != groups[3]
    # an image the file does not list is a group of its own; no file at all, or no file asked for: None
    (tmp_path / "prod" / "provenance.csv").write_text("file,group\ntrain/good/000_0.png,a\n")
    groups = image_groups(paths, "provenance.csv")
    assert groups[0].endswith("::a") and len(set(groups)) == 12
    assert image_groups(paths, None) is None
    assert image_groups(torch.zeros(2, 3, 8, 8), "provenance.csv") is None
    (tmp_path / "prod" / "provenance.csv").unlink()
    assert image_groups(paths, "provenance.csv") is None


def test_a_group_file_without_its_columns_is_a_clear_error(tmp_path):
    paths = write_product(tmp_path, 2, 2)
    (tmp_path / "prod" / "provenance.csv").write_text("name,part\nx,1\n")
    with pytest.raises(MoleflowError, match="provenance.csv.*'file' and 'group'.*data.group_file=null"):
        image_groups(paths, "provenance.csv")


def test_group_holdout_keeps_groups_whole():
    groups = [f"g{i // 3}" for i in range(60)]  # 20 parts of 3 images
    out = group_holdout(groups, 10, torch.Generator().manual_seed(0))
    held = {groups[i] for i in out.tolist()}
    assert 10 <= len(out) <= 12 and len(out) == 3 * len(held)
    again = group_holdout(groups, 10, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # seeded
    assert group_holdout(groups, 4, torch.Generator().manual_seed(0)) is None  # a part of 3 > half of 4: one by one
    assert len(group_holdout(groups, 0, torch.Generator())) == 0


def test_calibration_holdout_splits_no_part_between_training_and_calibration():
    cfg = tiny_config()
    groups = [f"g{i // 5}" for i in range(200)]  # 40 parts of 5 images; 10 % to hold out = 20
    train, cal = calibration_holdout(cfg, 0, 200, 0.1, groups)
    assert len(train) + len(cal) == 200 and 20 <= len(cal) < 25
    assert not {groups[i] for i in train.tolist()} & {groups[i] for i in cal.tolist()}
    # without groups: images one by one, as before
    train1, cal1 = calibration_holdout(cfg, 0, 200, 0.1)
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(cfg.train.seed * 7919))
    assert torch.equal(cal1, perm[:20].sort().values) and torch.equal(train1, perm[20:].sort().values)


def test_validation_order_ends_the_held_out_front_at_a_part_boundary():
    groups = [f"g{i // 4}" for i in range(80)]  # 20 parts of 4 images
    order, n_val = validation_order(80, groups, 0.2, 60, np.random.default_rng(0))
    assert len(order) == 60 and n_val >= 12
    held, fit = {groups[i] for i in order[:n_val]}, {groups[i] for i in order[n_val:]}
    assert not held & fit and n_val % 4 == 0
    # no groups: the permutation of before, unchanged
    order0, n0 = validation_order(80, None, 0.2, 60, np.random.default_rng(5))
    assert np.array_equal(order0, np.random.default_rng(5).permutation(80)[:60]) and n0 == 12


def test_tune_split_and_learning_hold_whole_parts_out(tmp_path, capsys):
    paths = write_product(tmp_path, 12, 3)
    split = ClassSplit("prod", [Sample(p, 0, None, "prod", "good", "train") for p in paths], [], False)
    val = make_validation_split(split, tmp_path / "val", 0.25, None, 0, "faint")
    fit_parts = {p.name.split("_")[0] for p in (s.image for s in val.train)}
    held_parts = {p.name.split("_", 2)[1] for p in (s.image for s in val.test if s.label == 0)}
    assert len(val.train) % 3 == 0 and not fit_parts & held_parts

    model = MoleFlow(tiny_config(**{"score.calibration_fraction": 0.25, "score.calibration_keep_train": 20}))
    info = model.fit_task(paths, name="prod", false_alarm_rate=0.1)
    assert info.calibration["held_out_by"] == "group" and info.calibration["held_out_groups"] * 3 == info.n_calibration
    assert info.calibration["groups"] == 12
    model.save(tmp_path / "run")
    assert main(["tasks", str(tmp_path / "run")]) == 0
    assert f"{info.n_calibration} ({info.n_calibration // 3} of 12 parts)" in capsys.readouterr().out
    train, cal = model.calibration_holdout(info.task_id, paths, 0.1)
    assert len(cal) == info.n_calibration and len(cal) % 3 == 0
    assert not {paths[i].name[:3] for i in train.tolist()} & {paths[i].name[:3] for i in cal.tolist()}
    # without the file: one by one, and the manifest says so
    model = MoleFlow(tiny_config(**{"score.calibration_fraction": 0.25, "score.calibration_keep_train": 20,
                                    "data.group_file": None}))
    assert model.fit_task(paths, name="prod", false_alarm_rate=0.1).calibration["held_out_by"] == "image"
