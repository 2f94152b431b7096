"""Experts learned on Ray (after the shared flow is frozen) are bit-identical to serial learning."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch

from moleflow import MoleFlow
from moleflow.cli import main
from moleflow.data.synthetic import write_mvtec_layout
from moleflow.errors import MoleflowError
from moleflow.parallel import Parallel

from helpers import product_images, tiny_config

PRODUCTS = ("brick", "coins", "grass", "camera")


def _ray():
    try:
        import ray
    except ImportError:
        pytest.skip("Ray is not installed here (pip install 'moleflow[ray]'; `make test` installs it)")
    return ray


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray with 2 CPUs for the module (moleflow reuses an initialised Ray and leaves it running)."""
    ray = _ray()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture()
def one_thread():
    """Serial learning with 1 torch thread, as each Ray task (1 CPU) has: float sums then round alike (conftest
    puts the thread count back after the test)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def images():
    return product_images(PRODUCTS, n_train=12, n_test_good=3)


def _config(**overrides):
    return tiny_config(**{"train.epochs": 2, **overrides})


def test_experts_learned_on_ray_equal_serial_learning(local_ray, one_thread, images):
    model = MoleFlow(_config())
    model.fit_task(images["brick"][0], name="brick")
    before = {k: v.clone() for k, v in model.inspector.model_state().items()}
    serial, spread = copy.deepcopy(model), copy.deepcopy(model)
    steps = [{"coins": images["coins"][0]}, {"grass": images["grass"][0], "camera": images["camera"][0]}]
    a_infos = serial.fit_steps(steps)
    b_infos = spread.fit_steps(steps, parallel=Parallel(workers=2))
    a, b = serial.inspector.model_state(), spread.inspector.model_state()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == [], "experts learned on Ray differ from serial ones"
    assert all(torch.equal(before[k], b[k]) for k in before)  # nothing learned before changed
    for x, y in zip([i for s in a_infos for i in s], [i for s in b_infos for i in s]):
        x_train, y_train = dict(x.train), dict(y.train)
        assert x_train.pop("seconds") >= 0 and y_train.pop("seconds") >= 0
        assert (x.task_id, x.name, x.step, x.threshold, x.calibration, x_train) == \
               (y.task_id, y.name, y.step, y.threshold, y.calibration, y_train)
    assert [[i.step for i in s] for s in b_infos] == [[1], [2, 2]]
    assert [t.name for t in spread.tasks] == ["brick", "coins", "grass", "camera"]
    probe = [img for p in PRODUCTS for img in images[p][1]]
    pa, pb = serial.predict(probe), spread.predict(probe)
    assert torch.equal(pa.scores, pb.scores) and torch.equal(pa.task_ids, pb.task_ids)
    assert torch.equal(pa.maps, pb.maps) and torch.equal(pa.anomalous, pb.anomalous)


def test_a_first_step_is_learned_before_the_others_go_to_ray(local_ray, one_thread, images):
    cfg = _config(**{"train.first_step": "first_only"})
    serial, spread = MoleFlow(cfg), MoleFlow(cfg)
    steps = [{"brick": images["brick"][0], "coins": images["coins"][0]}, {"grass": images["grass"][0]}]
    serial.fit_steps(steps)
    spread.fit_steps(steps, parallel=Parallel(workers=2))
    assert spread.flow.base_tasks == [0] == serial.flow.base_tasks
    a, b = serial.inspector.model_state(), spread.inspector.model_state()
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_a_failure_on_ray_names_the_product_and_leaves_the_model_as_it_was(local_ray, images):
    model = MoleFlow(_config())
    model.fit_task(images["brick"][0], name="brick")
    state = {k: v.clone() for k, v in model.inspector.model_state().items()}
    with pytest.raises(MoleflowError, match="expert of broken"):
        model.fit_steps([{"coins": images["coins"][0]}, {"broken": ["/nonexistent/image.png"]}],
                        parallel=Parallel(workers=2))
    assert [t.name for t in model.tasks] == ["brick"] and model.flow.task_ids == [0]
    assert model.inspector.model_state().keys() == state.keys()


def test_parallel_needs_a_frozen_shared_flow_and_ray():
    model = MoleFlow(_config(**{"model.freeze_base": False}))
    with pytest.raises(MoleflowError, match="freeze_base"):
        model.fit_steps([{"a": []}], parallel=Parallel(workers=2))
    with pytest.raises(MoleflowError, match="at least 1"):
        Parallel(workers=0)


def test_without_ray_the_option_says_how_to_install_it(monkeypatch):
    from moleflow.parallel import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(MoleflowError, match=r"pip install 'moleflow\[ray\]'"):
        import_ray()


def test_train_and_add_task_with_parallel_equal_serial_runs(local_ray, tmp_path):
    root = tmp_path / "data"
    write_mvtec_layout(root, list(PRODUCTS[:3]), n_train=12, n_test_good=3, n_test_defect=3, size=112, seed=0)
    common = ["--data", str(root), "--preset", "tiny", "--set", "train.epochs=2", "--no-progress", "--no-report",
              "--threads", "1"]
    assert main(["train", *common, "--classes", *PRODUCTS[:3], "--out", str(tmp_path / "serial")]) == 0
    assert main(["train", *common, "--classes", *PRODUCTS[:3], "--out", str(tmp_path / "ray"),
                 "--parallel", "2"]) == 0
    serial = json.loads((tmp_path / "serial" / "results.json").read_text())
    spread = json.loads((tmp_path / "ray" / "results.json").read_text())
    assert serial["final_mean"] == spread["final_mean"]
    assert [s["results"] for s in serial["steps"]] == [s["results"] for s in spread["steps"]]
    # add-task: two new products into a copy of a one-product run, on Ray and serially
    write_mvtec_layout(tmp_path / "more", ["grass", "camera"], n_train=12, n_test_good=2, n_test_defect=2, size=112,
                       seed=1)
    runs = {}
    for name, extra in (("a", []), ("b", ["--parallel", "2"])):
        run = tmp_path / f"add_{name}"
        assert main(["train", *common, "--classes", "brick", "--out", str(run)]) == 0
        assert main(["add-task", str(run), "--data", str(tmp_path / "more"), "--classes", "grass", "camera",
                     "--no-progress", "--threads", "1", *extra]) == 0
        runs[name] = MoleFlow.load(run).inspector.model_state()
    assert runs["a"].keys() == runs["b"].keys() and all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
