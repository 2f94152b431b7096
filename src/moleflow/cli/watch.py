"""`moleflow watch`: inspect the images that arrive in a folder, record every verdict, optionally sort them.

Each poll lists the image files directly in INBOX (not in sub-folders; names starting with "." are skipped,
so a writer can write `.part.png` and rename it). A file is read only once its size and modification time
are unchanged since the previous poll, and inspected only once it decodes; one that stays unchanged and
still does not decode for --unreadable-after polls is recorded as "unreadable". Files are inspected in
batches with the run's model (as `moleflow predict`), their verdicts recorded in the verdict store (source
"watch") and then, with --sort DIR, moved to DIR/pass, DIR/flag, DIR/unknown or DIR/unreadable.

A file whose content (SHA-256) is already in the store is not inspected again: it is only sorted, by its
recorded decision. So a watcher killed at any point and started again neither misses a file nor counts one
twice. A new model of the run (add-task, calibrate) is picked up at the next poll.
"""

from __future__ import annotations

import argparse
import io
import logging
import shutil
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..data.datasets import IMAGE_EXTENSIONS
from ..data.transforms import to_rgb8
from ..decisions import ANOMALOUS, NORMAL, UNKNOWN, UNREADABLE, image_verdict, unreadable_verdict
from ..errors import MoleflowError
from .common import add_runtime_options, apply_runtime

log = logging.getLogger(__name__)

EXAMPLES = """examples:
  moleflow watch runs/real /line3/inbox                         # poll every 2 s; verdicts in runs/real/verdicts.sqlite
  moleflow watch runs/real /line3/inbox --sort /line3/sorted    # then move each image to sorted/pass|flag|unknown
  moleflow watch runs/real /line3/inbox --once                  # handle what is there, then exit (cron)
  moleflow watch runs/real inbox/ --store postgresql://qa@db.local/line --engine onnx --interval 1

An image is read only when its size and modification time did not change between two polls and it decodes
(a file still being written is left until it is complete). An image whose content is already in the verdict
store is not inspected again (restarting the watcher neither misses nor double-counts a part); with --sort
it is moved by its recorded decision. --sort folders: pass (normal), flag (anomalous), unknown (unknown
product), unreadable (never decoded; also recorded). Stop with Ctrl-C or SIGTERM: the batch being inspected
is recorded first.
"""
SORT_FOLDERS = {NORMAL: "pass", ANOMALOUS: "flag", UNKNOWN: "unknown", UNREADABLE: "unreadable"}
ORDER = (NORMAL, ANOMALOUS, UNKNOWN, UNREADABLE)


def add_parser(sub) -> None:
    p = sub.add_parser("watch", help="inspect images arriving in a folder; record (and sort) every verdict",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Poll INBOX for new images, inspect them with RUN_DIR's model, record each verdict "
                                   "in the verdict store and optionally sort the files by decision.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory (or its model folder)")
    p.add_argument("inbox", type=Path, metavar="INBOX", help="the folder the camera (or a PLC) writes images into")
    p.add_argument("--sort", type=Path, metavar="DIR",
                   help="move each inspected image to DIR/pass, DIR/flag, DIR/unknown or DIR/unreadable")
    p.add_argument("--store", metavar="URL|FILE",
                   help="verdict store: a SQLAlchemy URL (postgresql://...) or a SQLite file (default "
                        "RUN_DIR/verdicts.sqlite)")
    p.add_argument("--once", action="store_true",
                   help="handle the images in INBOX (waiting for those still being written), then exit")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between polls (default 2)")
    p.add_argument("--unreadable-after", type=int, default=5, metavar="POLLS",
                   help="an unchanged file that still does not decode after this many polls is recorded as "
                        "unreadable (default 5)")
    p.add_argument("--backbone-weights", help="backbone weights file, if the run's is not found here")
    p.add_argument("--engine", default="torch", choices=["torch", "onnx"],
                   help="torch: the PyTorch inspector (default); onnx: onnxruntime, faster on the CPU")
    p.add_argument("--engine-cache", type=Path,
                   help="folder for the onnx engine's graphs (default RUN_DIR/export/engine)")
    add_runtime_options(p)
    p.set_defaults(run=run)


