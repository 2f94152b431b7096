"""Lazy expert loading: every hash checked at load, each expert read on first use, scores bit-identical."""

from __future__ import annotations

import shutil

import pytest
import torch

from moleflow import MoleFlow, MoleflowError
from moleflow.cli.tasks import task_table
from moleflow.task_keys import key_owner

from helpers import random_images, tiny_config

SHIFTS = (0.0, 2.0, -2.0)  # one per product: the router tells them apart
FIELDS = ("scores", "maps", "task_ids", "known", "anomalous", "router_distance", "thresholds")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A saved run of three products scored with flow+memory (every expert part has a patch memory)."""
    model = MoleFlow(tiny_config(**{"score.source": "flow+memory", "train.epochs": 1}))
    for i, shift in enumerate(SHIFTS):
        model.fit_task(random_images(i, 12, shift=shift), name=f"p{i}")
    folder = tmp_path_factory.mktemp("lazy") / "run"
    model.save(folder)
    return folder


@pytest.fixture()
def copy_of(run, tmp_path):
    """A private copy of the run (a test may damage or rewrite it)."""
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def product(i: int, n: int = 2) -> torch.Tensor:
    return random_images(100 + i, n, shift=SHIFTS[i])


def mixed() -> torch.Tensor:
    """Two images of each product, interleaved."""
    parts = [product(i) for i in range(len(SHIFTS))]
    return torch.stack([p[j] for j in range(2) for p in parts])


def task_file(folder, task: int):
    return next(p for p in (folder / "model").iterdir() if p.name.startswith(f"task{task}-")
                and "calibration" not in p.name)


def flip_byte(path, offset_from_end: int = 40) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def assert_same(a, b) -> None:
    """Bit-identical inspections (router distances are nan with oracle task ids)."""
    for field in FIELDS:
        x, y = getattr(a, field), getattr(b, field)
        assert torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num()), field


def test_lazy_load_scores_like_eager_and_reads_only_routed_experts(run):
    eager, lazy = MoleFlow.load(run, lazy=False), MoleFlow.load(run)
    assert eager.inspector.pending_tasks == [] and lazy.inspector.pending_tasks == [0, 1, 2]
    # `moleflow tasks` needs no expert: sizes from the file headers equal the loaded tensors'
    assert task_table(lazy) == task_table(eager)
    assert lazy.inspector.pending_tasks == [0, 1, 2]
    one = lazy.predict(product(1))
    assert_same(one, eager.predict(product(1)))
    assert one.task_ids.tolist() == [1, 1] and lazy.inspector.pending_tasks == [0, 2]
    assert_same(lazy.predict(mixed()), eager.predict(mixed()))
    assert lazy.inspector.pending_tasks == []
    assert_same(lazy.predict(mixed(), task_ids=[2, 0, 1] * 2), eager.predict(mixed(), task_ids=[2, 0, 1] * 2))
    lazy_state, eager_state = lazy.inspector.model_state(), eager.inspector.model_state()
    assert set(lazy_state) == set(eager_state)
    assert all(torch.equal(lazy_state[k], eager_state[k]) for k in eager_state)


def test_a_file_changed_after_load_is_refused_when_its_expert_is_first_used(copy_of):
    eager = MoleFlow.load(copy_of, lazy=False)
    lazy = MoleFlow.load(copy_of)
    shard = task_file(copy_of, 1)
    flip_byte(shard)
    with pytest.raises(MoleflowError, match=f"{shard.name}: SHA-256 does not match the manifest") as err:
        lazy.predict(product(1))
    assert "\n" not in str(err.value) and "restore it from a copy of the run" in str(err.value)
    assert lazy.inspector.pending_tasks == [0, 1, 2]  # nothing half-loaded
    assert_same(lazy.predict(product(0)), eager.predict(product(0)))  # the other experts still score
    with pytest.raises(MoleflowError, match=shard.name):  # never run, nor saved, with a placeholder expert
        lazy.predict(product(1), task_ids=[1, 1])
    with pytest.raises(MoleflowError, match=shard.name):
        lazy.save(copy_of.parent / "elsewhere")
    assert 1 in lazy.inspector.pending_tasks


def test_a_hash_mismatch_at_load_is_refused_in_one_line(copy_of):
    shard = task_file(copy_of, 2)
    flip_byte(shard)
    for lazy in (True, False):
        with pytest.raises(MoleflowError, match=f"{shard.name}: SHA-256 does not match") as err:
            MoleFlow.load(copy_of, lazy=lazy)
        assert "\n" not in str(err.value)


def test_saving_a_lazily_loaded_model_writes_every_expert_unchanged(copy_of):
    original = MoleFlow.load(copy_of, lazy=False).inspector.model_state()
    lazy = MoleFlow.load(copy_of)
    lazy.remove_task("p0")
    assert lazy.inspector.pending_tasks == [1, 2]
    lazy.save(copy_of)  # in place, as `moleflow remove-task` does: the experts are read before any file goes
    saved = MoleFlow.load(copy_of, lazy=False).inspector.model_state()
    assert set(saved) == {k for k in original if key_owner(k) != 0}
    assert all(torch.equal(saved[k], original[k]) for k in saved)

    lazy = MoleFlow.load(copy_of)
    lazy.fit_task(random_images(3, 12, shift=4.0), name="p3")
    lazy.save(copy_of)
    grown = MoleFlow.load(copy_of, lazy=False).inspector.model_state()
    assert all(torch.equal(grown[k], v) for k, v in saved.items())
    assert {key_owner(k) for k in grown} == {None, 1, 2, 3}


def test_onnx_engine_on_a_lazy_model_opens_only_routed_experts(run, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: the onnx engine is not tested")
    from moleflow.engine import graph_keys, make_engine

    lazy, eager = MoleFlow.load(run), MoleFlow.load(run, lazy=False)
    engine = make_engine(lazy, "onnx", cache_dir=tmp_path / "lazy")
    assert engine.experts == {} and lazy.inspector.pending_tasks == [0, 1, 2]
    before = make_engine(eager, "onnx", cache_dir=tmp_path / "eager")
    one = engine.inspect(lazy.prepare(product(2)))
    assert one.task_ids.tolist() == [2, 2]
    assert sorted(engine.experts) == [2] and lazy.inspector.pending_tasks == [0, 1]
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "lazy").iterdir()) == ["expert2", "features"]
    assert_same(one, before.inspect(eager.prepare(product(2))))
    assert_same(engine.inspect(lazy.prepare(mixed())), before.inspect(eager.prepare(mixed())))
    assert graph_keys(lazy, 17, "none") == graph_keys(eager, 17, "none")  # the same cache entries
