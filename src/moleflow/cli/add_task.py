"""`moleflow add-task`: learn new products into an existing run, proving nothing learned before changed."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from ..data.datasets import DATASETS, Sample, load_class, load_images, validate_samples, validate_split
from ..detector import MoleFlow
from ..errors import MoleflowError
from ..store import run_lock
from ..store.atomic import atomic_write_json
from .common import (add_lock_option, add_parallel_options, add_rate_option, add_runtime_options, apply_runtime,
                     describe_confusability, parallel_spec, parse_rates)

log = logging.getLogger(__name__)

EXAMPLES = """examples:
  moleflow add-task runs/real --data /data/new_line --classes bracket_v2
  moleflow add-task runs/real --data /data/mvtec --dataset mvtec --classes screw tile --one-task
  # five new products, their experts trained 5 at a time on a Ray cluster (bit-identical to one by one)
  moleflow add-task runs/real --data /data/new --classes a b c d e --parallel 5 --ray-address ray://head:10001
  # a folder of good parts of several new products, no names: find the products, one expert each
  moleflow add-task runs/real --discover --data /data/line4_good/ --name line4-
  moleflow rename-task runs/real line4-2 bracket_v2      # after looking at RUN/discover/<step>/line4-2.png
"""


def add_parser(sub) -> None:
    p = sub.add_parser("add-task", help="learn new products into an existing run", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Learn each new class as a new step (or all in one step with --one-task). "
                                   "Afterwards every earlier parameter and the earlier tasks' scores on a sample "
                                   "are checked to be bit-identical; the run is saved only if they are.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--data", type=Path, required=True, help="dataset root of the new classes")
    p.add_argument("--dataset", default="folder", choices=DATASETS)
    p.add_argument("--classes", nargs="+", help="the new classes (folders with train/good) to learn")
    p.add_argument("--discover", action="store_true",
                   help="--data is a folder of good images of one or more products, without names: cluster them "
                        "into products on the router's features (k-means; the number by silhouette), learn one expert "
                        "each in one step, and write a sheet of sample thumbnails per product to "
                        "RUN/discover/step<k>/ so a person can name them (`moleflow rename-task`)")
    p.add_argument("--max-products", type=int, default=10, help="with --discover: at most this many (default 10)")
    p.add_argument("--name", default="product-", help="with --discover: prefix of the found products' names "
                                                      "(default product-: product-1, product-2, ...)")
    p.add_argument("--one-task", action="store_true", help="learn all given classes in one step (each keeps its own expert unless model.experts=task)")
    p.add_argument("--backbone-weights", help="backbone weights file, if the run's is not found here")
    add_rate_option(p)
    add_runtime_options(p)
    add_parallel_options(p)
    add_lock_option(p)
    p.set_defaults(run=run)


def snapshot(model: MoleFlow, probe: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor]]:
    """Every tensor of the model (shared and experts, prototypes, memories, thresholds) and every learned
    task's oracle scores on `probe`."""
    state = {k: v.detach().clone() for k, v in model.inspector.model_state().items()}
    scores = {t.task_id: model.predict(probe, task_ids=[t.task_id] * len(probe)).scores for t in model.tasks}
    return state, scores


def verify_unchanged(model: MoleFlow, probe: torch.Tensor, state: dict[str, torch.Tensor],
                     scores: dict[int, torch.Tensor]) -> int:
    """Raise if any earlier tensor or score changed; return the number of tensors checked."""
    now = model.inspector.model_state()
    changed = [k for k, v in state.items() if k not in now or not torch.equal(now[k], v)]
    if changed:
        raise MoleflowError(f"learning the new task changed {len(changed)} earlier tensors (e.g. {changed[0]}); "
                            "the run was not saved")
    for task, before in scores.items():
        after = model.predict(probe, task_ids=[task] * len(probe)).scores
        if not torch.equal(before, after):
            raise MoleflowError(f"scores of task {task} changed; the run was not saved")
    return len(state)


