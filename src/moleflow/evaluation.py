"""The continual evaluation protocol (spec §7) and the files of a run directory.

After every task, every class learned so far is evaluated with the router (task-agnostic: routing
errors count). The full matrix R[step][class] is kept for every metric; after the last task an
oracle pass (true task ids) measures what routing costs. Nothing is tuned or normalised on test data:
the only thresholds (decision, unknown product) come from held-out normal training images.

Run directory::

    config.yaml  model/ (manifest + shards)  results.json  final.csv  matrix_<metric>.csv
    scores/<class>.csv     one row per test image (score, routed task, decision)
    examples/<class>.npz   a few images with maps for the report (best and worst cases)
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from .data.datasets import ClassSplit, ImageDataset
from .detector import MoleFlow
from .errors import MoleflowError
from .parallel import Parallel
from .store.atomic import atomic_write_json, atomic_write_text
from .metrics import auroc, backward_transfer, forgetting_measure, image_metrics, pixel_metrics

log = logging.getLogger(__name__)

METRICS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "aupro", "routing_accuracy")
UNKNOWN = "unknown"


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


@dataclass
class ClassEvaluation:
    """Everything measured on one class's test split."""

    class_name: str
    true_task: int
    files: list[str]
    defect_types: list[str]
    labels: np.ndarray  # (N,) 0/1
    scores: np.ndarray  # (N,)
    routed: np.ndarray  # (N,) task ids
    known: np.ndarray  # (N,) bool
    anomalous: np.ndarray  # (N,) bool
    metrics: dict[str, float | None]
    examples: dict[str, np.ndarray] | None = None


