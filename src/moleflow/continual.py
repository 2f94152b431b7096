"""The continual run (spec §7): learn tasks one after another into one model, evaluate every class learned so
far after each task, and write the run folder. It is what `moleflow train` runs for one seed and what every
trial of `train --seeds`, `sweep` and `ablate` runs (`moleflow.trials`).

    tasks = parse_scenario("1-1", ["tile", "grid"])                        # [["tile"], ["grid"]]
    request = ContinualRequest(Config.from_preset("cpu"), DataSource(Path("data")), tasks, Path("runs/a"))
    results = run_continual(request)                                         # the content of results.json

The run folder's files are listed in `moleflow.evaluation`; every one is written through `moleflow.store`.
"""

from __future__ import annotations

import logging
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence, get_args

import numpy as np
import torch

from . import __version__
from .config import Config
from .data.datasets import ClassSplit, load_class
from .detector import MoleFlow
from .errors import MoleflowError
from .evaluation import (evaluate_classes, evaluation_cache, finish_run, learned_steps, step_classes, step_record,
                         summary_line)
from .metrics import mean_metrics
from .parallel import Parallel
from .store.checkpoint import run_has_model
from .store.run import clear_run, refuse_existing_run, write_config

log = logging.getLogger(__name__)

#: What a run does when its folder already holds a run: stop, delete that run's outputs, or continue it.
Existing = Literal["refuse", "overwrite", "resume"]


def parse_scenario(scenario: str, classes: Sequence[str]) -> list[list[str]]:
    """'a-b': the first task takes the first a classes, each later task the next b (the last may be short)."""
    try:
        first, step = (int(v) for v in scenario.split("-"))
    except ValueError:
        raise MoleflowError(f"scenario {scenario!r} must look like 1-1 or 5-5 (first task size - later task size)") from None
    if first < 1 or step < 1:
        raise MoleflowError(f"scenario {scenario!r}: task sizes must be >= 1")
    classes = list(classes)
    if len(classes) < first:
        raise MoleflowError(f"scenario {scenario!r} needs at least {first} classes, got {len(classes)}")
    tasks = [classes[:first]]
    tasks += [classes[i:i + step] for i in range(first, len(classes), step)]
    return tasks


@dataclass(frozen=True)
class DataSource:
    """Where the classes' images are: a dataset root and its layout (`data.datasets.DATASETS`)."""

    root: Path
    layout: str = "folder"

    def load(self, class_name: str) -> ClassSplit:
        """The train and test split of one class."""
        return load_class(self.root, class_name, self.layout)


@dataclass(frozen=True)
class ContinualRequest:
    """One continual run: learn `tasks` (class names per learning step, in order) with `config` (its
    train.seed is the run's seed) from `data`, into the run folder `run_dir`.

    existing: what to do when `run_dir` already holds a run (`Existing`); resuming needs the configuration the
    run was started with. rates: {product: false-alarm rate} for some products (the others use
    score.false_alarm_rate). discover: learn each step's images without class names, finding at most this many
    products. parallel: experts after the first step trained at the same time on Ray. scenario: the 'a-b'
    the tasks came from, recorded in results.json. report: also write report.md / report.html.
    device, workers, batch_size, progress: how the model runs (torch device, image-loading processes,
    inference batch size, progress bars).
    """

    config: Config
    data: DataSource
    tasks: list[list[str]]
    run_dir: Path
    scenario: str | None = None
    existing: Existing = "refuse"
    rates: Mapping[str, float] = field(default_factory=dict)
    discover: int | None = None
    parallel: Parallel | None = None
    report: bool = True
    device: str = "cpu"
    workers: int = 0
    batch_size: int = 32
    progress: bool = True

    def __post_init__(self) -> None:
        if self.existing not in get_args(Existing):
            raise MoleflowError(f"existing={self.existing!r}: choose one of {', '.join(get_args(Existing))}")

    @property
    def classes(self) -> list[str]:
        """Every class of the run, in learning order."""
        return [c for task in self.tasks for c in task]


