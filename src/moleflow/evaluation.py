"""The continual evaluation protocol (spec §7) and the files of a run directory (the learning loop that calls
it is `moleflow.continual`).

After every task, every class learned so far is evaluated with the router (task-agnostic: routing
errors count). The full matrix R[step][class] is kept for every metric; after the last task an
oracle pass (true task ids) measures what routing costs. Nothing is tuned or normalised on test data:
the only thresholds (decision, unknown product) come from held-out normal training images.

Run directory::

    config.yaml  model/ (manifest + shards)  results.json  final.csv  matrix_<metric>.csv
    scores/<class>.csv     one row per test image (score, routed task, decision)
    examples/<class>.npz   a few images with maps for the report (best and worst cases)

Every file is written through `moleflow.store` (atomic writes).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from .data.datasets import ClassSplit, ImageDataset, MaskDataset
from .detector import MoleFlow
from .eval_cache import CachedBackend, CachedBatch, EvaluationCache
from .metrics import METRICS, auroc, backward_transfer, forgetting_measure, image_metrics, mean_metrics, pixel_metrics
from .pipeline import TorchBackend
from .store.run import SCORE_COLUMNS, read_csv_rows, save_json, write_csv, write_npz

log = logging.getLogger(__name__)

UNKNOWN = "unknown"


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


def test_batches(model: MoleFlow, split: ClassSplit, batch_size: int, num_workers: int,
                 cache: EvaluationCache | None) -> Iterator[CachedBatch]:
    """A class's test images, prepared, `batch_size` at a time with their masks: from `cache` when it kept the
    class whole, else loaded (and offered to `cache`: a batch keeps its features when the backend admits them)."""
    kept = cache.batches(split.class_name) if cache is not None else None
    if kept is not None:
        yield from kept
        return
    # with tiling the model cuts each image file itself and the loader reads only the masks; otherwise the
    # loader's square tensors are used
    tiled = model.config.data.tiling != "none"
    dataset = MaskDataset(split.test, model.transform) if tiled else ImageDataset(split.test, model.transform)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    with_features: list[CachedBatch] = []  # the batches the cache admitted (none without a cache)
    whole = True
    for batch in loader:
        images = [split.test[int(i)].image for i in batch["index"]] if tiled else batch["image"]
        item = CachedBatch(model.prepare(images), batch["mask"].numpy())
        yield item
        if item.tokens is not None:
            with_features.append(item)
        else:
            whole = False  # a batch over the budget: the class is not kept (nor its pixels held)
    if cache is not None:
        cache.keep(split.class_name, with_features, whole)


@torch.no_grad()
def evaluate_class(model: MoleFlow, split: ClassSplit, true_task: int, oracle: bool = False, batch_size: int = 32,
                   examples_per_kind: int = 0, num_workers: int = 0, among: list[int] | None = None,
                   cache: EvaluationCache | None = None) -> ClassEvaluation:
    """Score a class's test split (routed among `among`, or with the true task when `oracle` or when the
    router is off, the `no_router` ablation); its metrics. `cache` (`eval_cache`) keeps the test images'
    features and expert scores for the run's later evaluations."""
    oracle = oracle or not model.config.router.enabled
    scores, routed, known, anomalous, maps, masks, ambiguous, plausible = [], [], [], [], [], [], [], []
    torch_backend = TorchBackend(model.inspector, batch_size)
    for batch in test_batches(model, split, batch_size, num_workers, cache):
        ids = torch.full((batch.prep.n_images,), true_task, dtype=torch.long) if oracle else None
        backend = torch_backend if cache is None else CachedBackend(torch_backend, batch, cache)
        pred = model.inspect_prepared(batch.prep, backend, ids, among)
        masks.append(batch.masks)
        scores.append(pred.scores.numpy())
        routed.append(pred.task_ids.numpy())
        known.append(pred.known.numpy())
        anomalous.append(pred.anomalous.numpy())
        ambiguous.append(pred.ambiguous.numpy())
        plausible += [true_task == t or true_task in alt for t, alt in zip(pred.task_ids.tolist(), pred.alternatives)]
        maps.append(pred.maps.numpy().astype(np.float32))
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
    # what "which product" is worth to the line: the product a verdict names without doubt is right this often,
    # and the own product is among the products a verdict names (ambiguous ones list the others) this often
    sure = ~np.concatenate(ambiguous)
    metrics["routing_accuracy_unambiguous"] = float(np.mean(r[sure] == true_task)) if sure.any() else None
    covered = np.array(plausible, dtype=bool)
    for name, part in (("good", labels == 0), ("defective", labels == 1)):
        metrics[f"routing_coverage_{name}"] = float(covered[part].mean()) if part.any() else None
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
    """scores/<class>.csv: one row per test image (`SCORE_COLUMNS`); task_names: {task id: name}."""
    write_csv(path, SCORE_COLUMNS, ([ev.files[i], ev.defect_types[i], int(ev.labels[i]), repr(float(ev.scores[i])),
                                     int(ev.routed[i]), task_names.get(int(ev.routed[i]), "?"), int(ev.known[i]),
                                     int(ev.anomalous[i])] for i in range(len(ev.labels))))


def csv_cell(value: float | None) -> str:
    """A metric in a CSV file: 6 decimals, empty when not available."""
    return "" if value is None else f"{value:.6f}"


