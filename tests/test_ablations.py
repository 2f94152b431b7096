"""Every named ablation learns, scores, saves and loads; `no_router` and `dia_only` work end to end."""

from __future__ import annotations

import json

import pytest
import torch

from moleflow import ABLATIONS, MoleFlow
from moleflow.cli import main
from moleflow.config import ModelConfig
from moleflow.data.synthetic import write_mvtec_layout
from moleflow.model import ExpertFlow

from helpers import random_images, tiny_config


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_every_ablation_learns_two_tasks_and_round_trips(name, tmp_path):
    cfg = tiny_config(**{"train.epochs": 1}).with_overrides(ABLATIONS[name])
    model = MoleFlow(cfg)
    model.fit_task(random_images(0, 10), name="a")
    model.fit_task(random_images(1, 10, shift=1.0), name="b")
    probe = random_images(2, 3, shift=0.5)
    oracle = not cfg.router.enabled
    pred = model.predict(probe, task_ids=[1, 1, 1] if oracle else None)
    assert pred.scores.shape == (3,) and torch.isfinite(pred.scores).all()
    loaded = MoleFlow.load(model.save(tmp_path / "run"))
    again = loaded.predict(probe, task_ids=[1, 1, 1] if oracle else None)
    assert torch.equal(again.scores, pred.scores)


def test_dia_only_experts_follow_the_model_dtype_and_device():
    """With zero coupling blocks the shared flow has no parameters; new experts must still go where the
    model lives (the reference left them on the CPU in fp32)."""
    flow = ExpertFlow(ModelConfig(num_coupling_blocks=0, use_spatial_context=False, lora_rank=4), dim=16)
    flow.add_task()
    flow.to(torch.float64)
    flow.add_task()
    assert {p.dtype for p in flow.parameters()} == {torch.float64}
    if torch.cuda.is_available():
        flow.to("cuda")
        flow.add_task()
        assert {p.device.type for p in flow.parameters()} == {"cuda"}


def test_no_router_and_dia_only_run_through_train_and_ablate(tmp_path):
    root = tmp_path / "data"
    write_mvtec_layout(root, ["brick", "grass"], n_train=12, n_test_good=2, n_test_defect=2, size=112, seed=0)
    tiny = ["--preset", "tiny", "--set", "train.epochs=1", "--no-progress"]
    out = tmp_path / "oracle"
    assert main(["train", "--data", str(root), "--classes", "brick", "grass", "--out", str(out), "--no-report",
                 "--set", "router.enabled=false"] + tiny) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["final_mean"]["routing_accuracy"] == 1.0  # oracle: the true task is given
    abl = tmp_path / "abl"
    assert main(["ablate", "--data", str(root), "--classes", "brick", "grass", "--out", str(abl),
                 "--ablations", "no_router", "dia_only"] + tiny) == 0
    rows = {r["run"]: r for r in json.loads((abl / "ablation.json").read_text())["rows"]}
    assert set(rows) == {"full", "no_router", "dia_only"}
    assert all(r["image_auroc"] is not None for r in rows.values())