def decode_image(data: bytes, name: str) -> Image.Image:
    """Decode image bytes completely to 8-bit RGB, or raise `MoleflowError` saying why."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_rgb8(img, name)
    except MoleflowError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure means: not (yet) a complete image
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise MoleflowError(f"{name}: cannot decode this image ({detail})") from None


@dataclass
class Seen:
    """A file waiting in the inbox: its (size, mtime_ns) at the last poll and failed decodes while unchanged."""

    signature: tuple[int, int]
    failures: int = 0
    reason: str = ""


@dataclass
class Entry:
    path: Path
    signature: tuple[int, int]
    data: bytes
    sha256: str | None  # None: the file could not be read at all


class Watcher:
    """The polling loop's state: files waiting, the model (reloaded when the run's manifest changes), counts."""

    def __init__(self, args: argparse.Namespace, store: Any) -> None:
        self.args, self.store = args, store
        self.inbox, self.sort = Path(args.inbox), Path(args.sort) if args.sort else None
        self.pending: dict[Path, Seen] = {}
        self.left: dict[Path, tuple[int, int]] = {}  # handled files left in the inbox (no --sort)
        self.counts: Counter[str] = Counter()  # verdicts recorded by this watcher, per decision
        self.already = 0  # files whose content was already in the store
        self.model_sha256 = ""
        self.manifest_signature: tuple[int, int] | None = None
        self.load_model()

    # ------------------------------------------------------------------------------ model
    def _manifest(self) -> Path:
        from ..store.checkpoint import MANIFEST, find_model

        found = find_model(self.args.run_dir)
        return found / MANIFEST if found.is_dir() else found

    def load_model(self) -> None:
        from ..detector import MoleFlow
        from ..store.verdicts import model_sha256
        from .predict import build_engine

        stat = self._manifest().stat()
        sha = model_sha256(self.args.run_dir)  # before loading: a model saved meanwhile is seen as changed
        model = MoleFlow.load(self.args.run_dir, device=self.args.device, backbone_weights=self.args.backbone_weights)
        engine = build_engine(model, self.args)
        self.model, self.engine, self.tasks = model, engine, {t.task_id: t for t in model.tasks}
        self.model_sha256, self.manifest_signature = sha, (stat.st_size, stat.st_mtime_ns)
        log.info("model %s: %s", sha[:12], ", ".join(t.name for t in model.tasks))

    def reload_if_changed(self) -> None:
        """Load the run's model again when its manifest changed (add-task, remove-task, calibrate)."""
        try:
            stat = self._manifest().stat()
        except (OSError, MoleflowError):
            return
        if (stat.st_size, stat.st_mtime_ns) == self.manifest_signature:
            return
        from ..store.verdicts import model_sha256

        try:
            if model_sha256(self.args.run_dir) == self.model_sha256:
                self.manifest_signature = (stat.st_size, stat.st_mtime_ns)
                return
            self.load_model()
        except (OSError, MoleflowError) as exc:
            log.error("the run's model changed but cannot be loaded (%s); still inspecting with model %s",
                      " ".join(str(exc).split()), self.model_sha256[:12])
            self.manifest_signature = (stat.st_size, stat.st_mtime_ns)  # tried again when it changes again

    # ------------------------------------------------------------------------------ polling
    def listing(self) -> list[Path]:
        try:
            names = sorted(self.inbox.iterdir())
        except OSError as exc:
            raise MoleflowError(f"{self.inbox}: cannot list the inbox ({exc.strerror or exc})") from None
        return [p for p in names if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
                and p.is_file()]

    def poll(self) -> dict[str, int]:
        """One look at the inbox: handle every file unchanged since the last poll. Returns what it did."""
        files = self.listing()
        present = set(files)
        for gone in [p for p in self.pending if p not in present]:
            del self.pending[gone]
        for gone in [p for p in self.left if p not in present]:
            del self.left[gone]
        ready = []
        for path in files:
            try:
                stat = path.stat()
            except OSError:
                continue  # moved away meanwhile
            signature = (stat.st_size, stat.st_mtime_ns)
            if self.left.get(path) == signature:
                continue
            seen = self.pending.get(path)
            if seen is None or seen.signature != signature:  # new, or written since the last poll
                self.pending[path] = Seen(signature)
                continue
            ready.append(path)
        before, already = Counter(self.counts), self.already
        if ready:
            self.process(ready)
        done = {d: self.counts[d] - before[d] for d in ORDER if self.counts[d] - before[d]}
        return {"inspected": sum(done.values()), "already": self.already - already, "waiting": len(self.pending),
                **done}

    def _read(self, paths: list[Path]) -> tuple[list[Entry], list[Entry]]:
        """(files read whole and unchanged, files that could not be read for --unreadable-after polls)."""
        from ..store.verdicts import content_sha256

        entries, unreadable = [], []
        for path in paths:
            seen = self.pending[path]
            try:
                data = path.read_bytes()
                stat = path.stat()
            except FileNotFoundError:
                self.pending.pop(path, None)
                continue
            except OSError as exc:
                if self._failed(path, f"{path}: cannot read the file ({exc.strerror or exc})"):
                    unreadable.append(Entry(path, seen.signature, b"", None))
                continue
            now = (stat.st_size, stat.st_mtime_ns)
            if now != seen.signature or len(data) != now[0]:  # written to while it was read
                self.pending[path] = Seen(now)
                continue
            entries.append(Entry(path, now, data, content_sha256(data)))
        return entries, unreadable

    def _failed(self, path: Path, reason: str) -> bool:
        """One more failed decode of an unchanged file; True when it is now declared unreadable."""
        seen = self.pending[path]
        seen.failures += 1
        seen.reason = reason
        if seen.failures < self.args.unreadable_after:
            log.debug("%s (unchanged for %d polls; waiting)", reason, seen.failures)
            return False
        return True

    def process(self, paths: list[Path]) -> None:
        entries, never_read = self._read(paths)
        known = self.store.known(e.sha256 for e in entries)
        groups: dict[str, list[Entry]] = {}  # new content -> its files (identical copies are inspected once)
        for entry in entries:
            if entry.sha256 in known:
                self.already += 1
                self.settle(entry, known[entry.sha256])
            else:
                groups.setdefault(entry.sha256, []).append(entry)
        images, batch, unreadable = [], [], [[entry] for entry in never_read]
        for sha, group in groups.items():
            try:
                images.append(decode_image(group[0].data, str(group[0].path)))
                batch.append(group)
            except MoleflowError as exc:
                if self._failed(group[0].path, str(exc)):
                    unreadable.append(group)
        for group in unreadable:
            verdict = unreadable_verdict(self.pending[group[0].path].reason)
            log.warning("%s: unreadable after %d polls (%s)", group[0].path, self.args.unreadable_after,
                        verdict["reason"])
            self.record([(group, verdict, None)])
        size = self.args.batch_size
        from tqdm.auto import tqdm

        for start in tqdm(range(0, len(batch), size), desc="watch", unit="batch",
                          disable=self.args.no_progress or len(batch) <= size):
            groups_now, pil = batch[start:start + size], images[start:start + size]
            clock = time.perf_counter()
            pred = self.engine.inspect(self.model.prepare(pil))
            latency_ms = 1000 * (time.perf_counter() - clock) / len(pil)
            self.record([(group, image_verdict(pred, i, self.tasks), latency_ms) for i, group in enumerate(groups_now)])

    def record(self, items: list[tuple[list[Entry], dict, float | None]]) -> None:
        """Record one verdict per content (in one transaction), then sort its files."""
        from ..store.verdicts import verdict_record

        rows = []
        for group, verdict, latency_ms in items:
            first = group[0]
            where = self.destination(first.path, verdict["decision"]) if self.sort else first.path
            rows.append(verdict_record(verdict, sha256=first.sha256, path=str(where), model_sha256=self.model_sha256,
                                       engine=self.args.engine, latency_ms=latency_ms, source="watch"))
        self.store.add_many(rows)
        for group, verdict, _ in items:
            self.counts[verdict["decision"]] += 1
            for entry in group:
                self.settle(entry, verdict["decision"])

    def destination(self, path: Path, decision: str) -> Path:
        """DIR/<folder>/<name>, with -1, -2 ... before the suffix when that name is taken."""
        folder = self.sort / SORT_FOLDERS.get(decision, "unknown")
        target, n = folder / path.name, 0
        while target.exists():
            n += 1
            target = folder / f"{path.stem}-{n}{path.suffix}"
        return target

    def settle(self, entry: Entry, decision: str) -> None:
        """The file is handled: moved by its decision (--sort) or remembered as done."""
        if self.sort is None or not entry.path.exists():
            self.left[entry.path] = entry.signature
            self.pending.pop(entry.path, None)
            return
        target = self.destination(entry.path, decision)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(entry.path), str(target))
        except OSError as exc:  # left waiting: the next poll finds it recorded and tries the move again
            log.error("%s: recorded, but cannot move it to %s (%s)", entry.path, target.parent, exc.strerror or exc)
            return
        self.pending.pop(entry.path, None)


