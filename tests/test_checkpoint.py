"""The model folder: exact round trips, SHA-256 integrity, no pickled code, atomic and incremental saves."""

from __future__ import annotations

import json
import os

import pytest
import torch

from moleflow import MoleFlow, MoleflowError
from moleflow.cli import main
from moleflow.store import atomic_write_bytes
from moleflow.store import checkpoint as ckpt

from helpers import random_images, tiny_config


@pytest.fixture(scope="module")
def two_tasks():
    model = MoleFlow(tiny_config(**{"model.task_adapter": "soft_ln"}))
    model.fit_task(random_images(0, 20), name="a", classes=["a"])
    model.fit_task(random_images(1, 20, shift=1.0), name="b", classes=["b"])
    return model


def test_round_trip_reproduces_scores_exactly(tmp_path, two_tasks):
    model = two_tasks
    probe = random_images(2, 6, shift=0.5)
    before = model.predict(probe)
    folder = model.save(tmp_path / "run")
    assert folder == tmp_path / "run" / "model"
    loaded = MoleFlow.load(tmp_path / "run")
    after = loaded.predict(probe)
    for field in ("scores", "maps", "task_ids", "known", "anomalous", "router_distance", "thresholds"):
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
    loaded = MoleFlow.load(model.save(tmp_path / "run"))
    probe = random_images(2, 3)
    assert torch.equal(loaded.predict(probe).scores, model.predict(probe).scores)
    assert loaded.flow.base_tasks == [0]


def test_removing_the_last_task_is_refused():
    model = MoleFlow(tiny_config())
    model.fit_task(random_images(0, 12), name="a")
    with pytest.raises(MoleflowError, match="only learned task"):
        model.remove_task("a")
    assert [t.name for t in model.tasks] == ["a"]


def test_every_file_is_json_or_safetensors_and_listed_with_its_hash(tmp_path, two_tasks):
    folder = two_tasks.save(tmp_path / "run")
    manifest = json.loads((folder / "manifest.json").read_text())
    on_disk = {p.name for p in folder.iterdir()}
    assert on_disk == set(manifest["files"]) | {"manifest.json"}
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert name.endswith(".safetensors") and ckpt.sha256(data) == entry["sha256"]
        assert b"\x80\x04" not in data[:2]  # no pickle protocol header
    parts = sorted(e["part"] for e in manifest["files"].values())
    assert parts == ["shared", "task0", "task0-calibration", "task1", "task1-calibration"]


def _flip(path, offset_from_end: int = 40) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_tensor_file_is_refused_naming_the_file(tmp_path, two_tasks):
    folder = two_tasks.save(tmp_path / "run")
    shard = next(p for p in folder.iterdir() if p.name.startswith("task1-"))
    _flip(shard)
    with pytest.raises(MoleflowError, match=f"{shard.name}: SHA-256 does not match"):
        MoleFlow.load(tmp_path / "run")


def test_an_edited_manifest_is_refused(tmp_path, two_tasks):
    folder = two_tasks.save(tmp_path / "run")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["tasks"][0]["name"] = "renamed"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MoleflowError, match="manifest.json: the manifest's checksum"):
        MoleFlow.load(tmp_path / "run")


def test_a_missing_shard_is_refused(tmp_path, two_tasks):
    folder = two_tasks.save(tmp_path / "run")
    next(p for p in folder.iterdir() if p.name.startswith("shared-")).unlink()
    with pytest.raises(MoleflowError, match="cannot read this model file"):
        MoleFlow.load(tmp_path / "run")


def test_adding_a_task_writes_only_the_new_expert(tmp_path):
    model = MoleFlow(tiny_config())
    model.fit_task(random_images(0, 12), name="a")
    folder = model.save(tmp_path / "run")
    before = {p.name: os.stat(p).st_ino for p in folder.iterdir() if p.suffix == ".safetensors"}
    model.fit_task(random_images(1, 12, shift=1.0), name="b")
    model.save(tmp_path / "run")
    after = {p.name: os.stat(p).st_ino for p in folder.iterdir() if p.suffix == ".safetensors"}
    assert set(before) < set(after)
    assert all(after[name] == inode for name, inode in before.items())  # not rewritten
    assert sorted(n.split("-")[0] + ("-cal" if "calibration" in n else "") for n in set(after) - set(before)) == ["task1", "task1-cal"]


