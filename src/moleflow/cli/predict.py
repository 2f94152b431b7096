"""`moleflow predict`: route, score and decide for new images; write overlays and a summary."""

from __future__ import annotations

import argparse
import csv
import glob
import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.datasets import IMAGE_EXTENSIONS
from ..data.transforms import load_rgb
from ..store.atomic import atomic_write_bytes, atomic_write_json, check_writable
from ..decisions import UNKNOWN, UNREADABLE, image_verdict, unreadable_verdict  # noqa: F401
from ..detector import MoleFlow
from ..errors import MoleflowError
from ..heatmap import overlay_tile, product_norm
from .common import add_runtime_options, apply_runtime, format_table

log = logging.getLogger(__name__)

EXAMPLES = """examples:
  moleflow predict runs/real new_images/ --out predictions
  moleflow predict runs/real 'line3/*.jpg' part_17.png --out predictions --csv-only
  moleflow predict runs/real line3/ --out predictions --record        # also into runs/real/verdicts.sqlite
  moleflow predict runs/real line3/ --out p --record --store postgresql://qa@db/line   # a shared database
The decision threshold of each product was calibrated at training time on held-out normal training
images (score.false_alarm_rate); images whose routing feature is far from every learned product are
reported as "unknown product". An image that cannot be read gets a row with decision "unreadable" and the
reason; the exit code is then 3 (2: an error stopped the command; 0: every image was inspected), unless
--allow-unreadable is given.
"""
EXIT_UNREADABLE = 3
CSV_FIELDS = ["file", "product", "nearest_product", "score", "threshold", "threshold_source", "decision",
              "router_distance", "route_ambiguous", "plausible_products", "overlay", "reason"]


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="score new images: product, score, decision, heat map", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a run directory (or its model folder)")
    p.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--task", help="skip the router: treat every image as this product (task name)")
    p.add_argument("--csv-only", action="store_true", help="no overlay images")
    p.add_argument("--allow-unreadable", action="store_true",
                   help="exit 0 even if some images could not be read (they still get an 'unreadable' row)")
    p.add_argument("--backbone-weights", help="backbone weights file, if the run's is not found here")
    p.add_argument("--engine", default="torch", choices=["torch", "onnx"],
                   help="torch: the PyTorch inspector (default); onnx: backbone and experts in onnxruntime, "
                        "same answers up to float rounding, faster on the CPU")
    p.add_argument("--engine-cache", type=Path,
                   help="folder for the onnx engine's graphs (default RUN_DIR/export/engine; reused next time)")
    g = p.add_argument_group("verdict store (README 'On the line')")
    g.add_argument("--record", action="store_true",
                   help="also record every verdict (image hash, product, score, decision, model) in the verdict "
                        "store, source 'predict'")
    g.add_argument("--store", metavar="URL|FILE",
                   help="where --record writes: a SQLAlchemy URL (postgresql://...) or a SQLite file (default "
                        "RUN_DIR/verdicts.sqlite); implies --record")
    add_runtime_options(p)
    p.set_defaults(run=run)


def expand_inputs(items: list[str]) -> list[Path]:
    """Files, folders (searched recursively for images) and glob patterns -> sorted unique image paths."""
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            found.append(path)
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matches:
                raise MoleflowError(f"{item}: no such file, folder or matching images")
            found += [m for m in matches if m.is_file()]
    unique = list(dict.fromkeys(found))
    if not unique:
        raise MoleflowError("no images found in the given inputs")
    return unique


def open_store(args: argparse.Namespace):
    """The verdict store that `--record` / `--store` ask for (opened and migrated), or None."""
    if not (getattr(args, "record", False) or getattr(args, "store", None)):
        return None
    from ..store.verdicts import VerdictStore

    store = VerdictStore.open(args.store, run_dir=args.run_dir)
    log.info("recording verdicts in %s", store.name)
    return store