def run_continual(request: ContinualRequest) -> dict[str, Any]:
    """Perform the run of `request`: open its model (new, or the saved one to resume), write config.yaml,
    learn and evaluate every task (`learn_and_evaluate`) and, if asked, write the report. Returns the
    results (the content of results.json)."""
    request.run_dir.mkdir(parents=True, exist_ok=True)
    model = open_model(request)
    model.loader_workers = request.workers
    write_config(request.run_dir / "config.yaml", request.config)
    results = learn_and_evaluate(model, request.data.load, request.tasks, request.run_dir, run_record(request, model),
                                 progress=request.progress, batch_size=request.batch_size,
                                 num_workers=request.workers, rates=dict(request.rates), discover=request.discover,
                                 parallel=request.parallel)
    if request.report:
        from .report import write_report

        write_report(request.run_dir)
    return results


def open_model(request: ContinualRequest) -> MoleFlow:
    """The model the run learns into: the saved one when resuming a run that has one (same configuration),
    else a new one, after refusing or clearing (`request.existing`) a run already in the folder."""
    run_dir, cfg = request.run_dir, request.config
    if request.existing == "resume" and run_has_model(run_dir):
        model = MoleFlow.load(run_dir, device=request.device, backbone_weights=cfg.backbone.weights)
        if model.config.to_dict() != cfg.to_dict():
            diff = [f"{s}.{k}" for s, section in cfg.to_dict().items() if isinstance(section, dict)
                    for k, v in section.items() if model.config.to_dict()[s].get(k) != v]
            raise MoleflowError(f"{run_dir}: --resume needs the configuration the run was started with; these "
                                f"differ: {', '.join(diff) or 'preset name'}")
        log.info("resuming %s after %d learned tasks", run_dir, len(model.tasks))
        return model
    if request.existing == "overwrite":
        removed = clear_run(run_dir)
        if removed:
            log.info("--overwrite: removed %d outputs of the previous run in %s", len(removed), run_dir)
    elif request.existing == "refuse":
        refuse_existing_run(run_dir)
    return MoleFlow(cfg, device=request.device)


def run_meta(cfg: Config, extra: dict[str, Any]) -> dict[str, Any]:
    """Provenance stored with every run: versions, command, machine, seed, configuration, then `extra`."""
    return {
        "moleflow_version": __version__,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(["moleflow"] + sys.argv[1:]),
        "seed": cfg.train.seed,
        "config": cfg.to_dict(),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "machine": platform.machine(), "threads": torch.get_num_threads()},
        **extra,
    }


def run_record(request: ContinualRequest, model: MoleFlow) -> dict[str, Any]:
    """What results.json records besides the results: provenance, the backbone and the data."""
    backbone = {"name": model.extractor.name, "weights_sha256": model.extractor.weights_sha256,
                "weights_source": model.extractor.weights_source, "runtime": model.extractor.runtime_used(model.device)}
    dataset = {"root": str(request.data.root), "name": request.data.layout, "scenario": request.scenario,
               "classes": request.classes, "tasks": request.tasks, "discover": request.discover}
    return run_meta(request.config, {"backbone": backbone, "dataset": dataset})


# ---------------------------------------------------------------------------------------------- learning


