"""`moleflow evaluate`: re-score a saved run and write the same outputs again."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..continual import run_meta
from ..data.datasets import load_class
from ..detector import MoleFlow
from ..errors import MoleflowError
from ..evaluation import reevaluate_run
from ..store import run_lock
from .common import add_lock_option, add_runtime_options, apply_runtime
from .train import print_final_table

EXAMPLES = """examples:
  moleflow evaluate runs/real
  moleflow evaluate runs/mvtec --data /mnt/other/mvtec --backbone-weights wrn50.pth
"""


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="re-score a saved run", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Load the model of RUN_DIR, score every learned class again (task-agnostic, "
                                   "with the full per-step matrix) and rewrite results, CSVs and the report.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--data", type=Path, help="dataset root (default: the one the run was trained on)")
    p.add_argument("--backbone-weights", help="backbone weights file, if the run's is not found here")
    p.add_argument("--no-report", action="store_true")
    add_runtime_options(p)
    add_lock_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    apply_runtime(args)
    with run_lock(args.run_dir, args.wait):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    previous = None
    results_path = args.run_dir / "results.json"
    if results_path.is_file():
        previous = json.loads(results_path.read_text())
    model = MoleFlow.load(args.run_dir, device=args.device, backbone_weights=args.backbone_weights)
    dataset = (previous or {}).get("dataset", {})
    root = args.data or (Path(dataset["root"]) if dataset.get("root") else None)
    name = dataset.get("name", "folder")

    def load_split(class_name: str):
        """Each class from where its task learned it (add-task may use another root), unless --data is given."""
        source = next((t.source for t in model.tasks if class_name in t.classes), {})
        if args.data or not source.get("root"):
            if root is None:
                raise MoleflowError(f"{args.run_dir}: the run does not say where {class_name} is; pass --data ROOT")
            return load_class(root, class_name, name)
        return load_class(source["root"], class_name, source.get("name") or "folder")

    meta = run_meta(model.config, {"backbone": {"name": model.extractor.name,
                                                "weights_sha256": model.extractor.weights_sha256,
                                                "weights_source": model.extractor.weights_source},
                                   "dataset": {**dataset, "root": str(root) if root else None, "name": name}})
    results = reevaluate_run(model, load_split, args.run_dir, meta, previous,
                             batch_size=args.batch_size, num_workers=args.workers)
    if not args.no_report:
        from ..report import write_report

        write_report(args.run_dir)
    print_final_table(results)
    if not args.no_report:
        print(f"\nreport: {args.run_dir / 'report.html'}")
    return 0