def write_matrices(run_dir: Path, steps: list[dict[str, Any]], classes: list[str]) -> None:
    """matrix_<metric>.csv: rows = learning steps (task just learned), columns = classes."""
    for key in METRICS:
        rows = [[step["step"], step["task_name"]] + [csv_cell(step["results"].get(c, {}).get(key)) for c in classes]
                for step in steps]
        write_csv(run_dir / f"matrix_{key}.csv", ["step", "task"] + classes, rows)


def write_final_csv(run_dir: Path, final: dict[str, dict], mean: dict[str, float | None]) -> None:
    """final.csv: one row per class and a last row "mean", one column per metric."""
    rows = [[name] + [csv_cell(vals.get(k)) for k in METRICS] for name, vals in list(final.items()) + [("mean", mean)]]
    write_csv(run_dir / "final.csv", ["class"] + list(METRICS), rows)


def routing_confusion(evals: dict[str, ClassEvaluation], task_ids: list[int], task_names: list[str]) -> dict:
    """Rows: true class; columns: routed task, plus a last column for images flagged as unknown product."""
    matrix = []
    for ev in evals.values():
        row = [int(np.sum((ev.routed == t) & ev.known)) for t in task_ids]
        row.append(int(np.sum(~ev.known)))
        matrix.append(row)
    return {"classes": list(evals), "tasks": list(task_names) + [UNKNOWN], "matrix": matrix}


def evaluate_classes(model: MoleFlow, splits: dict[str, ClassSplit], class_task: dict[str, int],
                     among: list[int] | None = None, oracle: bool = False, batch_size: int = 32,
                     examples_per_kind: int = 0, num_workers: int = 0, cache: EvaluationCache | None = None
                     ) -> dict[str, ClassEvaluation]:
    """Evaluate each class in `class_task` (class -> true task id), routed among `among` (default all)."""
    return {c: evaluate_class(model, splits[c], t, oracle=oracle, batch_size=batch_size, among=among,
                              examples_per_kind=examples_per_kind, num_workers=num_workers, cache=cache)
            for c, t in class_task.items()}


def evaluation_cache(model: MoleFlow) -> EvaluationCache | None:
    """A cache for the evaluations of one run (`eval_cache`): only while experts stay as learned (frozen shared
    flow), within `train.cache_memory_gb`."""
    if not model.config.model.freeze_base:
        return None
    return EvaluationCache(int(model.config.train.cache_memory_gb * 2**30))


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
    cache = evaluation_cache(model)
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
                                 examples_per_kind=examples_per_kind if last else 0, num_workers=num_workers,
                                 cache=cache)
        old = previous["steps"][j] if previous and j < len(previous.get("steps", [])) else {}
        steps.append(step_record(j, infos, evals, old.get("train_seconds")))
    return finish_run(model, run_dir, splits, class_task, steps, evals, meta, time.perf_counter() - start, start,
                      batch_size, num_workers, cache)


def finish_run(model: MoleFlow, run_dir: Path, splits: dict[str, ClassSplit], class_task: dict[str, int],
               steps: list[dict[str, Any]], evals: dict[str, ClassEvaluation], meta: dict[str, Any],
               eval_seconds: float, start: float, batch_size: int, num_workers: int,
               cache: EvaluationCache | None = None) -> dict[str, Any]:
    """Oracle pass (reusing `cache`), continual metrics, confusion matrix; write every output file of the run
    directory."""
    task_names = {t.task_id: t.name for t in model.tasks}
    for c, ev in evals.items():
        write_scores_csv(run_dir / "scores" / f"{c}.csv", ev, task_names)
        if ev.examples is not None:
            write_npz(run_dir / "examples" / f"{c}.npz", ev.examples)
    t0 = time.perf_counter()
    oracle = {c: e.metrics for c, e in evaluate_classes(model, splits, class_task, oracle=True, batch_size=batch_size,
                                                          num_workers=num_workers, cache=cache).items()}
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
                   "total_seconds": time.perf_counter() - start,
                   "evaluation_cache": None if cache is None else {
                       "tiles_scored": cache.misses, "tiles_reused": cache.hits, "kept_bytes": cache.used_bytes}},
    })
    save_json(run_dir / "results.json", results)
    write_matrices(run_dir, steps, classes)
    write_final_csv(run_dir, final, results["final_mean"])
    return results


STRESS_IMAGES = 24  # good test images per class used for the pasted-defect routing test


def routing_stress(model: MoleFlow, splits: dict[str, ClassSplit], class_task: dict[str, int],
                   n_images: int = STRESS_IMAGES) -> dict[str, Any]:
    """Routing of each class's good test images with one pasted defect covering 2, 5, 10 and 20 % of the
    image (routing_stress.py); labels are not used beyond picking good images. Skipped (empty) in oracle runs and
    with one product (its router has no choice to get wrong)."""
    if not model.config.router.enabled or len(model.tasks) < 2:
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
        rows = read_csv_rows(path)
        for row in rows:
            task = int(row["routed_task"])
            row["anomalous"] = str(int(task in thresholds and float(row["score"]) > thresholds[task]))
        write_csv(path, list(rows[0]) if rows else ["file"], (list(row.values()) for row in rows))
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