def learn_and_evaluate(model: MoleFlow, load_split: Callable[[str], ClassSplit], tasks: list[list[str]],
                       run_dir: Path, meta: dict[str, Any], progress: bool = True, batch_size: int = 32,
                       examples_per_kind: int = 2, num_workers: int = 0, rates: dict[str, float] | None = None,
                       discover: int | None = None, parallel: Parallel | None = None) -> dict[str, Any]:
    """Learn `tasks` one after another into `model`, evaluating all learned classes after each task.
    `rates` gives some products their own false-alarm rate (an expert of several classes takes the lowest).
    Steps the model has already learned (a resumed run) are re-scored, not re-learned.

    `parallel` (parallel.Parallel): learn every step up front, those after the first with their experts trained
    at the same time on Ray (`MoleFlow.fit_steps`), then evaluate each step among the tasks learned up to it.
    With the shared flow frozen this is the same matrix as learning and evaluating step by step.

    `discover` (the most products a step may hold): each step's training images are pooled without their
    class names and split into products by `discover.split_products`; for scoring, a class counts as routed
    correctly when it goes to the cluster holding most of its training images.

    Writes the checkpoint (after every task), results.json, the matrices and per-class score files into
    `run_dir` (`evaluation.finish_run`) and returns the results dictionary.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    splits: dict[str, ClassSplit] = {}
    learned = learned_steps(model)
    check_resumable(model, learned, tasks, run_dir)
    source = {k: meta.get("dataset", {}).get(k) for k in ("root", "name")}  # where the products' images came from
    if parallel is not None and len(learned) < len(tasks):
        meta = {**meta, "parallel": learn_steps_on_ray(model, splits, load_split, tasks[len(learned):], source,
                                                       rates, parallel, discover, progress)}
        model.save(run_dir)
        learned = learned_steps(model)
    steps: list[dict[str, Any]] = []
    class_task: dict[str, int] = {}
    eval_seconds = 0.0
    cache = evaluation_cache(model)  # test features and expert scores, reused by every later evaluation
    for step, classes in enumerate(tasks):
        splits.update({c: load_split(c) for c in classes if c not in splits})
        if step < len(learned):
            log.info("step %d/%d: %s already learned; scoring", step + 1, len(tasks), "+".join(classes))
            infos, seconds, found = learned[step], None, None
        else:
            log.info("step %d/%d: learning %s", step + 1, len(tasks), "+".join(classes))
            t0 = time.perf_counter()
            infos, found = learn_step(model, splits, classes, run_dir / "discover" / f"step{step}", source, rates,
                                      discover, progress)
            seconds = time.perf_counter() - t0
            model.save(run_dir)
        class_task.update({c: info.task_id for info in infos for c in info.classes})
        t0 = time.perf_counter()
        among = [t.task_id for t in model.tasks if t.step <= step]
        evals = evaluate_classes(model, splits, class_task, among=among, batch_size=batch_size,
                                 num_workers=num_workers, cache=cache,
                                 examples_per_kind=examples_per_kind if step == len(tasks) - 1 else 0)
        eval_seconds += time.perf_counter() - t0
        steps.append(step_record(step, infos, evals, seconds))
        if found is not None:
            steps[-1]["discovery"] = found
        log.info("after step %d: %s", step + 1, summary_line(mean_metrics(steps[-1]["results"])))
    return finish_run(model, run_dir, splits, class_task, steps, evals, meta, eval_seconds, start,
                      batch_size, num_workers, cache)


def check_resumable(model: MoleFlow, learned: list[list[Any]], tasks: list[list[str]], run_dir: Path) -> None:
    """A model that has already learned steps (`learned`, TaskInfo per step) continues only the same sequence
    of `tasks`, and only with the shared flow frozen (earlier steps are re-scored from the final model)."""
    done = len(learned)
    if [sorted(step_classes(infos)) for infos in learned] != [sorted(c) for c in tasks[:done]]:
        raise MoleflowError(f"{run_dir}: the saved run learned {['+'.join(step_classes(i)) for i in learned]}, which "
                            f"is not the start of the requested sequence {['+'.join(c) for c in tasks]}; use "
                            "--overwrite or another --out")
    if done and not model.config.model.freeze_base:
        raise MoleflowError("--resume needs model.freeze_base=true (the earlier steps are re-scored from the saved "
                            "model, which is exact only when the shared flow is frozen)")


def step_images(splits: dict[str, ClassSplit], classes: list[str]) -> dict[str, list[Path]]:
    """{class: its training image paths} for the classes of one step."""
    return {c: [s.image for s in splits[c].train] for c in classes}


def learn_step(model: MoleFlow, splits: dict[str, ClassSplit], classes: list[str], discover_dir: Path,
               source: dict[str, Any], rates: dict[str, float] | None, discover: int | None,
               progress: bool) -> tuple[list[Any], dict[str, Any] | None]:
    """Learn one step from the training images of `classes`: one expert per class (per task with
    model.experts=task), or per product found without the names (`discover`, contact sheets in
    `discover_dir`). Returns the new experts' TaskInfo and the discovery summary (None without discovery)."""
    if discover:
        return learn_discovered(model, splits, classes, discover_dir, discover, progress, source)
    return model.fit_step(step_images(splits, classes), progress=progress, source=source, rates=rates), None


