"""Checkpoints: one atomic file that reproduces every score exactly; clear errors on bad files."""

from __future__ import annotations

import pytest
import torch

from moleflow import MoleFlow, MoleflowError
from moleflow.checkpoint import atomic_write_bytes

from helpers import random_images, tiny_config


def test_round_trip_reproduces_scores_exactly(tmp_path):
    model = MoleFlow(tiny_config(**{"model.task_adapter": "soft_ln"}))
    model.fit_task(random_images(0, 20), name="a", classes=["a"])
    model.fit_task(random_images(1, 20, shift=1.0), name="b", classes=["b"])
    probe = random_images(2, 6, shift=0.5)
    before = model.predict(probe)
    path = model.save(tmp_path / "run" / "model.pt")
    loaded = MoleFlow.load(path)
    after = loaded.predict(probe)
    for field in ("scores", "maps", "task_ids", "known", "anomalous", "router_distance"):
        assert torch.equal(getattr(before, field), getattr(after, field)), field
    assert [t.name for t in loaded.tasks] == ["a", "b"]
    assert loaded.tasks[1].threshold == model.tasks[1].threshold
    assert loaded.config.to_dict() == model.config.to_dict()
    # the loaded model keeps learning without touching what it loaded
    loaded.fit_task(random_images(3, 20, shift=-1.0), name="c")
    assert torch.equal(loaded.predict(probe, task_ids=[0] * 6).scores, model.predict(probe, task_ids=[0] * 6).scores)


def test_round_trip_after_removing_the_first_task(tmp_path):
    model = MoleFlow(tiny_config())
    model.fit_task(random_images(0, 12), name="a")
    model.fit_task(random_images(1, 12, shift=1.0), name="b")
    model.remove_task("a")
    loaded = MoleFlow.load(model.save(tmp_path / "m.pt"))
    probe = random_images(2, 3)
    assert torch.equal(loaded.predict(probe).scores, model.predict(probe).scores)
    assert loaded.flow.base_task == 0


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")

    def broken(fh):
        fh.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write_bytes(target, broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(MoleflowError, match="not found"):
        MoleFlow.load(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(MoleflowError, match="junk.pt"):
        MoleFlow.load(junk)
    other = tmp_path / "other.pt"
    torch.save({"hello": 1}, other)
    with pytest.raises(MoleflowError, match="not a moleflow checkpoint"):
        MoleFlow.load(other)


def test_backbone_hash_mismatch_is_refused(tmp_path):
    model = MoleFlow(tiny_config(**{"backbone.random_weights": True}))
    model.fit_task(random_images(0, 12), name="a")
    path = model.save(tmp_path / "m.pt")
    payload = torch.load(path, weights_only=False)
    payload["backbone"]["weights_sha256"] = "0" * 64
    torch.save(payload, path)
    with pytest.raises(MoleflowError, match="differ"):
        MoleFlow.load(path)