def run(args: argparse.Namespace) -> int:
    apply_runtime(args)
    check_writable(args.out)
    store = open_store(args)
    model = MoleFlow.load(args.run_dir, device=args.device, backbone_weights=args.backbone_weights)
    paths = expand_inputs(args.images)
    engine = build_engine(model, args)
    task_ids = None
    if args.task:
        task_ids = model.task_by_name(args.task).task_id
    names = {t.task_id: t for t in model.tasks}
    recorder = Recorder(store, args.run_dir, args.engine, "predict") if store is not None else None
    rows, failed = [], []
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(paths), args.batch_size), desc="predict", unit="batch",
                      disable=args.no_progress):
        batch_paths, pil = [], []
        for path in paths[start:start + args.batch_size]:
            try:
                pil.append(load_rgb(path))
                batch_paths.append(path)
            except MoleflowError as exc:
                log.warning("%s", exc)
                failed.append({"file": str(path), "error": str(exc)})
                verdict = unreadable_verdict(str(exc))
                rows.append({**{k: verdict.get(k, "") for k in CSV_FIELDS}, "file": str(path), "overlay": ""})
                if recorder is not None:
                    recorder.add(path, verdict, None)
        if not pil:
            if recorder is not None:
                recorder.flush()
            continue
        clock = time.perf_counter()
        pred = engine.inspect(model.prepare(pil), None if task_ids is None else [task_ids] * len(pil))
        latency_ms = 1000 * (time.perf_counter() - clock) / len(pil)
        for i, path in enumerate(batch_paths):
            verdict = image_verdict(pred, i, names)
            info, decision = names[verdict["task_id"]], verdict["decision"]
            row = {**{k: verdict.get(k, "") for k in CSV_FIELDS}, "file": str(path), "overlay": "", "reason": ""}
            if not args.csv_only:
                amap = pred.maps[i].numpy()
                image = model.transform.to_array(pil[i])
                picture = overlay_tile(image, amap, None, product_norm(info.calibration, amap), len(image))
                name = f"{len(rows):05d}_{path.stem}_{decision.replace(' ', '_')}.png"
                Image.fromarray(np.concatenate([image, picture], axis=1)).save(args.out / name)
                row["overlay"] = name
            rows.append(row)
            if recorder is not None:
                recorder.add(path, verdict, latency_ms)
        if recorder is not None:
            recorder.flush()  # one transaction per batch: what was inspected is recorded even if a later batch fails
    write_summary(args.out, rows, failed)
    table = [[Path(r["file"]).name, r["product"], f"{r['score']:.2f}", r["decision"]] for r in rows[:20]]
    print(format_table(table, ["image", "product", "score", "decision"]))
    if len(rows) > 20:
        print(f"... {len(rows) - 20} more")
    counts = {d: sum(r["decision"] == d for r in rows) for d in ("normal", "anomalous", UNKNOWN)}
    print(f"{len(rows)} images: " + ", ".join(f"{v} {k}" for k, v in counts.items())
          + (f"; {len(failed)} NOT INSPECTED (unreadable, see the 'reason' column)" if failed else ""))
    print(f"summary: {args.out / 'predictions.csv'}")
    if recorder is not None:
        print(f"recorded {recorder.recorded} verdict{'s' if recorder.recorded != 1 else ''} in {store.name}")
        store.close()
    if failed and not args.allow_unreadable:
        return EXIT_UNREADABLE
    return 0


class Recorder:
    """Collects the verdicts of one batch of image files and writes them to the store in one transaction."""

    def __init__(self, store, run_dir: Path, engine: str, source: str) -> None:
        from ..store.verdicts import model_sha256

        self.store, self.engine, self.source = store, engine, source
        self.model_sha256 = model_sha256(run_dir)
        self.pending: list[dict] = []
        self.recorded = 0

    def add(self, path: Path, verdict: dict, latency_ms: float | None, sha256: str | None = None) -> None:
        from ..store.checkpoint import sha256_file
        from ..store.verdicts import verdict_record

        if sha256 is None:
            try:
                sha256 = sha256_file(path)
            except OSError:
                sha256 = None  # the file cannot even be read: recorded without a hash
        self.pending.append(verdict_record(verdict, sha256=sha256, path=str(path), model_sha256=self.model_sha256,
                                           engine=self.engine, latency_ms=latency_ms, source=self.source))

    def flush(self) -> None:
        if self.pending:
            self.store.add_many(self.pending)
            self.recorded += len(self.pending)
            self.pending = []


def build_engine(model: MoleFlow, args: argparse.Namespace):
    """The engine `--engine` asks for; the onnx one keeps its graphs in --engine-cache (RUN/export/engine)."""
    from ..engine import make_engine
    from ..store.checkpoint import find_model

    kind = getattr(args, "engine", "torch")
    if kind == "torch":
        return make_engine(model, "torch", batch_size=args.batch_size)
    cache = getattr(args, "engine_cache", None) or find_model(args.run_dir).parent / "export" / "engine"
    return make_engine(model, "onnx", cache_dir=check_writable(cache), threads=getattr(args, "threads", None),
                       batch_size=args.batch_size)


def write_summary(out: Path, rows: list[dict], failed: list[dict]) -> None:
    fields = CSV_FIELDS

    def write_csv(fh) -> None:
        import io

        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        fh.write(text.getvalue().encode())

    atomic_write_bytes(out / "predictions.csv", write_csv)
    atomic_write_json(out / "summary.json", {"predictions": rows, "failed": failed,
                                             "inspected": len(rows) - len(failed), "not_inspected": len(failed)})