def learn_steps_on_ray(model: MoleFlow, splits: dict[str, ClassSplit], load_split: Callable[[str], ClassSplit],
                       tasks: list[list[str]], source: dict[str, Any], rates: dict[str, float] | None,
                       parallel: Parallel, discover: int | None, progress: bool) -> dict[str, Any]:
    """Learn the steps `tasks` up front, the experts of those after the first step at the same time on Ray
    (`MoleFlow.fit_steps`); the classes' splits are loaded into `splits`. Returns what results.json records
    as "parallel" (workers, resources, steps learned, seconds)."""
    if discover:
        raise MoleflowError("--parallel and --discover cannot be combined yet: discovery needs each step's "
                            "model before the next step's products are found")
    for c in [c for classes in tasks for c in classes]:
        splits[c] = load_split(c)
    done = len(learned_steps(model))
    log.info("learning steps %d-%d, experts after the first step %d at a time on Ray", done + 1, done + len(tasks),
             parallel.workers)
    t0 = time.perf_counter()
    model.fit_steps([step_images(splits, classes) for classes in tasks], progress=progress, source=source,
                    rates=rates, parallel=parallel)
    return {"workers": parallel.workers, "address": parallel.address, "cpus_per_expert": parallel.cpus_per_task,
            "gpus_per_expert": parallel.gpus_per_task, "steps_learned": len(tasks),
            "learn_seconds": time.perf_counter() - t0}


def learn_discovered(model: MoleFlow, splits: dict[str, ClassSplit], classes: list[str], out_dir: Path,
                     max_products: int, progress: bool, source: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """Learn one step from the pooled training images of `classes` with their names hidden: products are
    discovered (contact sheets in `out_dir`), one expert each. The class names are used afterwards only to
    score the discovery (purity) and to say which expert a class's test images should go to."""
    from .discover import purity, split_products

    images = [s.image for c in classes for s in splits[c].train]
    truth = [c for c in classes for _ in splits[c].train]
    step = model.next_step
    groups, labels, summary = split_products(model, images, out_dir, prefix=f"step{step}-product",
                                             max_products=max_products, seed=model.config.train.seed)
    names = list(groups)
    log.info("step %d: found %d products in %d images without names (%s); sample sheets in %s", step, len(names),
             len(images), summary["method"], out_dir)
    counts = np.zeros((len(names), len(classes)), dtype=np.int64)  # images of class c in found product k
    np.add.at(counts, (labels, [classes.index(t) for t in truth]), 1)
    majority = {c: names[int(counts[:, j].argmax())] for j, c in enumerate(classes)}
    owned = {name: [c for c in classes if majority[c] == name] for name in names}
    infos = model.fit_step(groups, owned, progress=progress, source=source)
    for cluster in summary["clusters"]:  # sheets relative to the run folder, for the report
        if "sheet" in cluster:
            cluster["sheet"] = str(Path(cluster["sheet"]).relative_to(out_dir.parent.parent))
    summary.update({"purity": purity(labels, truth), "classes": majority,
                    "composition": {name: dict(zip(classes, counts[k].tolist())) for k, name in enumerate(names)}})
    return infos, summary