def _clean(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _select_examples(labels: np.ndarray, scores: np.ndarray, per_kind: int) -> list[tuple[int, str]]:
    """Indices of detected (top anomalous), missed (lowest anomalous), false alarms and typical normals."""
    anomalous = np.flatnonzero(labels == 1)
    normal = np.flatnonzero(labels == 0)
    by_score = lambda idx: idx[np.argsort(scores[idx], kind="stable")]  # noqa: E731
    a, n = by_score(anomalous), by_score(normal)
    chosen: list[tuple[int, str]] = [(int(i), "detected") for i in a[::-1][:per_kind]]
    chosen += [(int(i), "missed") for i in a[:per_kind] if int(i) not in {c for c, _ in chosen}]
    chosen += [(int(i), "false_alarm") for i in n[::-1][:per_kind]]
    if len(n):
        chosen.append((int(n[len(n) // 2]), "normal"))
    seen, out = set(), []
    for i, kind in chosen:
        if i not in seen:
            seen.add(i)
            out.append((i, kind))
    return out


def per_defect_counts(labels: np.ndarray, defect_types: Sequence[str]) -> dict[str, int]:
    """{defect type: number of anomalous images}, sorted by type; labels (N,) 0/1, defect_types (N,)."""
    labels = np.asarray(labels)
    types = np.asarray([str(t) for t in defect_types])
    if types.shape != labels.shape:
        raise ValueError(f"defect_types have shape {types.shape} but the labels have shape {labels.shape}")
    return {str(t): int(np.sum(types[labels == 1] == t)) for t in sorted(set(types[labels == 1].tolist()))}


def per_defect_auroc(labels: np.ndarray, scores: np.ndarray, defect_types: Sequence[str]) -> dict[str, float | None]:
    """Image AUROC of each defect type's anomalous images against all normal images, sorted by type.

    labels (N,) 0/1, scores (N,), defect_types (N,) (the type of each image; that of normal images is
    ignored). A type is a defect type of at least one anomalous image. None where there is no normal image.
    """
    labels, scores = np.asarray(labels), np.asarray(scores)
    types = np.asarray([str(t) for t in defect_types])
    counts = per_defect_counts(labels, defect_types)
    if scores.shape != labels.shape:
        raise ValueError(f"scores have shape {scores.shape} but the labels have shape {labels.shape}")
    normal = labels == 0
    out: dict[str, float | None] = {}
    for t in counts:
        keep = normal | ((labels == 1) & (types == t))
        out[t] = _clean(auroc(scores[keep], labels[keep] == 1))
    return out


@torch.no_grad()
def evaluate_class(model: MoleFlow, split: ClassSplit, true_task: int, oracle: bool = False, batch_size: int = 32,
                   examples_per_kind: int = 0, num_workers: int = 0, among: list[int] | None = None
                   ) -> ClassEvaluation:
    """Score a class's test split (routed among `among`, or with the true task when `oracle` or when the
    router is off, the `no_router` ablation); its metrics."""
    oracle = oracle or not model.config.router.enabled
    dataset = ImageDataset(split.test, model.transform)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    scores, routed, known, anomalous, maps, masks, ambiguous = [], [], [], [], [], [], []
    for batch in loader:
        ids = [true_task] * len(batch["image"]) if oracle else None
        # with tiling the model cuts each image file itself; otherwise the loader's square tensors are used
        images = batch["image"] if model.config.data.tiling == "none" else [split.test[int(i)].image for i in batch["index"]]
        pred = model.predict(images, task_ids=ids, batch_size=batch_size, among=among)
        scores.append(pred.scores.numpy())
        routed.append(pred.task_ids.numpy())
        known.append(pred.known.numpy())
        anomalous.append(pred.anomalous.numpy())
        ambiguous.append(pred.ambiguous.numpy())
        maps.append(pred.maps.numpy().astype(np.float32))
        masks.append(batch["mask"].numpy())
    s, r = np.concatenate(scores).astype(np.float64), np.concatenate(routed)
    labels = np.array([x.label for x in split.test])
    m, k = np.concatenate(maps), np.concatenate(masks)
    metrics: dict[str, Any] = {key: _clean(v) for key, v in image_metrics(s, labels).items()}
    if split.has_masks:
        metrics.update({key: _clean(v) for key, v in pixel_metrics(m, k).items()})
    else:
        metrics.update({"pixel_auroc": None, "pixel_ap": None, "aupro": None})
    metrics["routing_accuracy"] = float(np.mean(r == true_task))
    # a defect must not move a part to another product: routing of good and of defective parts, apart
    metrics["routing_accuracy_good"] = float(np.mean(r[labels == 0] == true_task)) if (labels == 0).any() else None
    metrics["routing_accuracy_defective"] = (float(np.mean(r[labels == 1] == true_task)) if (labels == 1).any()
                                             else None)
    # the realised false-alarm rate: good test parts flagged (anomalous or unknown product) by their decision
    flagged = np.concatenate(anomalous) | ~np.concatenate(known)
    metrics["false_alarms"] = int(flagged[labels == 0].sum())
    metrics["false_alarm_rate_realised"] = float(flagged[labels == 0].mean()) if (labels == 0).any() else None
    # defective parts flagged by their decision (what routing costs in decisions: compare with the oracle pass)
    metrics["detection_rate"] = float(flagged[labels == 1].mean()) if (labels == 1).any() else None
    metrics["ambiguous_rate"] = float(np.concatenate(ambiguous).mean())  # parts scored under several products
    metrics["n_test"] = int(len(labels))
    metrics["n_anomalous"] = int(labels.sum())
    defect_types = [x.defect_type for x in split.test]
    metrics["per_defect_image_auroc"] = per_defect_auroc(labels, s, defect_types)  # {type: float | None}
    metrics["per_defect_count"] = per_defect_counts(labels, defect_types)  # {type: n anomalous}
    result = ClassEvaluation(split.class_name, true_task, [str(x.image) for x in split.test],
                             defect_types, labels, s, r, np.concatenate(known),
                             np.concatenate(anomalous), metrics)
    if examples_per_kind:
        chosen = _select_examples(labels, s, examples_per_kind)
        idx = [i for i, _ in chosen]
        from .data.transforms import load_rgb

        images = np.stack([model.transform.to_array(load_rgb(split.test[i].image)) for i in idx])
        result.examples = {"images": images, "maps": m[idx], "masks": k[idx], "scores": s[idx],
                           "labels": labels[idx], "kinds": np.array([kind for _, kind in chosen]),
                           "files": np.array([result.files[i] for i in idx])}
    return result


def mean_metrics(per_class: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Unweighted mean over classes of each metric, skipping classes where it is not available."""
    out = {}
    for key in METRICS:
        values = [v[key] for v in per_class.values() if v.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def continual_metrics(steps: list[dict[str, Any]], classes: list[str], first_step: dict[str, int]) -> dict:
    """BWT and FM of every metric from the per-step results (null with fewer than two steps)."""
    out = {}
    for key in METRICS:
        matrix = np.full((len(steps), len(classes)), np.nan)
        for j, step in enumerate(steps):
            for i, name in enumerate(classes):
                value = step["results"].get(name, {}).get(key)
                if value is not None:
                    matrix[j, i] = value
        fs = np.array([first_step[c] for c in classes])
        if len(steps) < 2:
            out[key] = {"bwt": None, "fm": None}
            continue
        out[key] = {"bwt": _clean(backward_transfer(matrix, first_step=fs)),
                    "fm": _clean(forgetting_measure(matrix, first_step=fs))}
    return out


def write_scores_csv(path: Path, ev: ClassEvaluation, task_names: dict[int, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "defect_type", "label", "score", "routed_task", "routed_name", "known", "anomalous"])
        for i in range(len(ev.labels)):
            writer.writerow([ev.files[i], ev.defect_types[i], int(ev.labels[i]), repr(float(ev.scores[i])),
                             int(ev.routed[i]), task_names.get(int(ev.routed[i]), "?"), int(ev.known[i]),
                             int(ev.anomalous[i])])


def write_matrices(run_dir: Path, steps: list[dict[str, Any]], classes: list[str]) -> None:
    """matrix_<metric>.csv: rows = learning steps (task just learned), columns = classes."""
    for key in METRICS:
        with open(run_dir / f"matrix_{key}.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["step", "task"] + classes)
            for step in steps:
                row = [step["results"].get(c, {}).get(key) for c in classes]
                writer.writerow([step["step"], step["task_name"]] + ["" if v is None else f"{v:.6f}" for v in row])


def write_final_csv(run_dir: Path, final: dict[str, dict], mean: dict[str, float | None]) -> None:
    with open(run_dir / "final.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["class"] + list(METRICS))
        for name, vals in list(final.items()) + [("mean", mean)]:
            writer.writerow([name] + ["" if vals.get(k) is None else f"{vals[k]:.6f}" for k in METRICS])


def routing_confusion(evals: dict[str, ClassEvaluation], task_ids: list[int], task_names: list[str]) -> dict:
    """Rows: true class; columns: routed task, plus a last column for images flagged as unknown product."""
    matrix = []
    for ev in evals.values():
        row = [int(np.sum((ev.routed == t) & ev.known)) for t in task_ids]
        row.append(int(np.sum(~ev.known)))
        matrix.append(row)
    return {"classes": list(evals), "tasks": list(task_names) + [UNKNOWN], "matrix": matrix}


def save_json(path: Path, data: dict) -> None:
    atomic_write_json(path, data)


def evaluate_classes(model: MoleFlow, splits: dict[str, ClassSplit], class_task: dict[str, int],
                     among: list[int] | None = None, oracle: bool = False, batch_size: int = 32,
                     examples_per_kind: int = 0, num_workers: int = 0) -> dict[str, ClassEvaluation]:
    """Evaluate each class in `class_task` (class -> true task id), routed among `among` (default all)."""
    return {c: evaluate_class(model, splits[c], t, oracle=oracle, batch_size=batch_size, among=among,
                              examples_per_kind=examples_per_kind, num_workers=num_workers)
            for c, t in class_task.items()}


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


def learned_steps(model: MoleFlow) -> list[list[Any]]:
    """The model's tasks (TaskInfo) grouped by the learning step that learned them, in step order."""
    steps: dict[int, list[Any]] = {}
    for info in model.tasks:
        steps.setdefault(info.step, []).append(info)
    return [steps[k] for k in sorted(steps)]


def step_classes(infos: list[Any]) -> list[str]:
    return [c for info in infos for c in info.classes]


def step_record(step: int, infos: list[Any], evals: dict[str, ClassEvaluation],
                learn_seconds: float | None = None) -> dict[str, Any]:
    """One learning step: its experts (name, classes, threshold, calibration, training) and the results of every
    class learned so far. `train_seconds`: the step's wall time to learn (features, training, calibration)."""
    experts = [{"name": i.name, "task_id": i.task_id, "classes": list(i.classes), "threshold": i.threshold,
                "calibration": i.calibration, "confusability": getattr(i, "confusability", {}),
                "train_seconds": i.train.get("seconds"),
                "skipped_batches": i.train.get("skipped_batches")} for i in infos]
    return {"step": step, "task_name": "+".join(i.name for i in infos), "classes": step_classes(infos),
            "experts": experts, "train_seconds": learn_seconds,
            "skipped_batches": sum(e["skipped_batches"] or 0 for e in experts),
            "results": {c: e.metrics for c, e in evals.items()}}


def run_continual(model: MoleFlow, load_split: Callable[[str], ClassSplit], tasks: list[list[str]], run_dir: Path,
                  meta: dict[str, Any], progress: bool = True, batch_size: int = 32, examples_per_kind: int = 2,
                  num_workers: int = 0, rates: dict[str, float] | None = None,
                  discover: int | None = None, parallel: Parallel | None = None) -> dict[str, Any]:
    """Learn `tasks` one after another into `model`, evaluating all learned classes after each task.
    `rates` gives some products their own false-alarm rate (an expert of several classes takes the lowest).

    `parallel` (parallel.Parallel): learn every step up front, those after the first with their experts trained
    at the same time on Ray (`MoleFlow.fit_steps`), then evaluate each step among the tasks learned up to it.
    With the shared flow frozen this is the same matrix as learning and evaluating step by step.

    `discover` (the most products a step may hold): each step's training images are pooled without their
    class names and split into products by `discover.split_products`; for scoring, a class counts as routed
    correctly when it goes to the cluster holding most of its training images.

    Writes the checkpoint (after every task), results.json, the matrices and per-class score files into
    `run_dir` and returns the results dictionary.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    splits: dict[str, ClassSplit] = {}
    class_task: dict[str, int] = {}
    steps: list[dict[str, Any]] = []
    eval_seconds = 0.0
    learn_seconds: dict[int, float] = {}
    discovered: dict[int, dict[str, Any]] = {}
    learned = learned_steps(model)  # steps a resumed run has already learned: re-scored, not re-learned
    done = len(learned)
    if [sorted(step_classes(infos)) for infos in learned] != [sorted(c) for c in tasks[:done]]:
        raise MoleflowError(f"{run_dir}: the saved run learned {['+'.join(step_classes(i)) for i in learned]}, which "
                            f"is not the start of the requested sequence {['+'.join(c) for c in tasks]}; use "
                            "--overwrite or another --out")
    if done and not model.config.model.freeze_base:
        raise MoleflowError("--resume needs model.freeze_base=true (the earlier steps are re-scored from the saved "
                            "model, which is exact only when the shared flow is frozen)")
    source = {k: meta.get("dataset", {}).get(k) for k in ("root", "name")}  # where the products' images came from

    def step_images(classes: list[str]) -> dict[str, list]:
        return {c: [s.image for s in splits[c].train] for c in classes}

    if parallel is not None and done < len(tasks):
        if discover:
            raise MoleflowError("--parallel and --discover cannot be combined yet: discovery needs each step's "
                                "model before the next step's products are found")
        for c in [c for classes in tasks[done:] for c in classes]:
            splits[c] = load_split(c)
        log.info("learning steps %d-%d, experts after the first step %d at a time on Ray", done + 1, len(tasks),
                 parallel.workers)
        t0 = time.perf_counter()
        model.fit_steps([step_images(classes) for classes in tasks[done:]],
                        progress=progress, source=source, rates=rates, parallel=parallel)
        meta = {**meta, "parallel": {"workers": parallel.workers, "address": parallel.address,
                                     "cpus_per_expert": parallel.cpus_per_task,
                                     "gpus_per_expert": parallel.gpus_per_task, "steps_learned": len(tasks) - done,
                                     "learn_seconds": time.perf_counter() - t0}}
        model.save(run_dir)
        learned, done = learned_steps(model), len(tasks)
    for step, classes in enumerate(tasks):
        for c in classes:
            if c not in splits:
                splits[c] = load_split(c)
        last = step == len(tasks) - 1
        if step < done:
            infos = learned[step]
            log.info("step %d/%d: %s already learned; scoring", step + 1, len(tasks), "+".join(classes))
        else:
            log.info("step %d/%d: learning %s", step + 1, len(tasks), "+".join(classes))
            t0 = time.perf_counter()
            if discover:
                infos, found = learn_discovered(model, splits, classes, run_dir / "discover" / f"step{step}",
                                                discover, progress, source)
                discovered[step] = found
            else:
                infos = model.fit_step(step_images(classes), progress=progress, source=source, rates=rates)
            learn_seconds[step] = time.perf_counter() - t0
            model.save(run_dir)
        class_task.update({c: info.task_id for info in infos for c in info.classes})
        t0 = time.perf_counter()
        among = [t.task_id for t in model.tasks if t.step <= step]
        evals = evaluate_classes(model, splits, class_task, among=among, batch_size=batch_size,
                                 num_workers=num_workers, examples_per_kind=examples_per_kind if last else 0)
        eval_seconds += time.perf_counter() - t0
        steps.append(step_record(step, infos, evals, learn_seconds.get(step)))
        if step in discovered:
            steps[-1]["discovery"] = discovered[step]
        log.info("after step %d: %s", step + 1, summary_line(mean_metrics(steps[-1]["results"])))
    return finish_run(model, run_dir, splits, class_task, steps, evals, meta, eval_seconds, start,
                      batch_size, num_workers)


def reevaluate_run(model: MoleFlow, load_split: Callable[[str], ClassSplit], run_dir: Path, meta: dict[str, Any],
                   previous: dict[str, Any] | None, batch_size: int = 32, examples_per_kind: int = 2,
                   num_workers: int = 0) -> dict[str, Any]:
    """Re-score a saved run. With frozen shared weights the model after step j is exactly the final model
    restricted to the tasks learned up to j, so the whole matrix is recomputed; otherwise (sequential
    ablation) only the last step is, and earlier rows are kept from `previous`."""
    start = time.perf_counter()
    splits = {c: load_split(c) for t in model.tasks for c in t.classes}
    class_task = {c: t.task_id for t in model.tasks for c in t.classes}
    structural = model.config.model.freeze_base
    steps: list[dict[str, Any]] = []
    by_step = learned_steps(model)
    for j, infos in enumerate(by_step):
        last = j == len(by_step) - 1
        if not (structural or last):
            steps.append(previous["steps"][j] if previous and j < len(previous.get("steps", [])) else
                         {**step_record(j, infos, {}), "results": {}})
            continue
        among = [t.task_id for i in by_step[: j + 1] for t in i]
        learned = {c: t for c, t in class_task.items() if t in among}
        evals = evaluate_classes(model, splits, learned, among=among, batch_size=batch_size,
                                 examples_per_kind=examples_per_kind if last else 0, num_workers=num_workers)
        old = previous["steps"][j] if previous and j < len(previous.get("steps", [])) else {}
        steps.append(step_record(j, infos, evals, old.get("train_seconds")))
    return finish_run(model, run_dir, splits, class_task, steps, evals, meta, time.perf_counter() - start, start,
                      batch_size, num_workers)


def finish_run(model: MoleFlow, run_dir: Path, splits: dict[str, ClassSplit], class_task: dict[str, int],
               steps: list[dict[str, Any]], evals: dict[str, ClassEvaluation], meta: dict[str, Any],
               eval_seconds: float, start: float, batch_size: int, num_workers: int) -> dict[str, Any]:
    """Oracle pass, continual metrics, confusion matrix; write every output file of the run directory."""
    task_names = {t.task_id: t.name for t in model.tasks}
    for c, ev in evals.items():
        write_scores_csv(run_dir / "scores" / f"{c}.csv", ev, task_names)
        if ev.examples is not None:
            (run_dir / "examples").mkdir(exist_ok=True)
            np.savez_compressed(run_dir / "examples" / f"{c}.npz", **ev.examples)
    t0 = time.perf_counter()
    oracle = {c: e.metrics for c, e in evaluate_classes(model, splits, class_task, oracle=True, batch_size=batch_size,
                                                          num_workers=num_workers).items()}
    eval_seconds += time.perf_counter() - t0
    t0 = time.perf_counter()
    stress = routing_stress(model, splits, class_task)
    eval_seconds += time.perf_counter() - t0
    classes = list(class_task)
    first_step = {c: next(s["step"] for s in steps if c in s["classes"]) for c in classes}
    final = steps[-1]["results"]
    results = dict(meta)
    results.update({
        "metrics": list(METRICS),
        "steps": steps,
        "final": final,
        "final_mean": mean_metrics(final),
        "oracle": oracle,
        "oracle_mean": mean_metrics(oracle),
        "continual": continual_metrics(steps, classes, first_step),
        "routing_confusion": routing_confusion(evals, [t.task_id for t in model.tasks], [t.name for t in model.tasks]),
        "routing_stress": stress,
        "thresholds": threshold_summary(model, final),
        "timing": {"train_seconds": [s.get("train_seconds") for s in steps], "eval_seconds": eval_seconds,
                   "total_seconds": time.perf_counter() - start},
    })
    save_json(run_dir / "results.json", results)
    write_matrices(run_dir, steps, classes)
    write_final_csv(run_dir, final, results["final_mean"])
    return results


STRESS_IMAGES = 24  # good test images per class used for the pasted-defect routing test


def routing_stress(model: MoleFlow, splits: dict[str, ClassSplit], class_task: dict[str, int],
                   n_images: int = STRESS_IMAGES) -> dict[str, Any]:
    """Routing of each class's good test images with one pasted defect covering 2, 5, 10 and 20 % of the
    image (routing_stress.py); labels are not used beyond picking good images. Oracle runs: skipped."""
    if not model.config.router.enabled:
        return {}
    from .data.transforms import load_rgb
    from .routing_stress import AREAS, inspector_route, routing_under_defects

    products = {c: [load_rgb(x.image) for x in splits[c].test if x.label == 0][:n_images] for c in class_task}
    products = {c: v for c, v in products.items() if len(v) >= 2}
    table = routing_under_defects(inspector_route(model), products, class_task, AREAS, seed=model.config.train.seed)
    return {"areas": [f"{a:g}" for a in AREAS], "per_class": table}


def threshold_summary(model: MoleFlow, final: dict[str, dict]) -> dict[str, Any]:
    """Per product: requested / supported false-alarm rate, its 95 % interval, and the rate realised on the
    good test images of the classes it learned (every good test image, wherever it was routed)."""
    out = {}
    for info in model.tasks:
        cal = info.calibration
        realised = [(final[c].get("false_alarms"), final[c].get("n_test", 0) - final[c].get("n_anomalous", 0))
                    for c in info.classes if c in final]
        flagged, good = sum(f or 0 for f, _ in realised), sum(g for _, g in realised)
        out[info.name] = {"threshold": info.threshold, "rule": cal.get("rule"), "n": cal.get("n"),
                          "requested": cal.get("false_alarm_rate"), "supported": cal.get("supported_rate"),
                          "interval": cal.get("false_alarm_interval"), "warning": cal.get("warning", ""),
                          "realised": flagged / good if good else None, "good_test_images": good}
    return out


def refresh_decisions(run_dir: Path, model: MoleFlow) -> bool:
    """After a re-calibration: the decisions of a run's stored test scores under the model's current
    thresholds (scores/<class>.csv, results.json's per-class false-alarm figures and threshold table, the
    report), without scoring any image again. False when the run has no results yet."""
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        return False
    results = json.loads(results_path.read_text())
    thresholds = {t.task_id: t.threshold for t in model.tasks}
    for path in sorted((run_dir / "scores").glob("*.csv")):
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        for row in rows:
            task = int(row["routed_task"])
            row["anomalous"] = str(int(task in thresholds and float(row["score"]) > thresholds[task]))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else ["file"])
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, text.getvalue())
        final = results.get("final", {}).get(path.stem)
        if final is not None and rows:
            good = [r for r in rows if r["label"] == "0"]
            flags = [r["anomalous"] == "1" or r["known"] == "0" for r in good]
            final["false_alarms"] = int(sum(flags))
            final["false_alarm_rate_realised"] = float(np.mean(flags)) if good else None
    by_name = {t.name: t for t in model.tasks}
    for step in results.get("steps", []):
        info = by_name.get(step.get("task_name"))
        if info is not None:
            step["threshold"], step["calibration"] = info.threshold, info.calibration
    results["thresholds"] = threshold_summary(model, results.get("final", {}))
    save_json(results_path, results)
    if (run_dir / "report.html").is_file():
        from .report import write_report

        write_report(run_dir)
    return True


def summary_line(mean: dict[str, float | None]) -> str:
    return ", ".join(f"{k} {100 * v:.1f}" for k, v in mean.items() if v is not None)
