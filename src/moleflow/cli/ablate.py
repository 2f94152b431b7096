"""`moleflow ablate`: the full method and each named ablation on the same data, seeds and preset; one table.
Every (ablation, seed) is a trial (`moleflow.trials`): serially, or as Ray tasks with `--parallel N`."""

from __future__ import annotations

import argparse
import logging

from ..config import ABLATIONS, Config
from ..metrics import METRICS
from ..parallel import Parallel
from ..store import atomic_write_text, check_writable, run_lock
from ..store.run import dict_rows_csv_text, save_json
from ..trials import (Outcome, Trial, ablation_configurations, build_trials, configuration_rows, describe, run_trials,
                      write_trials_report)
from .common import add_data_options, apply_runtime, build_config, class_sequence, continual_request
from .sweep import add_trial_run_options, refuse_existing, trial_parallel

log = logging.getLogger(__name__)
DELTA_COLUMNS = ("image_auroc", "pixel_ap")  # the metrics whose change against `full` the table shows

EXAMPLES = f"""examples:
  moleflow ablate --data ../shared/datasets --classes magnetic_tile kolektor cubes --ablations no_lora no_dia --out runs/abl
  moleflow ablate --data /data/mvtec --dataset mvtec --preset main --backbone-weights wrn50.pth \\
      --ablations no_tail_loss no_whitening_adapter no_logdet_reg no_spatial_context --out runs/mvtec_abl
  # three seeds each (mean ± std), four runs at once on a local Ray; --resume after an interruption
  moleflow ablate --data ../shared/datasets --ablations no_lora no_dia --seeds 0 1 2 --parallel 4 --out runs/abl3
Every delta is against the "full" run of the same invocation (same preset, data, order and seeds).
ablations: {', '.join(ABLATIONS)}
"""


def add_parser(sub) -> None:
    p = sub.add_parser("ablate", help="compare the full method with named ablations", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_options(p)
    p.add_argument("--ablations", nargs="+", required=True, choices=sorted(ABLATIONS), metavar="NAME")
    p.add_argument("--seeds", type=int, nargs="+",
                   help="run every ablation once per seed, in --out/NAME/seed_<s> (default: train.seed, in --out/NAME)")
    add_trial_run_options(p)
    p.set_defaults(run=run)


def comparison_rows(outcomes: list[Outcome]) -> list[dict]:
    """One row per ablation: final means (over seeds), oracle image AUROC, and deltas (points) against
    `full`; with several seeds also the standard deviations (`std_<metric>`) and the seeds."""
    configs = configuration_rows(outcomes)
    base = next(c for c in configs if c["configuration"] == "full")["metrics"]
    rows = []
    for c in configs:
        name, several = c["configuration"], len(c["seeds"]) > 1
        row = {"run": name, "overrides": ABLATIONS.get(name, {})}
        if several:
            row["seeds"] = " ".join(map(str, c["seeds"]))
        for key in METRICS:
            stat = c["metrics"][key]
            value = stat["mean"] if stat else None
            row[key] = value
            if several:
                row[f"std_{key}"] = stat["std"] if stat else None
            row[f"delta_{key}"] = None if value is None or base.get(key) is None or name == "full" else \
                100 * (value - base[key]["mean"])
        row["oracle_image_auroc"] = c["oracle_image_auroc"]["mean"] if c["oracle_image_auroc"] else None
        row["train_seconds"] = c["train_seconds"]["mean"]
        rows.append(row)
    return rows


def comparison_markdown(rows: list[dict]) -> str:
    from ..report.render import fmt_pct, table_markdown

    headers = ["run"] + [m.header for m in METRICS.values()] + [f"Δ {METRICS[k].header}" for k in DELTA_COLUMNS]
    headers.append("train s")
    body = []
    for r in rows:
        delta = lambda k: "" if r[f"delta_{k}"] is None else f"{r[f'delta_{k}']:+.2f}"  # noqa: E731
        cell = lambda k: fmt_pct(r[k]) + ("" if r.get(f"std_{k}") is None else f" ± {100 * r[f'std_{k}']:.1f}")  # noqa: E731
        body.append([r["run"]] + [cell(k) for k in METRICS] + [delta(k) for k in DELTA_COLUMNS]
                    + [f"{r['train_seconds']:.0f}"])
    return table_markdown(headers, body, bold_rows=[0])


def run(args: argparse.Namespace) -> int:
    apply_runtime(args)
    parallel = trial_parallel(args)
    base = build_config(args)
    _, tasks = class_sequence(args)
    seeds = args.seeds or [base.train.seed]
    trials = build_trials(base, args.out, ablation_configurations(args.ablations), seeds)
    refuse_existing(trials, args)
    check_writable(args.out)
    with run_lock(args.out, args.wait, create=True):
        return _run(args, base, tasks, trials, seeds, parallel)


def _run(args: argparse.Namespace, base: Config, tasks: list[list[str]], trials: list[Trial], seeds: list[int],
         parallel: Parallel | None) -> int:
    """Run the trials, then write ablation.md/.json/.csv and the trials tables into --out."""
    outcomes = run_trials(trials, continual_request(args, base, tasks, args.out, report=args.reports), parallel)
    rows = comparison_rows(outcomes)
    table = comparison_markdown(rows)
    several = len(seeds) > 1
    seed_text = f"seeds {', '.join(map(str, seeds))} (mean ± std over seeds)" if several else f"seed {seeds[0]}"
    text = (f"# Ablations\n\nPreset `{base.preset}`, backbone `{base.backbone.name}`, {seed_text}, "
            f"data `{args.data}`, tasks {' → '.join('+'.join(t) for t in tasks)}.\n"
            "Mean over classes after the last task, router on (%). Δ in points against `full` of this same run; "
            "nothing was tuned on test data.\n\n" + table + "\n")
    atomic_write_text(args.out / "ablation.md", text)
    save_json(args.out / "ablation.json", {"rows": rows, "preset": base.preset, "tasks": tasks, "seeds": seeds})
    atomic_write_text(args.out / "ablation.csv", dict_rows_csv_text(rows, exclude=("overrides",)))
    write_trials_report(args.out, outcomes, describe(base, args.data, tasks, outcomes))
    print(table)
    reused = [o.trial.label for o in outcomes if o.status == "reused"]
    if reused:
        print(f"\nreused {len(reused)} finished runs: " + "; ".join(reused))
    print(f"\ntable: {args.out / 'ablation.md'} (every run: {args.out / 'trials.md'})")
    return 0