def run(args: argparse.Namespace) -> int:
    apply_runtime(args)
    with run_lock(args.run_dir, args.wait):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    if args.discover == bool(args.classes):
        raise MoleflowError("give either --classes (named products) or --discover (a folder of unnamed good images)")
    model = MoleFlow.load(args.run_dir, device=args.device, backbone_weights=args.backbone_weights)
    model.loader_workers = args.workers
    if args.discover:
        return _discover(args, model)
    existing = {c for t in model.tasks for c in t.classes} | {t.name for t in model.tasks}
    clash = [c for c in args.classes if c in existing]
    if clash:
        raise MoleflowError(f"{', '.join(clash)} already learned in {args.run_dir}; remove it first or rename")
    splits = {c: load_class(args.data, c, args.dataset) for c in args.classes}
    for split in splits.values():  # every image and mask readable before any training
        validate_split(split)
    groups = [list(args.classes)] if args.one_task else [[c] for c in args.classes]
    default_rate, per_product = parse_rates(args.false_alarm_rate)
    learn_checked(args, model, splits[args.classes[0]].train,
                  [{c: [s.image for s in splits[c].train] for c in group} for group in groups],
                  {"root": str(args.data), "name": args.dataset}, default_rate, per_product)
    print(f"run `moleflow evaluate {args.run_dir}` to score all classes again")
    return 0


def learn_checked(args: argparse.Namespace, model: MoleFlow, probe_samples: list[Sample],
                  steps: list[dict[str, list]], source: dict[str, str], rate: float | None,
                  rates: dict[str, float] | None = None) -> None:
    """Learn `steps` (each: product name -> training images), prove on up to 8 of `probe_samples` that every
    earlier tensor and score is bit-identical, and only then save the run."""
    probe = load_images(probe_samples[:8], model.transform)
    state, scores = snapshot(model, probe)
    learned = model.fit_steps(steps, progress=not args.no_progress, source=source, false_alarm_rate=rate, rates=rates,
                              parallel=parallel_spec(args))
    for infos in learned:
        for info in infos:
            print(f"learned {info.name}: {info.n_train} training images, threshold {info.threshold:.3f} "
                  f"({info.train['seconds']:.0f} s)")
            if info.confusability:
                print("  routing: " + describe_confusability(info.name, info.confusability))
    checked = verify_unchanged(model, probe, state, scores)
    path = model.save(args.run_dir)
    print(f"check passed: {checked} earlier tensors and the scores of {len(scores)} earlier tasks on "
          f"{len(probe)} sample images are bit-identical; saved {path}")


def _discover(args: argparse.Namespace, model: MoleFlow) -> int:
    """Find the products in a folder of unnamed good images and learn one expert each, in one step."""
    from ..data.datasets import images_under
    from ..discover import split_products

    default_rate, per_product = parse_rates(args.false_alarm_rate)
    if per_product:
        raise MoleflowError("--discover: products found have no names yet; give one --false-alarm-rate for all")
    files = images_under(args.data)
    samples = [Sample(f, 0, None, "discover", "good", "train") for f in files]
    validate_samples(samples)
    out_dir = args.run_dir / "discover" / f"step{model.next_step}"
    groups, _, summary = split_products(model, files, out_dir, prefix=args.name, max_products=args.max_products,
                                        seed=model.config.train.seed)
    clash = [name for name in groups if any(t.name == name for t in model.tasks)]
    if clash:
        raise MoleflowError(f"{', '.join(clash)} already learned in {args.run_dir}; choose another --name prefix")
    print(f"found {len(groups)} product(s) in {len(files)} images ({summary['method']}):")
    for cluster in summary["clusters"]:
        print(f"  {cluster['name']}: {cluster['n']} images, samples in {cluster['sheet']}")
    learn_checked(args, model, samples, [groups], {"root": str(args.data), "name": "discover"}, default_rate)
    atomic_write_json(out_dir / "clusters.json", summary)
    print(f"rename products with `moleflow rename-task {args.run_dir} OLD NEW`")
    return 0
