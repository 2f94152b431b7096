"""Trials: one full continual run per configuration (sweep point or named ablation) and seed, each in its
own run folder, run one after another or as Ray tasks; a combined table with mean ± std over seeds.

    axes = parse_sweep(["model.lora_rank=8,16", "train.epochs=2,4"], base)   # cartesian product: 4 points
    trials = build_trials(base, Path("runs/sw"), sweep_configurations(axes), seeds=[0, 1, 2])
    request = ContinualRequest(base, DataSource(Path("data")), tasks, Path("runs/sw"), existing="resume")
    outcomes = run_trials(trials, request, Parallel(2))                      # None: serially, in this process
    write_trials_report(Path("runs/sw"), outcomes, header)

A trial is `request` with the trial's configuration and run folder: exactly what `moleflow train` runs for
one seed (`continual.run_continual`), so a trial is the same run whether it ran serially, on a local Ray or
on a cluster (given the same number of torch threads: a Ray task sets them to its CPUs, `--cpus-per-trial`).
When the request resumes (`--resume`), a trial whose folder already holds a finished `results.json` of the
same configuration, tasks and data is not run again (status `reused`); an interrupted one continues from the
tasks it had learned.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import ABLATIONS, Config
from .continual import ContinualRequest, DataSource, run_continual
from .errors import MoleflowError
from .metrics import METRICS
from .parallel import Parallel, ray_session, run_remote
from .store.atomic import atomic_write_text
from .store.run import dict_rows_csv_text, save_json

log = logging.getLogger(__name__)

BASE_NAME = "base"
REUSED, RAN = "reused", "ran"


@dataclass(frozen=True)
class SweepAxis:
    """One `--sweep KEY=V1,V2,...`: a config key and its values as typed (parsed like `--set`)."""

    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Configuration:
    """A point of the sweep or a named ablation: its name, config overrides and folder under --out
    ("" = --out itself)."""

    name: str
    overrides: dict[str, Any]
    folder: str


@dataclass(frozen=True)
class Trial:
    """One full continual run: a configuration with one seed, in its own run folder."""

    configuration: Configuration
    seed: int
    run_dir: Path
    config: Config

    @property
    def label(self) -> str:
        return f"trial {self.configuration.name} seed {self.seed} ({self.run_dir})"

    def request(self, base: ContinualRequest) -> ContinualRequest:
        """`base` (data, tasks, options) with this trial's configuration and run folder."""
        return dataclasses.replace(base, config=self.config, run_dir=self.run_dir)


@dataclass
class Outcome:
    """A trial and its results (`results.json` of its run); `status`: ran or reused."""

    trial: Trial
    results: dict[str, Any]
    status: str


# ---------------------------------------------------------------------------------------------- building


def split_values(text: str) -> list[str]:
    """'8,16,[1,2]' -> ['8', '16', '[1,2]']: commas inside brackets or braces belong to the value."""
    values, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += ch
    values.append(current.strip())
    return values


def parse_sweep(items: list[str], base: Config) -> list[SweepAxis]:
    """`--sweep KEY=V1,V2,...` options -> axes; every key and value is checked against `base` now, so a
    typo stops the command before any trial runs."""
    axes: list[SweepAxis] = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise MoleflowError(f"--sweep {item!r} must look like section.key=V1,V2,..., "
                                "e.g. --sweep model.lora_rank=8,16,32")
        if key == "train.seed":
            raise MoleflowError("--sweep train.seed: give the seeds with --seeds 0 1 2 instead")
        if any(a.key == key for a in axes):
            raise MoleflowError(f"--sweep {key} is given twice; put all its values in one option")
        values = split_values(text)
        if "" in values:
            raise MoleflowError(f"--sweep {item!r}: an empty value; separate values with single commas")
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise MoleflowError(f"--sweep {key}: the value {repeated[0]!r} is given twice")
        for value in values:
            try:
                base.with_overrides({key: value})
            except MoleflowError as exc:
                raise MoleflowError(f"--sweep {key}={value}: {exc}") from None
        axes.append(SweepAxis(key, tuple(values)))
    return axes


def folder_name(name: str) -> str:
    """A configuration's name as a folder name (characters other than letters, digits and .,=+- become _)."""
    return re.sub(r"[^A-Za-z0-9.,=+\-]", "_", name)


def sweep_configurations(axes: list[SweepAxis]) -> list[Configuration]:
    """The cartesian product of the axes, in the order given; no axes: the base configuration alone."""
    if not axes:
        return [Configuration(BASE_NAME, {}, "")]
    configurations = []
    for values in itertools.product(*(a.values for a in axes)):
        overrides = {a.key: v for a, v in zip(axes, values)}
        name = ",".join(f"{k}={v}" for k, v in overrides.items())
        configurations.append(Configuration(name, overrides, folder_name(name)))
    return configurations


