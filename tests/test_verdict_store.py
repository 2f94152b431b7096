"""The verdict store on a real SQLite file (WAL) and, where a PostgreSQL server can be started, on PostgreSQL:
schema version and migrations, filters, counts, reviews, and two processes writing at once without loss."""

from __future__ import annotations

import multiprocessing
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from moleflow import MoleflowError
from moleflow.store import verdicts as vs
from moleflow.store.verdicts import VerdictStore, sqlite_journal_mode, sqlite_url

SHA_A, SHA_B, SHA_C = "a" * 64, "b" * 64, "c" * 64


def row(**overrides) -> dict:
    base = {"sha256": SHA_A, "path": "line3/part.png", "product": "brick", "nearest_product": "brick",
            "router_distance": 12.5, "score": 1.25, "threshold": 2.0, "decision": "normal",
            "model_sha256": "d" * 64, "engine": "torch", "latency_ms": 4.0, "source": "predict"}
    return {**base, **overrides}


# ------------------------------------------------------------------------------------------ PostgreSQL
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server in a temporary folder (initdb + pg_ctl), or a skip saying why not."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("no PostgreSQL server here (initdb/pg_ctl not found; apt-get install postgresql)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed (pip install 'psycopg[binary]')")
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: run the server as the postgres user
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run a PostgreSQL server as")
        prefix = [shutil.which("runuser") or "runuser", "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="moleflow-pg-"))
    os.chmod(base, 0o777)
    data, port = base / "data", _free_port()
    try:
        subprocess.run([*prefix, initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True, text=True, timeout=120)
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-l", str(base / "server.log"), "-w", "-t", "60", "-o",
                        f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                       check=True, capture_output=True, text=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = " ".join(str(getattr(exc, "stderr", "") or exc).split())[-300:]
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"could not start a throwaway PostgreSQL server: {detail}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    """A fresh, empty database of each kind."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "verdicts.sqlite")
        return
    server = request.getfixturevalue("postgres_url")
    from sqlalchemy import create_engine, text

    name = f"t{os.getpid()}_{time.monotonic_ns()}"
    admin = create_engine(server.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    yield server.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()


# ------------------------------------------------------------------------------------------ both databases
def test_schema_filters_counts_and_known_hashes(url):
    with VerdictStore(url) as store:
        assert store.schema_version() == vs.SCHEMA_VERSION == 2
        store.add(row(at="2025-01-01T08:00:00+00:00"))
        ids = store.add_many([
            row(at="2025-01-02T08:00:00+00:00", sha256=SHA_B, decision="anomalous", score=3.5),
            row(at="2025-01-03T08:00:00+00:00", sha256=SHA_C, product="unknown product", nearest_product="grass",
                decision="unknown product", route_margin=0.25, route_ambiguous=True, source="serve"),
            row(at="2025-01-04T08:00:00+00:00", sha256=None, product="", nearest_product="", decision="unreadable",
                score=float("nan"), threshold=float("nan"), reason="truncated", source="watch")], return_ids=True)
        assert len(ids) == 3 and ids == sorted(ids)
        assert len(store) == 4
        newest = store.verdicts()
        assert [v["decision"] for v in newest] == ["unreadable", "unknown product", "anomalous", "normal"]
        assert newest[0]["score"] is None and newest[0]["reason"] == "truncated"  # nan is stored as NULL
        assert newest[1]["route_margin"] == pytest.approx(0.25) and newest[1]["route_ambiguous"] is True
        assert newest[3]["route_margin"] is None and newest[3]["route_ambiguous"] is None
        assert [v["sha256"] for v in store.verdicts(product="brick", newest_first=False)] == [SHA_A, SHA_B]
        assert [v["decision"] for v in store.verdicts(since="2025-01-02", until="2025-01-04")] == \
            ["unknown product", "anomalous"]
        assert len(store.verdicts(since="2025-01-02T09:00:00+01:00")) == 3  # 08:00 UTC: included
        assert [v["id"] for v in store.verdicts(decision=["normal", "anomalous"], limit=1)] == [ids[0]]
        assert store.counts() == {"normal": 1, "anomalous": 1, "unknown product": 1, "unreadable": 1}
        assert store.counts(product="brick") == {"normal": 1, "anomalous": 1}
        assert store.counts(source="serve") == {"unknown product": 1}
        store.add(row(sha256=SHA_B, decision="normal"))  # the same image again: its latest decision counts
        assert store.known([SHA_A, SHA_B, "e" * 64]) == {SHA_A: "normal", SHA_B: "normal"}
        with pytest.raises(MoleflowError, match="source 'camera'"):
            store.add(row(source="camera"))
        with pytest.raises(MoleflowError, match="not a time"):
            store.verdicts(since="yesterday")


def test_reviews(url):
    with VerdictStore(url) as store:
        first, second = store.add_many([row(), row(sha256=SHA_B, decision="anomalous")], return_ids=True)
        store.add_review(second, "false_alarm", reviewer="alice", note="dust on the lens")
        store.add_review(first, "wrong_product", reviewer="bob", correct_product="grass")
        reviews = store.reviews()
        assert [(r["verdict_id"], r["label"], r["reviewer"]) for r in reviews] == \
            [(first, "wrong_product", "bob"), (second, "false_alarm", "alice")]
        assert reviews[0]["correct_product"] == "grass" and reviews[1]["note"] == "dust on the lens"
        assert reviews[1]["decision"] == "anomalous" and reviews[1]["sha256"] == SHA_B  # joined with its verdict
        assert [r["reviewer"] for r in store.reviews(label="false_alarm")] == ["alice"]
        assert [r["label"] for r in store.reviews(verdict_id=first)] == ["wrong_product"]
        with pytest.raises(MoleflowError, match="review label 'ok'"):
            store.add_review(first, "ok", reviewer="alice")
        with pytest.raises(MoleflowError, match="no verdict 999"):
            store.add_review(999, "defect_confirmed", reviewer="alice")
        with pytest.raises(MoleflowError, match="only with the label wrong_product"):
            store.add_review(first, "false_alarm", reviewer="alice", correct_product="grass")


def _writer(url: str, worker: int, start_at: float, n_single: int, n_batch: int) -> None:
    store = VerdictStore(url)
    while time.time() < start_at:
        time.sleep(0.001)
    for i in range(n_single):
        store.add(row(path=f"w{worker}/{i}.png", sha256=f"{worker}{i:063d}"))
    store.add_many([row(path=f"w{worker}/b{i}.png", decision="anomalous") for i in range(n_batch)])
    store.close()


def test_two_processes_write_at_once_without_loss(url):
    VerdictStore(url).close()  # created before the writers start (as `moleflow serve` does before its workers)
    fork = multiprocessing.get_context("fork")  # no re-import of torch in the children
    start_at = time.time() + 0.5
    workers = [fork.Process(target=_writer, args=(url, w, start_at, 150, 100)) for w in range(2)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)
    assert [p.exitcode for p in workers] == [0, 0]
    with VerdictStore(url) as store:
        assert len(store) == 2 * 250
        assert store.counts() == {"normal": 300, "anomalous": 200}
        rows = store.verdicts(newest_first=False)
        assert len({r["id"] for r in rows}) == 500
        for w in range(2):  # every verdict of each writer, once
            assert sorted(r["path"] for r in rows if r["path"].startswith(f"w{w}/")) == \
                sorted([f"w{w}/{i}.png" for i in range(150)] + [f"w{w}/b{i}.png" for i in range(100)])


# ------------------------------------------------------------------------------------------ SQLite specifics
def test_sqlite_is_wal_with_a_busy_timeout_and_writes_are_cheap(tmp_path):
    path = tmp_path / "v.sqlite"
    with VerdictStore(sqlite_url(path)) as store:
        assert sqlite_journal_mode(store) == "wal"
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == vs.BUSY_TIMEOUT_MS
            # what makes a write cheap: no fsync of the database per commit, only at WAL checkpoints (the cost of a
            # verdict is measured in BENCHMARKS.md, "Verdict store", not timed here)
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        for i in range(300):
            store.add(row(path=f"{i}.png"))
        assert len(store) == 300
    assert (tmp_path / "v.sqlite-wal").exists() or path.stat().st_size > 0


def test_a_newer_or_foreign_schema_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "newer.sqlite"
    VerdictStore(sqlite_url(path)).close()
    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_version (version, at) VALUES (7, '2030-01-01T00:00:00+00:00')")
    with pytest.raises(MoleflowError) as info:
        VerdictStore(sqlite_url(path))
    assert str(path) in str(info.value) and "version 7" in str(info.value) and "newer" in str(info.value)

    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE verdicts (x INTEGER)")
    with pytest.raises(MoleflowError, match="no schema_version table"):
        VerdictStore(sqlite_url(foreign))
    with pytest.raises(MoleflowError, match="folder does not exist"):
        VerdictStore(sqlite_url(tmp_path / "nowhere" / "v.sqlite"))
    with pytest.raises(MoleflowError, match="not a database URL"):
        VerdictStore("nosuchdb://x/y")


def test_an_older_store_is_migrated_in_place(tmp_path, monkeypatch):
    """The migration path: a version-1 store holding verdicts (as moleflow wrote it before thumbnails) is
    upgraded to version 2 (the thumbnails table); then a made-up version 3 step runs on top of it."""
    path = tmp_path / "v.sqlite"
    with monkeypatch.context() as patch:
        patch.setattr(vs, "SCHEMA_VERSION", 1)
        with VerdictStore(sqlite_url(path)) as store:
            store.add(row())
            assert store.schema_version() == 1
            with store.engine.connect() as conn:
                assert "thumbnails" not in [r[0] for r in conn.exec_driver_sql(
                    "SELECT name FROM sqlite_master WHERE type='table'")]
    with VerdictStore(sqlite_url(path)) as store:
        assert store.schema_version() == 2
        assert len(store) == 1 and store.verdicts()[0]["sha256"] == SHA_A  # the data survived
        store.add_thumbnails({store.verdicts()[0]["id"]: (b"png", 4, 3)})
        assert store.thumbnail(store.verdicts()[0]["id"]) == b"png"

    def add_line_column(conn) -> None:
        from sqlalchemy import text

        conn.execute(text("ALTER TABLE verdicts ADD COLUMN line TEXT"))

    monkeypatch.setattr(vs, "SCHEMA_VERSION", 3)
    monkeypatch.setitem(vs.MIGRATIONS, 2, add_line_column)
    with VerdictStore(sqlite_url(path)) as store:
        assert store.schema_version() == 3
        with store.engine.connect() as conn:
            columns = [r[1] for r in conn.exec_driver_sql("PRAGMA table_info(verdicts)")]
            versions = [r[0] for r in conn.exec_driver_sql("SELECT version FROM schema_version ORDER BY version")]
        assert "line" in columns and versions == [1, 2, 3]
    monkeypatch.setattr(vs, "SCHEMA_VERSION", 4)  # a version with no migration step written: a clear error
    with pytest.raises(MoleflowError, match="no migration from verdict store schema version 3"):
        VerdictStore(sqlite_url(path))


def test_review_queries_scores_and_thumbnails(url):
    """What the review side reads (feedback.py, drift.py, serve/review.py), on SQLite and PostgreSQL."""
    with VerdictStore(url) as store:
        ids = store.add_many([row(at="2025-03-01T10:00:00Z"), row(decision="anomalous", score=3.0,
                                                                   at="2025-03-01T11:00:00Z"),
                              row(product="grass", at="2025-03-02T09:00:00Z"),
                              row(score=1.5, threshold=2.5, at="2025-03-02T10:00:00Z", route_ambiguous=True)],
                             return_ids=True)
        first, flagged, grass, later = ids
        with pytest.raises(MoleflowError, match="good_confirmed, not a false alarm"):
            store.add_review(first, "false_alarm", reviewer="alice")
        with pytest.raises(MoleflowError, match="is a false_alarm"):
            store.add_review(flagged, "good_confirmed", reviewer="alice")
        store.add_review(flagged, "defect_confirmed", reviewer="alice")
        store.add_review(flagged, "false_alarm", reviewer="bob", note="dust")  # a second look: the latest counts
        store.add_review(first, "good_confirmed", reviewer="alice")
        latest = store.latest_reviews([first, flagged, grass])
        assert set(latest) == {first, flagged} and latest[flagged]["label"] == "false_alarm"
        reviewed = store.reviewed(product="brick")
        assert [(r["id"], r["label"], r["reviewer"]) for r in reviewed] == [(first, "good_confirmed", "alice"),
                                                                           (flagged, "false_alarm", "bob")]
        assert reviewed[1]["review_at"] and reviewed[1]["decision"] == "anomalous" and reviewed[1]["note"] == "dust"
        assert [r["label"] for r in store.reviews(reviewer="alice")] == ["good_confirmed", "defect_confirmed"]
        assert store.reviews(product="grass") == []
        assert [r["id"] for r in store.verdicts(reviewed=False)] == [later, grass]
        assert [r["id"] for r in store.verdicts(reviewed=True)] == [flagged, first]
        assert [r["id"] for r in store.verdicts(before_id=grass)] == [flagged, first]
        assert store.verdict(grass)["product"] == "grass" and store.verdict(999) is None
        # the drift monitor's stream: one product, decisions, one threshold, oldest first
        assert [r[0] for r in store.scores("brick", "normal", threshold=2.0)] == [first]
        assert [r[0] for r in store.scores("brick", ("normal", "anomalous"))] == [first, flagged, later]
        assert [r[0] for r in store.scores("brick", ("normal", "anomalous"), limit=2)] == [flagged, later]
        assert sorted(store.daily_counts()) == [("2025-03-01", "brick", "anomalous", 1, 0),
                                                ("2025-03-01", "brick", "normal", 1, 0),
                                                ("2025-03-02", "brick", "normal", 1, 1),  # one routed ambiguously
                                                ("2025-03-02", "grass", "normal", 1, 0)]
        store.add_thumbnails({flagged: (b"\x89PNG first", 8, 8)})
        store.add_thumbnails({flagged: (b"\x89PNG again", 8, 8), grass: (b"\x89PNG grass", 4, 4)})  # replaced
        assert store.thumbnail(flagged) == b"\x89PNG again" and store.thumbnail(first) is None
        assert store.thumbnail_ids(ids) == {flagged, grass}


def test_store_urls(tmp_path):
    from moleflow.store.verdicts import describe_url, resolve_url

    assert resolve_url("postgresql://u:secret@db/line") == "postgresql://u:secret@db/line"
    assert describe_url("postgresql://u:secret@db/line") == "postgresql://u:***@db/line"
    assert resolve_url(tmp_path / "x.sqlite") == f"sqlite:///{tmp_path / 'x.sqlite'}"
    with pytest.raises(MoleflowError, match="no moleflow model"):
        resolve_url(None, tmp_path)
