"""`moleflow ablate`: the full method and each named ablation on the same data, seed and preset; one table."""

from __future__ import annotations

import argparse
import csv
import io
import logging
from pathlib import Path

from ..config import ABLATIONS
from ..data.datasets import DATASETS, default_classes
from ..errors import MoleflowError
from ..evaluation import METRICS, parse_scenario, save_json
from ..store import atomic_write_text, check_writable, run_lock
from ..store.run import refuse_existing_run
from .common import add_config_options, add_lock_option, add_runtime_options, apply_runtime, build_config

log = logging.getLogger(__name__)

EXAMPLES = f"""examples:
  moleflow ablate --data ../shared/datasets --classes magnetic_tile kolektor cubes --ablations no_lora no_dia --out runs/abl
  moleflow ablate --data /data/mvtec --dataset mvtec --preset main --backbone-weights wrn50.pth \\
      --ablations no_tail_loss no_whitening_adapter no_logdet_reg no_spatial_context --out runs/mvtec_abl
Every delta is against the "full" run of the same invocation (same preset, data, order and seed).
ablations: {', '.join(ABLATIONS)}
"""
LABELS = {"image_auroc": "I-AUROC", "image_ap": "I-AP", "image_f1_max": "I-F1", "pixel_auroc": "P-AUROC",
          "pixel_ap": "P-AP", "aupro": "AUPRO", "routing_accuracy": "routing"}


def add_parser(sub) -> None:
    p = sub.add_parser("ablate", help="compare the full method with named ablations", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--dataset", default="folder", choices=DATASETS)
    p.add_argument("--classes", nargs="+")
    p.add_argument("--scenario", default="1-1")
    p.add_argument("--ablations", nargs="+", required=True, choices=sorted(ABLATIONS), metavar="NAME")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--reports", action="store_true", help="also write a full report for every run")
    add_config_options(p)
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace runs already in --out")
    existing.add_argument("--resume", action="store_true", help="keep the tasks runs in --out have learned")
    add_runtime_options(p)
    add_lock_option(p)
    p.set_defaults(run=run)


def comparison_rows(results: dict[str, dict]) -> list[dict]:
    """One row per run: final means, oracle image AUROC, and deltas (points) against `full`."""
    base = results["full"]["final_mean"]
    rows = []
    for name, res in results.items():
        row = {"run": name, "overrides": ABLATIONS.get(name, {})}
        for key in METRICS:
            value = res["final_mean"].get(key)
            row[key] = value
            row[f"delta_{key}"] = None if value is None or base.get(key) is None or name == "full" else \
                100 * (value - base[key])
        row["oracle_image_auroc"] = res["oracle_mean"].get("image_auroc")
        row["train_seconds"] = sum(s or 0 for s in res["timing"]["train_seconds"])
        rows.append(row)
    return rows


def comparison_markdown(rows: list[dict]) -> str:
    from ..report.render import fmt_pct, table_markdown

    headers = ["run"] + [LABELS[k] for k in METRICS] + ["Δ I-AUROC", "Δ P-AP", "train s"]
    body = []
    for r in rows:
        delta = lambda k: "" if r[f"delta_{k}"] is None else f"{r[f'delta_{k}']:+.2f}"  # noqa: E731
        body.append([r["run"]] + [fmt_pct(r[k]) for k in METRICS] + [delta("image_auroc"), delta("pixel_ap"),
                                                                      f"{r['train_seconds']:.0f}"])
    return table_markdown(headers, body, bold_rows=[0])


def run(args: argparse.Namespace) -> int:
    apply_runtime(args)
    base = build_config(args)
    classes = args.classes or default_classes(args.dataset, args.data)
    tasks = parse_scenario(args.scenario, classes)
    if not classes:
        raise MoleflowError(f"{args.data}: no classes found")
    names = ["full"] + [a for a in args.ablations if a != "full"]
    if not (args.overwrite or args.resume):
        for name in names:
            refuse_existing_run(args.out / name)
    check_writable(args.out)
    with run_lock(args.out, args.wait, create=True):
        return _run(args, base, classes, tasks, names)


def _run(args: argparse.Namespace, base, classes: list[str], tasks: list[list[str]], names: list[str]) -> int:
    from .train import train_one

    results = {}
    for name in names:
        cfg = base.with_overrides(ABLATIONS.get(name, {}))
        log.info("ablation %s: %s", name, ABLATIONS.get(name, "the full method"))
        run_args = argparse.Namespace(**{**vars(args), "no_report": not args.reports})
        results[name] = train_one(run_args, cfg, args.out / name, classes, tasks)
    rows = comparison_rows(results)
    table = comparison_markdown(rows)
    text = (f"# Ablations\n\nPreset `{base.preset}`, backbone `{base.backbone.name}`, seed {base.train.seed}, "
            f"data `{args.data}`, tasks {' → '.join('+'.join(t) for t in tasks)}.\n"
            "Mean over classes after the last task, router on (%). Δ in points against `full` of this same run; "
            "nothing was tuned on test data.\n\n" + table + "\n")
    atomic_write_text(args.out / "ablation.md", text)
    save_json(args.out / "ablation.json", {"rows": rows, "preset": base.preset, "tasks": tasks})
    text_csv = io.StringIO()
    writer = csv.DictWriter(text_csv, fieldnames=[k for k in rows[0] if k != "overrides"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(args.out / "ablation.csv", text_csv.getvalue())
    print(table)
    print(f"\ntable: {args.out / 'ablation.md'}")
    return 0
