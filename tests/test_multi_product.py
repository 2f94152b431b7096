"""Several products in one learning step: one expert and prototype per product (default), or one per step
(the spec's behaviour, `model.experts=task`); side-by-side learning of later products equals serial learning."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from moleflow import MoleFlow
from moleflow.cli import main
from moleflow.continual import parse_scenario
from moleflow.data.synthetic import write_mvtec_layout
from moleflow.evaluation import learned_steps

from helpers import product_images, tiny_config

PRODUCTS = ("brick", "coins", "grass", "camera")


@pytest.fixture(scope="module")
def images():
    """Per product: normal training images and good test images (uint8 arrays)."""
    return product_images(PRODUCTS, n_train=14, n_test_good=4)


def _config(**overrides):
    return tiny_config(**{"train.epochs": 2, **overrides})


@pytest.fixture(scope="module")
def two_in_first_step(images):
    model = MoleFlow(_config())
    infos = model.fit_step({p: images[p][0] for p in PRODUCTS[:2]})
    return model, infos


def test_a_first_step_of_two_products_gives_each_its_expert_and_prototype(images, two_in_first_step):
    model, infos = two_in_first_step
    assert [i.name for i in infos] == list(PRODUCTS[:2]) and [i.classes for i in infos] == [["brick"], ["coins"]]
    assert [i.step for i in infos] == [0, 0]
    assert model.flow.base_tasks == [0, 1]  # both trained the shared flow
    assert model.router.task_ids == [0, 1]
    assert all(np.isfinite(i.threshold) for i in infos)
    # every parameter each expert owns was trained (moved off its initial value)
    fresh = MoleFlow(_config())
    fresh.inspector.add_expert(base=True), fresh.inspector.add_expert(base=True)
    for t in (0, 1):
        trained = [p for p in model.flow.task_parameters(t)]
        initial = [p for p in fresh.flow.task_parameters(t)]
        assert any(not torch.equal(a, b) for a, b in zip(trained, initial))
    # routed per product: each product's good test images go to its own expert
    for t, name in enumerate(PRODUCTS[:2]):
        assert model.predict(images[name][1]).task_ids.tolist() == [t] * len(images[name][1])


def test_the_faithful_switch_keeps_one_expert_and_prototype_per_step(images):
    model = MoleFlow(_config(**{"model.experts": "task"}))
    (info,) = model.fit_step({p: images[p][0] for p in PRODUCTS[:2]})
    assert info.name == "brick+coins" and info.classes == ["brick", "coins"]
    assert model.router.task_ids == [0] and model.flow.task_ids == [0]
    assert info.n_train + info.n_calibration == 2 * len(images["brick"][0])


def test_later_products_learned_side_by_side_equal_serial_learning(images, two_in_first_step):
    model, _ = two_in_first_step
    state = {k: v.clone() for k, v in model.inspector.model_state().items()}
    side, serial = copy.deepcopy(model), copy.deepcopy(model)
    infos = side.fit_step({p: images[p][0] for p in PRODUCTS[2:]})
    assert [i.step for i in infos] == [1, 1] and [i.task_id for i in infos] == [2, 3]
    for p in PRODUCTS[2:]:
        serial.fit_task(images[p][0], name=p)
    a, b = side.inspector.model_state(), serial.inspector.model_state()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "side-by-side experts differ from serial ones"
    # the products learned first are bit-identical after the later step
    assert all(torch.equal(state[k], a[k]) for k in state)
    probe = images["brick"][1]
    assert torch.equal(model.predict(probe).scores, side.predict(probe).scores)
    assert [t.step for t in serial.tasks] == [0, 0, 1, 2]


def test_a_failed_step_leaves_the_model_as_it_was(images):
    model = MoleFlow(_config())
    with pytest.raises(Exception):
        model.fit_step({"brick": images["brick"][0], "empty": []})
    assert model.flow.task_ids == [] and model.flow.base_tasks == [] and model.tasks == []
    model.fit_step({"brick": images["brick"][0]})
    assert model.flow.base_tasks == [0]


def test_scenarios_report_every_expert_and_route_per_product(tmp_path):
    root = tmp_path / "data"
    write_mvtec_layout(root, list(PRODUCTS[:3]), n_train=14, n_test_good=3, n_test_defect=3, size=112, seed=0)
    out = tmp_path / "run"
    args = ["train", "--data", str(root), "--classes", *PRODUCTS[:3], "--scenario", "2-1", "--out", str(out),
            "--preset", "tiny", "--set", "train.epochs=2", "--no-progress", "--no-report"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert [s["classes"] for s in results["steps"]] == [["brick", "coins"], ["grass"]]
    assert [[e["name"] for e in s["experts"]] for s in results["steps"]] == [["brick", "coins"], ["grass"]]
    confusion = results["routing_confusion"]
    assert confusion["tasks"][:3] == list(PRODUCTS[:3])  # one column per product, not per step
    model = MoleFlow.load(out)
    assert [len(s) for s in learned_steps(model)] == [2, 1]
    assert model.flow.base_tasks == [0, 1]
    # evaluate re-scores the saved steps; the report renders the per-expert table
    assert main(["evaluate", str(out), "--no-progress"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["final_mean"]["image_auroc"] == pytest.approx(results["final_mean"]["image_auroc"])
    assert [s["classes"] for s in again["steps"]] == [["brick", "coins"], ["grass"]]
    from moleflow.report import write_report

    markdown, _ = write_report(out)
    timing = markdown.read_text().split("Training time and threshold calibration")[1]
    assert "| brick |" in timing and "| coins |" in timing  # one row per expert of the first step
    # a product can be renamed; only the manifest changes
    before = model.inspector.model_state()
    assert main(["rename-task", str(out), "coins", "coins_v2"]) == 0
    renamed = MoleFlow.load(out)
    assert [t.name for t in renamed.tasks] == ["brick", "coins_v2", "grass"] and renamed.tasks[1].classes == ["coins_v2"]
    after = renamed.inspector.model_state()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(Exception, match="a task has that name"):
        renamed.rename_task("brick", "grass")


def test_scenario_parsing_of_all_in_one_task():
    assert parse_scenario("4-4", list("abcd")) == [list("abcd")]
    assert parse_scenario("3-1", list("abcd")) == [list("abc"), ["d"]]


def test_a_balanced_first_step_gives_every_product_as_many_steps_as_the_largest():
    from moleflow.trainer import ExpertJob, job_epochs

    balanced = tiny_config(**{"train.first_step": "balanced"}).train  # 2 epochs of batches of 8
    jobs = [ExpertJob(0, 80, None), ExpertJob(1, 16, None)]  # 10 and 2 batches per epoch
    assert job_epochs(jobs, balanced, base=True) == [2, 10]  # 20 steps each
    side_by_side = tiny_config(**{"train.first_step": "side_by_side"}).train
    assert job_epochs(jobs, side_by_side, base=True) == [2, 2]  # proportional: as alone
    assert job_epochs(jobs, balanced, base=False) == [2, 2]  # later steps: always as alone


def test_first_only_learns_a_first_step_exactly_as_one_product_per_step(images):
    cfg = _config(**{"train.first_step": "first_only"})
    together, serial = MoleFlow(cfg), MoleFlow(cfg)
    together.fit_step({p: images[p][0] for p in PRODUCTS[:2]})
    for p in PRODUCTS[:2]:
        serial.fit_task(images[p][0], name=p)
    assert together.flow.base_tasks == [0] == serial.flow.base_tasks
    a, b = together.inspector.model_state(), serial.inspector.model_state()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_discovery_finds_unnamed_products_and_learns_one_expert_each(tmp_path):
    root = tmp_path / "data"
    names = ["brick", "coins", "grass"]
    write_mvtec_layout(root, names, n_train=16, n_test_good=3, n_test_defect=3, size=112, seed=0)
    out = tmp_path / "run"
    tiny = ["--preset", "tiny", "--set", "train.epochs=2", "--no-progress"]
    assert main(["train", "--data", str(root), "--classes", "brick", "--out", str(out), "--no-report"] + tiny) == 0
    # a folder of good images of two new products, mixed, without names
    mixed = tmp_path / "line4"
    for name in ("coins", "grass"):
        for i, f in enumerate(sorted((root / name / "train" / "good").iterdir())):
            (mixed / f"sub{i % 2}").mkdir(parents=True, exist_ok=True)
            (mixed / f"sub{i % 2}" / f"{name[0]}{i}.png").write_bytes(f.read_bytes())
    before = MoleFlow.load(out).inspector.model_state()
    assert main(["add-task", str(out), "--discover", "--data", str(mixed), "--name", "line4-", "--no-progress"]) == 0
    model = MoleFlow.load(out)
    assert [t.name for t in model.tasks] == ["brick", "line4-1", "line4-2"]
    assert [t.step for t in model.tasks] == [0, 1, 1]
    after = model.inspector.model_state()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the earlier product is untouched
    clusters = json.loads((out / "discover" / "step1" / "clusters.json").read_text())
    assert clusters["k"] == 2 and [c["n"] for c in clusters["clusters"]] == [16, 16]
    assert all((out / "discover" / "step1" / f"line4-{i}.png").is_file() for i in (1, 2))
    # each found product holds one real product: its images route to one expert
    for name in ("coins", "grass"):
        routed = model.predict(sorted((root / name / "test" / "good").iterdir())).task_ids.tolist()
        assert len(set(routed)) == 1 and routed[0] in (1, 2)
    assert main(["add-task", str(out), "--discover", "--classes", "x", "--data", str(mixed)]) == 2  # one or the other


def test_train_with_names_hidden_scores_the_discovery(tmp_path):
    root = tmp_path / "data"
    write_mvtec_layout(root, list(PRODUCTS[:3]), n_train=16, n_test_good=3, n_test_defect=3, size=112, seed=0)
    out = tmp_path / "run"
    assert main(["train", "--data", str(root), "--classes", *PRODUCTS[:3], "--scenario", "3-3", "--discover",
                 "--out", str(out), "--preset", "tiny", "--set", "train.epochs=2", "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    found = results["steps"][0]["discovery"]
    assert found["k"] == 3 and found["purity"] == 1.0
    assert sorted(found["classes"]) == sorted(PRODUCTS[:3])
    assert results["final_mean"]["routing_accuracy"] == 1.0
    assert "Products found without names" in (out / "report.md").read_text()
