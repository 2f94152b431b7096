"""On the line: `moleflow watch` (idempotent by content, waits for complete files, sorts) and `predict --record`.

The model is the tiny run of `serve_support.shared_run` (built once per session); every verdict goes to a store
in the test's own folder, never into the shared run.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from moleflow.cli import main
from moleflow.store.verdicts import VerdictStore, model_sha256, sqlite_url
from serve_support import png, sample_image, shared_run

WATCH = ["--interval", "0.1", "--no-progress", "--batch-size", "4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_run(tmp_path_factory)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fill_inbox(data: Path, inbox: Path) -> dict[str, str]:
    """Two brick parts, a grass part, a copy of the grass part, noise (no learned product) and a broken file;
    returns file name -> content hash."""
    inbox.mkdir(parents=True, exist_ok=True)
    shutil.copy(sample_image(data, "brick", "good"), inbox / "brick_good.png")
    shutil.copy(sample_image(data, "brick", "scratch"), inbox / "brick_scratch.png")
    shutil.copy(sample_image(data, "grass"), inbox / "grass.png")
    shutil.copy(sample_image(data, "grass"), inbox / "grass_again.png")  # identical content: one verdict
    noise = np.random.default_rng(0).integers(0, 255, (90, 90, 3), dtype=np.uint8)
    (inbox / "noise.png").write_bytes(png(noise))
    (inbox / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 10)
    (inbox / ".hidden.png").write_bytes(b"a writer's temporary file")  # skipped
    (inbox / "notes.txt").write_text("not an image")  # skipped
    return {p.name: sha(p) for p in inbox.iterdir() if p.suffix == ".png" and not p.name.startswith(".")}


def test_watch_once_twice_records_each_part_once_and_sorts(run, tmp_path, capsys):
    data, run_dir = run
    inbox, sorted_dir = tmp_path / "inbox", tmp_path / "sorted"
    hashes = fill_inbox(data, inbox)
    url = sqlite_url(tmp_path / "verdicts.sqlite")
    args = ["watch", str(run_dir), str(inbox), "--once", "--store", url, "--unreadable-after", "2", *WATCH]

    assert main([*args, "--sort", str(sorted_dir)]) == 0
    out = capsys.readouterr().out
    assert "5 verdicts recorded" in out and "0 already in the store" in out
    with VerdictStore(url) as store:
        rows = store.verdicts(newest_first=False)
        assert len(rows) == 5  # the copy of grass.png is not inspected again
        assert {r["sha256"] for r in rows} == set(hashes.values())
        assert all(r["source"] == "watch" and r["engine"] == "torch" for r in rows)
        assert {r["model_sha256"] for r in rows} == {model_sha256(run_dir)}
        by_hash = {r["sha256"]: r for r in rows}
        assert by_hash[hashes["broken.png"]]["decision"] == "unreadable" and by_hash[hashes["broken.png"]]["reason"]
        assert by_hash[hashes["noise.png"]]["decision"] == "unknown product"
        assert by_hash[hashes["grass.png"]]["nearest_product"] == "grass"
        assert all(r["latency_ms"] > 0 for r in rows if r["decision"] != "unreadable")
        first_counts = store.counts()
    folders = {"normal": "pass", "anomalous": "flag", "unknown product": "unknown", "unreadable": "unreadable"}
    for name, digest in hashes.items():  # every file moved by its decision, the recorded path is where it went
        decision = by_hash[digest]["decision"]
        assert (sorted_dir / folders[decision] / name).is_file(), name
    assert by_hash[hashes["noise.png"]]["path"] == str(sorted_dir / "unknown" / "noise.png")
    assert sorted(p.name for p in inbox.iterdir()) == [".hidden.png", "notes.txt"]

    # the same parts arrive again (a watcher killed after recording, before moving): nothing is counted twice
    fill_inbox(data, inbox)
    assert main([*args, "--sort", str(sorted_dir)]) == 0
    assert "0 verdicts recorded; 6 already in the store" in capsys.readouterr().out
    assert (sorted_dir / "pass" / "grass_again-1.png").is_file() or (sorted_dir / "flag" / "grass_again-1.png").is_file()
    assert sorted(p.name for p in inbox.iterdir()) == [".hidden.png", "notes.txt"]

    # without --sort the files stay; a second run over the same inbox records nothing new
    fill_inbox(data, inbox)
    assert main(args) == 0
    assert main(args) == 0
    with VerdictStore(url) as store:
        assert store.counts() == first_counts and len(store) == 5
    assert len([p for p in inbox.iterdir() if p.suffix == ".png" and not p.name.startswith(".")]) == 6


def test_watch_does_not_read_a_file_while_it_is_written(run, tmp_path, caplog):
    """A writer that stalls halfway (the file stays unchanged for many polls and does not decode) and then
    finishes slowly: the watcher waits, and inspects the complete file once."""
    data, run_dir = run
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    content = sample_image(data, "brick", "good").read_bytes()
    target = inbox / "slow.png"
    url = sqlite_url(tmp_path / "verdicts.sqlite")

    def refused() -> list[str]:
        return [r.getMessage() for r in list(caplog.records) if "slow.png" in r.getMessage() and "waiting" in r.getMessage()]

    def write_slowly() -> None:
        with open(target, "wb") as fh:
            fh.write(content[: len(content) // 2])
            fh.flush()
            # stalled, truncated: until the watcher has seen it unchanged and refused it (however long the model
            # takes to load on a busy machine), at most a minute
            deadline = time.monotonic() + 60
            while not refused() and time.monotonic() < deadline:
                time.sleep(0.05)
            cut = len(content) - 64  # the end of the image data and IEND come last, in one write
            for start in range(len(content) // 2, cut, 2048):
                fh.write(content[start:min(start + 2048, cut)])
                fh.flush()
                time.sleep(0.03)
            fh.write(content[cut:])

    caplog.set_level(logging.DEBUG, logger="moleflow.cli.watch")
    writer = threading.Thread(target=write_slowly)
    writer.start()
    time.sleep(0.05)
    try:
        assert main(["watch", str(run_dir), str(inbox), "--once", "--store", url, "--unreadable-after", "100",
                     *WATCH]) == 0
    finally:
        writer.join()
    with VerdictStore(url) as store:
        rows = store.verdicts()
    assert len(rows) == 1
    assert rows[0]["sha256"] == hashlib.sha256(content).hexdigest() and rows[0]["decision"] != "unreadable"
    assert refused(), "the stalled, truncated file was never seen unchanged and refused"  # the test did test something


def test_predict_record_writes_every_verdict_with_its_hash(run, tmp_path, capsys):
    data, run_dir = run
    images = tmp_path / "images"
    images.mkdir()
    for product, kind in (("brick", "good"), ("brick", "scratch"), ("grass", "good")):
        shutil.copy(sample_image(data, product, kind), images / f"{product}_{kind}.png")
    (images / "zz_broken.png").write_bytes(b"broken")
    url = sqlite_url(tmp_path / "store.sqlite")
    code = main(["predict", str(run_dir), str(images), "--out", str(tmp_path / "out"), "--csv-only", "--no-progress",
                 "--record", "--store", url, "--batch-size", "2"])
    assert code == 3  # one unreadable image
    assert "recorded 4 verdicts" in capsys.readouterr().out
    csv_rows = {Path(r["file"]).name: r for r in csv.DictReader(open(tmp_path / "out" / "predictions.csv"))}
    with VerdictStore(url) as store:
        rows = {Path(r["path"]).name: r for r in store.verdicts()}
        assert store.counts(source="predict")["unreadable"] == 1
    assert set(rows) == set(csv_rows)
    for name, row in rows.items():
        assert row["sha256"] == sha(images / name) and row["source"] == "predict"
        assert row["decision"] == csv_rows[name]["decision"] and row["model_sha256"] == model_sha256(run_dir)
        if row["decision"] != "unreadable":
            assert row["score"] == pytest.approx(float(csv_rows[name]["score"]))
            assert row["product"] == csv_rows[name]["product"] and row["latency_ms"] > 0