def test_a_crash_while_saving_keeps_the_previous_model(tmp_path, monkeypatch):
    model = MoleFlow(tiny_config())
    model.fit_task(random_images(0, 12), name="a")
    model.save(tmp_path / "run")
    probe = random_images(5, 3)
    expected = model.predict(probe).scores
    model.fit_task(random_images(1, 12, shift=1.0), name="b")

    def crash(path, text):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "atomic_write_text", crash)
    with pytest.raises(OSError):
        model.save(tmp_path / "run")
    monkeypatch.undo()
    loaded = MoleFlow.load(tmp_path / "run")
    assert [t.name for t in loaded.tasks] == ["a"]
    assert torch.equal(loaded.predict(probe).scores, expected)


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "results.json"
    target.write_bytes(b"old")

    def broken(fh):
        fh.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write_bytes(target, broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_unwritable_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where a folder should be")  # fails for every user, root included
    with pytest.raises(MoleflowError, match="not_a_folder: cannot write here"):
        atomic_write_bytes(blocker / "x.json", lambda fh: fh.write(b"{}"))


def _legacy_payload(model: MoleFlow) -> dict:
    """What moleflow 0.1 wrote into model.pt."""
    return {
        "format": "moleflow-checkpoint", "version": 1, "moleflow_version": "0.1.0",
        "config": model.config.to_dict(),
        "backbone": {"name": model.extractor.name, "weights_sha256": model.extractor.weights_sha256,
                     "weights_source": model.extractor.weights_source},
        "task_ids": list(model.flow.task_ids), "base_task": model.flow.base_tasks[0],
        "flow": {k: v.detach().cpu() for k, v in model.flow.state_dict().items()},
        "router": {t: {"mean": model.router.prototype(t)[0], "precision": model.router.prototype(t)[1],
                       "unknown_threshold": model.router.unknown_threshold(t)} for t in model.flow.task_ids},
        "memory": None,
        "tasks": model.task_info_dicts(),
    }


def test_a_legacy_single_file_run_loads_and_converts(tmp_path, two_tasks):
    run = tmp_path / "old_run"
    run.mkdir()
    torch.save(_legacy_payload(two_tasks), run / "model.pt")
    probe = random_images(2, 4, shift=0.5)
    loaded = MoleFlow.load(run)
    assert torch.equal(loaded.predict(probe).scores, two_tasks.predict(probe).scores)
    assert main(["migrate", str(run)]) == 0  # converts, checks the scores, removes the old file
    assert not (run / "model.pt").exists() and (run / "model" / "manifest.json").is_file()
    assert torch.equal(MoleFlow.load(run).predict(probe).scores, two_tasks.predict(probe).scores)
    assert main(["migrate", str(run)]) == 0  # nothing left to do


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_legacy_file_with_pickled_code_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": "moleflow-checkpoint", "evil": _Exploit()}, tmp_path / "model.pt")
    with pytest.raises(MoleflowError, match="cannot read this checkpoint safely"):
        MoleFlow.load(tmp_path / "model.pt")
    assert not (tmp_path / "pwned").exists()


def test_bad_paths_give_clear_errors(tmp_path):
    with pytest.raises(MoleflowError, match="no moleflow model here"):
        MoleFlow.load(tmp_path / "missing")
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
    folder = model.save(tmp_path / "run")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["backbone"]["weights_sha256"] = "0" * 64
    manifest["manifest_sha256"] = ckpt._manifest_checksum(manifest)  # a consistent manifest, other backbone
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MoleflowError, match="differ"):
        MoleFlow.load(folder)