def _summary(counts: Counter, already: int) -> str:
    parts = [f"{counts[d]} {d}" for d in ORDER if counts[d]]
    total = sum(counts.values())
    return (f"{total} verdict{'s' if total != 1 else ''} recorded" + (f" ({', '.join(parts)})" if parts else "")
            + f"; {already} already in the store")


def run(args: argparse.Namespace) -> int:
    from ..store.verdicts import VerdictStore

    apply_runtime(args)
    if args.interval <= 0:
        raise MoleflowError("--interval must be more than 0 seconds")
    if args.unreadable_after < 1:
        raise MoleflowError("--unreadable-after must be at least 1 poll")
    if not args.inbox.is_dir():
        raise MoleflowError(f"{args.inbox}: no such folder; give the folder the images arrive in")
    if args.sort is not None:
        from ..store.atomic import check_writable

        check_writable(args.sort)
    store = VerdictStore.open(args.store, run_dir=args.run_dir)
    watcher = Watcher(args, store)
    print(f"moleflow watch: {args.inbox} every {args.interval:g} s with model {watcher.model_sha256[:12]} "
          f"({args.engine}); verdicts in {store.name}" + (f"; sorted into {args.sort}" if args.sort else ""))
    stop = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM (systemd, docker stop): finish the batch
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    first: set[Path] | None = None
    try:
        while not stop.is_set():
            watcher.reload_if_changed()
            done = watcher.poll()
            if done["inspected"] or done["already"]:
                log.info("%s; %d waiting | total %s", ", ".join(f"{v} {k}" for k, v in done.items()
                                                                  if k not in ("waiting",) and v),
                         done["waiting"], _summary(watcher.counts, watcher.already))
            if args.once:
                first = set(watcher.pending) if first is None else first
                if not first & set(watcher.pending):  # every file there at the start is handled
                    break
            stop.wait(args.interval)
    except KeyboardInterrupt:
        print(f"moleflow watch: stopped; {_summary(watcher.counts, watcher.already)}")
        store.close()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    waiting = len(watcher.pending)
    print(f"moleflow watch: {_summary(watcher.counts, watcher.already)}"
          + (f"; {waiting} file{'s' if waiting != 1 else ''} still being written" if waiting else ""))
    totals = store.counts(source="watch")
    print("store (source watch): " + (", ".join(f"{totals.get(d, 0)} {d}" for d in ORDER if totals.get(d))
                                      or "empty"))
    store.close()
    return 0