def ablation_configurations(names: list[str]) -> list[Configuration]:
    """`full` (the base configuration) and each named ablation (`config.ABLATIONS`), each in --out/NAME."""
    unknown = [n for n in names if n != "full" and n not in ABLATIONS]
    if unknown:
        raise MoleflowError(f"unknown ablation {unknown[0]!r}; choose from {', '.join(sorted(ABLATIONS))}")
    ordered = ["full"] + [n for n in dict.fromkeys(names) if n != "full"]
    return [Configuration(n, dict(ABLATIONS.get(n, {})), n) for n in ordered]


def build_trials(base: Config, out: Path, configurations: list[Configuration], seeds: list[int]) -> list[Trial]:
    """One trial per configuration and seed: folder `out/<configuration>/seed_<s>` (no `seed_<s>` level
    with a single seed); every configuration is built and checked here."""
    if not seeds:
        raise MoleflowError("--seeds: give at least one seed")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise MoleflowError(f"--seeds gives seed {repeated[0]} twice")
    folders = [c.folder for c in configurations]
    clash = sorted({f for f in folders if folders.count(f) > 1})
    if clash:
        raise MoleflowError(f"two configurations would share the folder {out / clash[0]}; change the values")
    trials = []
    for configuration in configurations:
        try:
            cfg = base.with_overrides(configuration.overrides)
        except MoleflowError as exc:
            raise MoleflowError(f"{configuration.name}: {exc}") from None
        for seed in seeds:
            run_dir = out / configuration.folder if configuration.folder else out
            if len(seeds) > 1:
                run_dir = run_dir / f"seed_{seed}"
            trials.append(Trial(configuration, seed, run_dir, cfg.with_overrides({"train.seed": seed})))
    return trials


# ---------------------------------------------------------------------------------------------- running


def finished_results(request: ContinualRequest) -> dict[str, Any] | None:
    """The `results.json` in the request's run folder when it holds a finished run of this request (same
    configuration, tasks and data), else None."""
    path = request.run_dir / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(results, dict) or "final_mean" not in results:
        return None
    recorded = results.get("dataset") or {}
    same_data = (recorded.get("name") == request.data.layout and recorded.get("tasks") == request.tasks
                 and recorded.get("root") is not None
                 and Path(recorded["root"]).resolve() == Path(request.data.root).resolve())
    if not same_data or results.get("config") != json.loads(json.dumps(request.config.to_dict())):
        return None
    return results


def run_trial(request: ContinualRequest, threads: int | None = None) -> dict[str, Any]:
    """One trial's run with `threads` torch threads (a module-level function: it is also the Ray task)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    return run_continual(request)


def reuse_finished(trial: Trial, request: ContinualRequest) -> Outcome | None:
    """The trial's outcome from its finished results when `request` resumes and they are there (its report
    written if asked for and missing), else None."""
    done = finished_results(request) if request.existing == "resume" else None
    if done is None:
        return None
    log.info("%s: finished before, reusing %s", trial.label, trial.run_dir / "results.json")
    if request.report and not (trial.run_dir / "report.html").exists():
        from .report import write_report

        write_report(trial.run_dir)
    return Outcome(trial, done, REUSED)


def run_on_ray(requests: list[ContinualRequest], labels: list[str], parallel: Parallel) -> list[dict[str, Any]]:
    """The requests as Ray tasks, at most `parallel.workers` at once; their results in order. Workers may start
    elsewhere (another folder, another node): absolute paths, no progress bars."""
    calls = [(dataclasses.replace(r, data=DataSource(Path(r.data.root).resolve(), r.data.layout),
                                  run_dir=r.run_dir.resolve(), progress=False), parallel.cpus_per_task)
             for r in requests]
    with ray_session(parallel) as ray:
        return run_remote(ray, run_trial, calls, parallel, labels)


def run_trials(trials: list[Trial], request: ContinualRequest, parallel: Parallel | None = None,
               on_done: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Run the trials, each as `trial.request(request)`, in order: serially in this process, or as Ray tasks
    (`parallel`). When `request` resumes, a trial whose folder holds its finished results is reused, not run.
    `on_done(outcome)`: called for each trial in order, as soon as it and those before it are done."""
    outcomes: list[Outcome | None] = [reuse_finished(t, t.request(request)) for t in trials]
    todo = [i for i, o in enumerate(outcomes) if o is None]
    reported = 0

    def report() -> None:
        nonlocal reported
        while reported < len(outcomes) and outcomes[reported] is not None:
            if on_done is not None:
                on_done(outcomes[reported])
            reported += 1

    if parallel is None:
        for i in todo:
            log.info("%s: running", trials[i].label)
            report()
            outcomes[i] = Outcome(trials[i], run_trial(trials[i].request(request)), RAN)
    elif todo:
        log.info("%d trials on Ray, at most %d at once (%d reused)", len(todo), parallel.workers,
                 len(trials) - len(todo))
        results = run_on_ray([trials[i].request(request) for i in todo], [trials[i].label for i in todo], parallel)
        for i, res in zip(todo, results):
            outcomes[i] = Outcome(trials[i], res, RAN)
    report()
    return [o for o in outcomes if o is not None]


# ---------------------------------------------------------------------------------------------- combining


def mean_std(values: list[float]) -> dict[str, Any] | None:
    """Mean, sample standard deviation (ddof=1; 0 for a single value) and the values; None without values."""
    if not values:
        return None
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "values": values}


def seed_statistics(results: list[dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
    """Per metric of `metrics.METRICS`: mean ± std over runs of the final mean over classes."""
    return {key: mean_std([r["final_mean"][key] for r in results if r["final_mean"].get(key) is not None])
            for key in METRICS}


def train_seconds(results: dict[str, Any]) -> float:
    return float(sum(s or 0 for s in results.get("timing", {}).get("train_seconds", [])))


def trial_rows(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    """One row per trial: configuration, seed, status, folder, final means, oracle I-AUROC, train seconds."""
    rows = []
    for o in outcomes:
        row = {"configuration": o.trial.configuration.name, "seed": o.trial.seed, "status": o.status,
               "run_dir": str(o.trial.run_dir)}
        row.update({k: o.results["final_mean"].get(k) for k in METRICS})
        row["oracle_image_auroc"] = o.results.get("oracle_mean", {}).get("image_auroc")
        row["train_seconds"] = train_seconds(o.results)
        rows.append(row)
    return rows


def configuration_rows(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    """One row per configuration, in trial order: its overrides, seeds, folders and mean ± std per metric."""
    groups: dict[str, list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault(o.trial.configuration.name, []).append(o)
    rows = []
    for name, group in groups.items():
        results = [o.results for o in group]
        rows.append({"configuration": name, "overrides": group[0].trial.configuration.overrides,
                     "seeds": [o.trial.seed for o in group], "runs": [str(o.trial.run_dir) for o in group],
                     "metrics": seed_statistics(results),
                     "oracle_image_auroc": mean_std([r["oracle_mean"]["image_auroc"] for r in results
                                                     if r.get("oracle_mean", {}).get("image_auroc") is not None]),
                     "train_seconds": mean_std([train_seconds(r) for r in results])})
    return rows


def fmt_stat(stat: dict[str, Any] | None, n: int) -> str:
    """"87.5 ± 2.1" (%), or the mean alone for one seed; "n/a" without values."""
    if stat is None:
        return "n/a"
    return f"{100 * stat['mean']:.1f}" + (f" ± {100 * stat['std']:.1f}" if n > 1 else "")


def trials_markdown(outcomes: list[Outcome]) -> str:
    """The configurations table (mean ± std over seeds) and the table of every trial."""
    from .report.render import fmt_pct, table_markdown

    configs = configuration_rows(outcomes)
    headers = ["configuration", "seeds"] + [m.header for m in METRICS.values()]
    body = [[c["configuration"], len(c["seeds"])] + [fmt_stat(c["metrics"][k], len(c["seeds"])) for k in METRICS]
            for c in configs]
    per_trial = [[r["configuration"], r["seed"], r["status"]] + [fmt_pct(r[k]) for k in METRICS]
                 + [f"{r['train_seconds']:.0f}", r["run_dir"]] for r in trial_rows(outcomes)]
    return (table_markdown(headers, body) + "\n\nEvery trial:\n\n"
            + table_markdown(["configuration", "seed", "status"] + [m.header for m in METRICS.values()]
                             + ["train s", "run"], per_trial, align="lrl" + "r" * (len(METRICS) + 1) + "l"))


def write_trials_report(out: Path, outcomes: list[Outcome], header: str) -> str:
    """Write `trials.json`, `trials.md`, `trials.csv` (one row per trial) and `trials_summary.csv` (one row
    per configuration: mean and std per metric) into `out`; return the markdown tables."""
    configs = configuration_rows(outcomes)
    rows = trial_rows(outcomes)
    save_json(out / "trials.json", {"metrics": list(METRICS), "configurations": configs, "trials": rows,
                                    "ran": sum(o.status == RAN for o in outcomes),
                                    "reused": sum(o.status == REUSED for o in outcomes)})
    tables = trials_markdown(outcomes)
    atomic_write_text(out / "trials.md", f"# Trials\n\n{header}\n\n{tables}\n")
    atomic_write_text(out / "trials.csv", dict_rows_csv_text(rows))
    flat = [{"configuration": c["configuration"], "seeds": " ".join(map(str, c["seeds"])),
             **{f"{k}_{part}": (c["metrics"][k] or {}).get(part) for k in METRICS for part in ("mean", "std")}}
            for c in configs]
    atomic_write_text(out / "trials_summary.csv", dict_rows_csv_text(flat))
    return tables


def describe(base: Config, data: Path, tasks: list[list[str]], outcomes: list[Outcome]) -> str:
    """The paragraph above the tables: what was run, and how the numbers are made."""
    ran = sum(o.status == RAN for o in outcomes)
    return (f"Preset `{base.preset}`, backbone `{base.backbone.name}`, data `{data}`, tasks "
            f"{' → '.join('+'.join(t) for t in tasks)}; {len(outcomes)} trials ({ran} ran, "
            f"{len(outcomes) - ran} reused from earlier runs).\n"
            "Mean over classes after the last task, router on (%); mean ± sample standard deviation (ddof=1) "
            "over seeds.")
