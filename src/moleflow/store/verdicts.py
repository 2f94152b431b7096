"""The verdict store: every verdict the line gets (serve, predict --record, watch) as one database row.

    store = VerdictStore.open(None, run_dir="runs/real")      # RUN/verdicts.sqlite (SQLite, WAL mode)
    store = VerdictStore.open("postgresql://user@db/line")     # any SQLAlchemy URL (or a file path: SQLite)
    store.add(row)                                             # one verdict (< 1 ms on SQLite WAL)
    store.add_many(rows)                                       # several in one transaction
    store.verdicts(product="brick", since="2025-01-01", decision="anomalous")   # newest first
    store.counts(product="brick")                              # {"normal": 120, "anomalous": 3, ...}
    store.add_review(verdict_id, "false_alarm", reviewer="alice", note="dust")
    store.reviews(label="false_alarm", product="brick")          # each with its verdict's fields
    store.latest_reviews([12, 13])                              # verdict id -> its latest review
    store.add_thumbnails({12: png_bytes}); store.thumbnail(12)  # small overlay PNGs (serve --thumbnails)

Tables (schema version 2):
    verdicts        id, at (UTC ISO 8601, microseconds), sha256 (of the image file's bytes), path (or upload
                    name), product (routed product, or "unknown product"; "" when unreadable), nearest_product,
                    router_distance, route_margin and route_ambiguous (when the inspection provides them),
                    score, threshold, decision (normal / anomalous / unknown product / unreadable), reason
                    (why unreadable), model_sha256 (of RUN/model/manifest.json), engine, latency_ms,
                    source (serve / predict / watch)
    reviews         id, verdict_id, label (defect_confirmed / false_alarm / good_confirmed / wrong_product),
                    correct_product, reviewer, at, note; a verdict may be reviewed again: its latest review
                    counts (`latest_reviews`)
    thumbnails      verdict_id, png (a small overlay of the part, `serve --thumbnails`), width, height
                    (added by schema version 2)
    schema_version  one row per migration applied (version, at); the highest is the store's version

Review labels: `defect_confirmed` (a person saw a defect: a flagged part rightly flagged, or a passed part
that escaped), `false_alarm` (a flagged part that is good), `good_confirmed` (a passed part that is good:
the audit sample of passed parts, `feedback.py`), `wrong_product` (routed to the wrong product; with
`correct_product` when known).

Opening a store migrates it: a new database gets the current schema; an older version is upgraded in place,
one step of `MIGRATIONS` at a time, in one transaction; a store written by a newer moleflow is refused with a
`MoleflowError` naming it. SQLite files are opened in WAL mode with a busy timeout and synchronous=NORMAL,
so several processes (uvicorn workers, a watcher, predict) write to one file at once; a write transaction
starts with BEGIN IMMEDIATE, so writers queue instead of failing. On PostgreSQL a migration holds an
advisory lock. Import this module only where SQLAlchemy is installed (`pip install "moleflow[serve]"`).
"""

from __future__ import annotations

import hashlib
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..errors import MoleflowError
from .run import VERDICT_STORE_FILE

try:
    from sqlalchemy import (Boolean, Column, Float, ForeignKey, Index, Integer, LargeBinary, MetaData, String, Table,
                            Text, case, create_engine, delete, event, func, insert, inspect, select, text)
    from sqlalchemy.engine import Connection, Engine, make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MoleflowError('the verdict store needs SQLAlchemy; run `pip install "moleflow[serve]"` '
                        '(or `pip install "sqlalchemy>=2.0"`)') from exc

SCHEMA_VERSION = 2
DEFAULT_FILE = VERDICT_STORE_FILE
SOURCES = ("serve", "predict", "watch")
DECISIONS = ("normal", "anomalous", "unknown product", "unreadable")
REVIEW_LABELS = ("defect_confirmed", "false_alarm", "good_confirmed", "wrong_product")
BUSY_TIMEOUT_MS = 30_000  # how long a SQLite writer waits for another process's transaction
_PG_LOCK_KEY = 0x6D6F6C65  # "mole": the advisory lock a PostgreSQL migration holds

VERDICT_FIELDS = ("at", "sha256", "path", "product", "nearest_product", "router_distance", "route_margin",
                  "route_ambiguous", "score", "threshold", "decision", "reason", "model_sha256", "engine",
                  "latency_ms", "source")
_FLOAT_FIELDS = ("router_distance", "route_margin", "score", "threshold", "latency_ms")


# ------------------------------------------------------------------------------------------ schema
def _tables_v1(metadata: MetaData) -> tuple[Table, Table, Table]:
    """The tables of schema version 1. A later version changes them through `MIGRATIONS`, never here, so
    that migration 0 -> 1 keeps creating exactly version 1."""
    version = Table("schema_version", metadata,
                    Column("version", Integer, primary_key=True, autoincrement=False),
                    Column("at", String(32), nullable=False))
    verdicts = Table(
        "verdicts", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("at", String(32), nullable=False),
        Column("sha256", String(64), nullable=True),  # None only when the file could not be read at all
        Column("path", Text, nullable=False),
        Column("product", Text, nullable=False),
        Column("nearest_product", Text, nullable=True),
        Column("router_distance", Float, nullable=True),
        Column("route_margin", Float, nullable=True),
        Column("route_ambiguous", Boolean, nullable=True),
        Column("score", Float, nullable=True),
        Column("threshold", Float, nullable=True),
        Column("decision", String(32), nullable=False),
        Column("reason", Text, nullable=True),
        Column("model_sha256", String(64), nullable=True),
        Column("engine", String(16), nullable=True),
        Column("latency_ms", Float, nullable=True),
        Column("source", String(16), nullable=False),
        Index("ix_verdicts_at", "at"),
        Index("ix_verdicts_sha256", "sha256"),
        Index("ix_verdicts_product_at", "product", "at"),
        Index("ix_verdicts_decision_at", "decision", "at"))
    reviews = Table(
        "reviews", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("verdict_id", Integer, ForeignKey("verdicts.id"), nullable=False),
        Column("label", String(32), nullable=False),
        Column("correct_product", Text, nullable=True),
        Column("reviewer", Text, nullable=False),
        Column("at", String(32), nullable=False),
        Column("note", Text, nullable=True),
        Index("ix_reviews_verdict", "verdict_id"),
        Index("ix_reviews_at", "at"))
    return version, verdicts, reviews


def _thumbnails_v2(metadata: MetaData) -> Table:
    """The table schema version 2 adds: one small overlay PNG per verdict (`serve --thumbnails`)."""
    return Table("thumbnails", metadata,
                 Column("verdict_id", Integer, ForeignKey("verdicts.id"), primary_key=True, autoincrement=False),
                 Column("png", LargeBinary, nullable=False),
                 Column("width", Integer, nullable=False),
                 Column("height", Integer, nullable=False))


METADATA = MetaData()
SCHEMA_TABLE, VERDICTS, REVIEWS = _tables_v1(METADATA)  # the current schema (version SCHEMA_VERSION)
THUMBNAILS = _thumbnails_v2(METADATA)


def _create_v1(conn: Connection) -> None:
    """Migration 0 -> 1: an empty database gets the version-1 tables."""
    metadata = MetaData()
    _tables_v1(metadata)
    metadata.create_all(conn)


def _add_thumbnails_v2(conn: Connection) -> None:
    """Migration 1 -> 2: the thumbnails table (the version-1 tables are left as they are)."""
    metadata = MetaData()
    _tables_v1(metadata)  # for the foreign key to verdicts.id
    _thumbnails_v2(metadata).create(conn)


# MIGRATIONS[v] upgrades a store of version v to v + 1, inside the migration's transaction. Version 0 is an
# empty database. A new schema version adds one entry here (ALTER TABLE ... on the tables as they are).
MIGRATIONS: dict[int, Callable[[Connection], None]] = {0: _create_v1, 1: _add_thumbnails_v2}


# ------------------------------------------------------------------------------------------ helpers
def now_iso() -> str:
    """The current UTC time as the store writes it: 2025-01-31T08:15:02.123456+00:00 (sorts as text)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def as_iso(value: str | datetime | None) -> str | None:
    """A time bound for the queries, in the store's format: a datetime (naive = UTC) or an ISO 8601 text
    ("2025-01-31", "2025-01-31T08:00", "...Z", "...+01:00")."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise MoleflowError(f"{value!r} is not a time; write ISO 8601, e.g. 2025-01-31 or "
                                "2025-01-31T08:00:00Z") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat(timespec="microseconds")


def default_url(run_dir: str | Path) -> str:
    """sqlite:///RUN/verdicts.sqlite for a run folder (or its model folder, or a legacy model.pt)."""
    from .checkpoint import find_model

    model = find_model(run_dir)  # RUN/model or RUN/model.pt
    return sqlite_url(model.parent / DEFAULT_FILE)


def sqlite_url(path: str | Path) -> str:
    return f"sqlite:///{Path(path).expanduser().resolve()}"


def resolve_url(spec: str | Path | None, run_dir: str | Path | None = None) -> str:
    """A `--store` value as a SQLAlchemy URL: None -> RUN/verdicts.sqlite; "dialect://..." -> as given;
    anything else is the path of a SQLite file."""
    if spec is None or str(spec) == "":
        if run_dir is None:
            raise MoleflowError("no verdict store given and no run folder to put RUN/verdicts.sqlite in")
        return default_url(run_dir)
    text_spec = str(spec)
    return text_spec if "://" in text_spec else sqlite_url(text_spec)


def model_sha256(run_dir: str | Path) -> str:
    """SHA-256 of the run's RUN/model/manifest.json (of model.pt for a legacy run): the model a verdict
    came from."""
    from .checkpoint import MANIFEST, find_model, sha256_file

    found = find_model(run_dir)
    return sha256_file(found / MANIFEST if found.is_dir() else found)


def content_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def verdict_record(verdict: Mapping[str, Any], *, sha256: str | None, path: str, model_sha256: str | None,
                   engine: str | None, latency_ms: float | None, source: str, at: str | None = None
                   ) -> dict[str, Any]:
    """One row for the store from a verdict dict (`decisions.image_verdict`, the service's JSON verdict or
    an unreadable row: product, nearest_product, score, threshold, decision, router_distance, ...)."""
    ambiguous = verdict.get("route_ambiguous")
    return {"at": at, "sha256": sha256, "path": str(path),  # at None: the time of writing
            "product": verdict.get("product") or "", "nearest_product": verdict.get("nearest_product") or None,
            "router_distance": verdict.get("router_distance"), "route_margin": verdict.get("route_margin"),
            "route_ambiguous": None if ambiguous is None else bool(ambiguous),
            "score": verdict.get("score"), "threshold": verdict.get("threshold"),
            "decision": verdict["decision"], "reason": verdict.get("reason") or None,
            "model_sha256": model_sha256, "engine": engine, "latency_ms": latency_ms, "source": source}


def describe_url(url: str) -> str:
    """What error messages call a store: the SQLite file, or the URL without its password."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return url
    if parsed.get_backend_name() == "sqlite":
        return parsed.database or ":memory:"
    return parsed.render_as_string(hide_password=True)


def _reason(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    return " ".join(str(orig if orig is not None else exc).split()) or type(exc).__name__


def _prefer_installed_driver(url: str) -> str:
    """postgresql:// with psycopg (3) when psycopg2, SQLAlchemy's default driver for it, is not installed."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            try:
                import psycopg  # noqa: F401
            except ImportError:
                return url
            return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return url


# ------------------------------------------------------------------------------------------ the store
class VerdictStore:
    """One verdict database (see the module's docstring). Safe to share between threads; each process
    opens its own."""

    def __init__(self, url: str, migrate: bool = True) -> None:
        self.url = url
        self.name = describe_url(url)
        try:
            self.engine: Engine = create_engine(_prefer_installed_driver(url))
        except (ArgumentError, NoSuchModuleError, ImportError, ValueError) as exc:
            raise MoleflowError(f"{url}: not a database URL this installation can open ({_reason(exc)}); give a "
                                "file path (SQLite) or a URL like postgresql://user@host/db") from None
        self.dialect = self.engine.dialect.name
        if self.dialect == "sqlite":
            database = self.engine.url.database
            if database and database != ":memory:" and not Path(database).parent.is_dir():
                raise MoleflowError(f"{database}: cannot create the verdict store: its folder does not exist")
            _configure_sqlite(self.engine)
        # write transactions: BEGIN IMMEDIATE on SQLite (writers queue on the busy timeout, never deadlock)
        self._writer = self.engine.execution_options(moleflow_immediate=True)
        self._insert = insert(VERDICTS)
        if migrate:
            self.migrate()

    @classmethod
    def open(cls, spec: str | Path | None = None, run_dir: str | Path | None = None) -> "VerdictStore":
        """The store of a `--store` value (None: RUN/verdicts.sqlite of `run_dir`), migrated."""
        return cls(resolve_url(spec, run_dir))

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "VerdictStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VerdictStore({self.name!r})"

    def _fail(self, what: str, exc: BaseException) -> MoleflowError:
        return MoleflowError(f"{self.name}: cannot {what} in the verdict store ({_reason(exc)})")

    # ------------------------------------------------------------------------------ schema version
    def schema_version(self) -> int:
        """The store's schema version (0: an empty database)."""
        try:
            with self.engine.connect() as conn:
                return _read_version(conn, self.name)
        except SQLAlchemyError as exc:
            raise self._fail("read the schema version", exc) from None

    def migrate(self) -> int:
        """Bring the store to `SCHEMA_VERSION` in place (nothing when it is already there); return it."""
        try:
            with self._writer.begin() as conn:
                if self.dialect == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
                version = _read_version(conn, self.name)
                if version > SCHEMA_VERSION:
                    raise MoleflowError(f"{self.name}: verdict store schema version {version} was written by a newer "
                                        f"moleflow (this one knows up to version {SCHEMA_VERSION}); upgrade moleflow "
                                        "or give another --store")
                while version < SCHEMA_VERSION:
                    step = MIGRATIONS.get(version)
                    if step is None:
                        raise MoleflowError(f"{self.name}: no migration from verdict store schema version {version}")
                    step(conn)
                    version += 1
                    conn.execute(insert(SCHEMA_TABLE), {"version": version, "at": now_iso()})
                return version
        except SQLAlchemyError as exc:
            raise self._fail("create or upgrade the tables", exc) from None

    # ------------------------------------------------------------------------------ verdicts
    def _rows(self, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for row in rows:
            record = {name: row.get(name) for name in VERDICT_FIELDS}
            if record["source"] not in SOURCES:
                raise MoleflowError(f"verdict source {record['source']!r}: use one of {', '.join(SOURCES)}")
            if not record["decision"]:
                raise MoleflowError("a verdict needs a decision")
            record["at"] = as_iso(record["at"]) if record["at"] else now_iso()  # one format: comparable as text
            for name in _FLOAT_FIELDS:
                record[name] = _finite(record[name])
            record["path"] = str(record["path"] if record["path"] is not None else "")
            record["product"] = record["product"] or ""
            out.append(record)
        return out

    def add(self, row: Mapping[str, Any]) -> int:
        """Record one verdict (a dict with the `VERDICT_FIELDS`; missing ones are NULL, `at` now); its id."""
        return self.add_many([row], return_ids=True)[0]

    def add_many(self, rows: Sequence[Mapping[str, Any]], return_ids: bool = False) -> list[int]:
        """Record several verdicts in one transaction (one multi-row INSERT); their ids when asked."""
        records = self._rows(rows)
        if not records:
            return []
        try:
            with self._writer.begin() as conn:
                if return_ids:
                    result = conn.execute(self._insert.returning(VERDICTS.c.id, sort_by_parameter_order=True),
                                          records)
                    return [int(r[0]) for r in result]
                conn.execute(self._insert, records)
                return []
        except SQLAlchemyError as exc:
            raise self._fail(f"record {len(records)} verdict{'s' if len(records) != 1 else ''}", exc) from None

    def _where(self, product: str | None, since: Any, until: Any, decision: str | Sequence[str] | None,
               source: str | None, sha256: str | None, reviewed: bool | None = None, before_id: int | None = None
               ) -> list:
        c = VERDICTS.c
        clauses = []
        if product is not None:
            clauses.append(c.product == product)
        if since is not None:
            clauses.append(c.at >= as_iso(since))
        if until is not None:
            clauses.append(c.at < as_iso(until))
        if decision is not None:
            clauses.append(c.decision == decision if isinstance(decision, str) else c.decision.in_(list(decision)))
        if source is not None:
            clauses.append(c.source == source)
        if sha256 is not None:
            clauses.append(c.sha256 == sha256)
        if reviewed is not None:
            has_review = select(REVIEWS.c.id).where(REVIEWS.c.verdict_id == c.id).exists()
            clauses.append(has_review if reviewed else ~has_review)
        if before_id is not None:
            clauses.append(c.id < int(before_id))
        return clauses

    def verdicts(self, product: str | None = None, since: Any = None, until: Any = None,
                 decision: str | Sequence[str] | None = None, source: str | None = None, sha256: str | None = None,
                 limit: int | None = None, newest_first: bool = True, reviewed: bool | None = None,
                 before_id: int | None = None) -> list[dict[str, Any]]:
        """Verdicts as dicts, filtered by product, time (since <= at < until), decision(s), source, image
        hash, whether a person reviewed them, and id (< before_id: to page through newest first); newest
        first unless asked otherwise."""
        order = VERDICTS.c.id.desc() if newest_first else VERDICTS.c.id.asc()
        query = (select(VERDICTS)
                 .where(*self._where(product, since, until, decision, source, sha256, reviewed, before_id))
                 .order_by(order))
        return self._select(query, limit, "read verdicts")

    def _select(self, query, limit: int | None, what: str) -> list[dict[str, Any]]:
        """The rows of `query` (at most `limit`) as dicts; a database error names `what` was being done."""
        if limit is not None:
            query = query.limit(limit)
        try:
            with self.engine.connect() as conn:
                return [dict(row._mapping) for row in conn.execute(query)]
        except SQLAlchemyError as exc:
            raise self._fail(what, exc) from None

    def verdict(self, verdict_id: int) -> dict[str, Any] | None:
        """One verdict by its id, or None."""
        try:
            with self.engine.connect() as conn:
                found = conn.execute(select(VERDICTS).where(VERDICTS.c.id == int(verdict_id))).first()
        except SQLAlchemyError as exc:
            raise self._fail(f"read verdict {verdict_id}", exc) from None
        return dict(found._mapping) if found is not None else None

    def scores(self, product: str, decision: str | Sequence[str], threshold: float | None = None,
               limit: int | None = None, since: Any = None) -> list[tuple[int, str, float, str]]:
        """(id, at, score, decision) of a product's verdicts with these decisions and a score, decided under
        `threshold` (to 1e-9 relative; None: any) at or after `since`, the newest `limit` of them, oldest first
        (the drift monitor's stream, `drift.py`)."""
        c = VERDICTS.c
        clauses = self._where(product, since, None, decision, None, None) + [c.score.is_not(None)]
        if threshold is not None and math.isfinite(threshold):
            band = abs(threshold) * 1e-9
            clauses.append(c.threshold.between(threshold - band, threshold + band))
        query = select(c.id, c.at, c.score, c.decision).where(*clauses).order_by(c.id.desc())
        if limit is not None:
            query = query.limit(limit)
        try:
            with self.engine.connect() as conn:
                rows = [(int(i), str(at), float(sc), str(d)) for i, at, sc, d in conn.execute(query)]
        except SQLAlchemyError as exc:
            raise self._fail(f"read the scores of {product}", exc) from None
        return rows[::-1]

    def counts(self, product: str | None = None, since: Any = None, until: Any = None, source: str | None = None
               ) -> dict[str, int]:
        """How many verdicts per decision (only decisions that occur), with the same filters as `verdicts`."""
        query = (select(VERDICTS.c.decision, func.count()).where(*self._where(product, since, until, None, source,
                                                                              None))
                 .group_by(VERDICTS.c.decision))
        try:
            with self.engine.connect() as conn:
                return {str(d): int(n) for d, n in conn.execute(query)}
        except SQLAlchemyError as exc:
            raise self._fail("count verdicts", exc) from None

    def daily_counts(self, product: str | None = None, since: Any = None, until: Any = None
                     ) -> list[tuple[str, str, str, int, int]]:
        """(day (UTC, YYYY-MM-DD), product, decision, verdicts, of them routed ambiguously) for every day, product
        and decision that occur."""
        day = func.substr(VERDICTS.c.at, 1, 10)
        ambiguous = func.sum(case((VERDICTS.c.route_ambiguous.is_(True), 1), else_=0))
        query = (select(day, VERDICTS.c.product, VERDICTS.c.decision, func.count(), ambiguous)
                 .where(*self._where(product, since, until, None, None, None))
                 .group_by(day, VERDICTS.c.product, VERDICTS.c.decision).order_by(day))
        try:
            with self.engine.connect() as conn:
                return [(str(d), str(p), str(dec), int(n), int(a or 0)) for d, p, dec, n, a in conn.execute(query)]
        except SQLAlchemyError as exc:
            raise self._fail("count verdicts per day", exc) from None

    def known(self, hashes: Iterable[str]) -> dict[str, str]:
        """Of these image hashes, those already recorded -> the decision of their latest verdict."""
        wanted = list(dict.fromkeys(h for h in hashes if h))
        found: dict[str, tuple[int, str]] = {}
        try:
            with self.engine.connect() as conn:
                for start in range(0, len(wanted), 500):
                    chunk = wanted[start:start + 500]
                    query = select(VERDICTS.c.id, VERDICTS.c.sha256, VERDICTS.c.decision).where(
                        VERDICTS.c.sha256.in_(chunk))
                    for vid, sha, decision in conn.execute(query):
                        if sha not in found or vid > found[sha][0]:
                            found[sha] = (vid, decision)
        except SQLAlchemyError as exc:
            raise self._fail("look up image hashes", exc) from None
        return {sha: decision for sha, (_, decision) in found.items()}

    def __len__(self) -> int:
        try:
            with self.engine.connect() as conn:
                return int(conn.execute(select(func.count()).select_from(VERDICTS)).scalar_one())
        except SQLAlchemyError as exc:
            raise self._fail("count verdicts", exc) from None

    # ------------------------------------------------------------------------------ reviews
    def add_review(self, verdict_id: int, label: str, reviewer: str, correct_product: str | None = None,
                   note: str | None = None, at: str | datetime | None = None) -> int:
        """Record a person's review of a verdict; its id. `label`: defect_confirmed, false_alarm (a flagged
        part that is good), good_confirmed (a passed part that is good) or wrong_product (then
        `correct_product` may name the right product)."""
        if label not in REVIEW_LABELS:
            raise MoleflowError(f"review label {label!r}: use one of {', '.join(REVIEW_LABELS)}")
        if not reviewer:
            raise MoleflowError("a review needs the reviewer's name")
        if correct_product is not None and label != "wrong_product":
            raise MoleflowError("correct_product is given only with the label wrong_product")
        row = {"verdict_id": int(verdict_id), "label": label, "correct_product": correct_product,
               "reviewer": reviewer, "at": as_iso(at) if at is not None else now_iso(), "note": note}
        try:
            with self._writer.begin() as conn:
                decided = conn.execute(select(VERDICTS.c.decision).where(VERDICTS.c.id == int(verdict_id))).first()
                if decided is None:
                    raise MoleflowError(f"{self.name}: no verdict {verdict_id} to review")
                if label == "false_alarm" and decided[0] == "normal":
                    raise MoleflowError(f"verdict {verdict_id} passed (normal): a passed part that is good is "
                                        "good_confirmed, not a false alarm")
                if label == "good_confirmed" and decided[0] != "normal":
                    raise MoleflowError(f"verdict {verdict_id} was not passed ({decided[0]}): a good part that was "
                                        "flagged is a false_alarm (or wrong_product)")
                return int(conn.execute(insert(REVIEWS).returning(REVIEWS.c.id), row).scalar_one())
        except SQLAlchemyError as exc:
            raise self._fail("record the review", exc) from None

    def reviews(self, verdict_id: int | None = None, label: str | None = None, since: Any = None,
                until: Any = None, limit: int | None = None, product: str | None = None,
                reviewer: str | None = None) -> list[dict[str, Any]]:
        """Reviews (newest first), each with its verdict's path, product, score and decision; filtered by
        verdict, label, review time (since <= at < until), the verdict's product and the reviewer."""
        r, v = REVIEWS.c, VERDICTS.c
        query = (select(REVIEWS, v.path, v.product, v.score, v.decision, v.sha256)
                 .join(VERDICTS, r.verdict_id == v.id).order_by(r.id.desc()))
        if verdict_id is not None:
            query = query.where(r.verdict_id == int(verdict_id))
        if label is not None:
            query = query.where(r.label == label)
        if since is not None:
            query = query.where(r.at >= as_iso(since))
        if until is not None:
            query = query.where(r.at < as_iso(until))
        if product is not None:
            query = query.where(v.product == product)
        if reviewer is not None:
            query = query.where(r.reviewer == reviewer)
        return self._select(query, limit, "read reviews")

    def _latest(self):
        """Subquery: the id of each reviewed verdict's latest review."""
        return (select(REVIEWS.c.verdict_id, func.max(REVIEWS.c.id).label("review_id"))
                .group_by(REVIEWS.c.verdict_id).subquery())

    def latest_reviews(self, verdict_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """Verdict id -> its latest review (label, correct_product, reviewer, at, note), for those reviewed."""
        wanted = sorted({int(i) for i in verdict_ids})
        latest = self._latest()
        out: dict[int, dict[str, Any]] = {}
        try:
            with self.engine.connect() as conn:
                for start in range(0, len(wanted), 500):
                    chunk = wanted[start:start + 500]
                    query = (select(REVIEWS).join(latest, REVIEWS.c.id == latest.c.review_id)
                             .where(REVIEWS.c.verdict_id.in_(chunk)))
                    for row in conn.execute(query):
                        out[int(row.verdict_id)] = dict(row._mapping)
        except SQLAlchemyError as exc:
            raise self._fail("read reviews", exc) from None
        return out

    def reviewed(self, product: str | None = None, since: Any = None, until: Any = None,
                 decision: str | Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Every reviewed verdict (filtered on the verdict: product, time, decision) with its latest review's
        label, correct_product, reviewer, review_at and note; oldest verdict first."""
        latest = self._latest()
        r, v = REVIEWS.c, VERDICTS.c
        query = (select(VERDICTS, r.label, r.correct_product, r.reviewer, r.at.label("review_at"), r.note,
                        r.id.label("review_id"))
                 .join(latest, latest.c.verdict_id == v.id).join(REVIEWS, r.id == latest.c.review_id)
                 .where(*self._where(product, since, until, decision, None, None)).order_by(v.id))
        try:
            with self.engine.connect() as conn:
                return [dict(row._mapping) for row in conn.execute(query)]
        except SQLAlchemyError as exc:
            raise self._fail("read reviewed verdicts", exc) from None

    # ------------------------------------------------------------------------------ thumbnails
    def add_thumbnails(self, pictures: Mapping[int, tuple[bytes, int, int]]) -> None:
        """Keep a small PNG per verdict: {verdict id: (png bytes, width, height)} (one transaction; a verdict's
        earlier picture is replaced)."""
        if not pictures:
            return
        rows = [{"verdict_id": int(i), "png": bytes(png), "width": int(w), "height": int(h)}
                for i, (png, w, h) in pictures.items()]
        try:
            with self._writer.begin() as conn:
                conn.execute(delete(THUMBNAILS).where(THUMBNAILS.c.verdict_id.in_([r["verdict_id"] for r in rows])))
                conn.execute(insert(THUMBNAILS), rows)
        except SQLAlchemyError as exc:
            raise self._fail(f"record {len(rows)} thumbnails", exc) from None

    def thumbnail(self, verdict_id: int) -> bytes | None:
        """The verdict's kept PNG, or None."""
        try:
            with self.engine.connect() as conn:
                png = conn.execute(select(THUMBNAILS.c.png).where(THUMBNAILS.c.verdict_id == int(verdict_id))).scalar()
        except SQLAlchemyError as exc:
            raise self._fail(f"read the thumbnail of verdict {verdict_id}", exc) from None
        return bytes(png) if png is not None else None

    def thumbnail_ids(self, verdict_ids: Iterable[int]) -> set[int]:
        """Of these verdicts, those with a kept PNG."""
        wanted = sorted({int(i) for i in verdict_ids})
        found: set[int] = set()
        try:
            with self.engine.connect() as conn:
                for start in range(0, len(wanted), 500):
                    query = select(THUMBNAILS.c.verdict_id).where(THUMBNAILS.c.verdict_id.in_(wanted[start:start + 500]))
                    found.update(int(i) for i in conn.execute(query).scalars())
        except SQLAlchemyError as exc:
            raise self._fail("look up thumbnails", exc) from None
        return found


def _read_version(conn: Connection, name: str) -> int:
    tables = set(inspect(conn).get_table_names())
    if "schema_version" not in tables:
        if tables & {"verdicts", "reviews"}:
            raise MoleflowError(f"{name}: has a verdicts table but no schema_version table; it was not written by "
                                "moleflow; give another --store")
        return 0
    value = conn.execute(select(func.max(SCHEMA_TABLE.c.version))).scalar()
    return int(value or 0)


def _configure_sqlite(engine: Engine) -> None:
    """WAL mode, a busy timeout and real transactions on every SQLite connection of `engine`."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # noqa: ANN001
        # the driver leaves transactions to us (pysqlite would not BEGIN before DDL); see the "begin" hook
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")  # first: WAL mode itself may wait for a lock
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")  # WAL: durable across a crash of the process, fsync at checkpoints
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("moleflow_immediate", False)
        # straight to the driver (as exec_driver_sql would, without its bookkeeping: a third of a write's cost)
        conn.connection.driver_connection.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")


def sqlite_journal_mode(store: VerdictStore) -> str:
    """The journal mode of a SQLite store ("wal"), for checks."""
    with store.engine.connect() as conn:
        return str(conn.exec_driver_sql("PRAGMA journal_mode").scalar()).lower()


def store_environment() -> dict[str, str]:
    """Versions of what writes the store (for benchmark records)."""
    import sqlite3

    import sqlalchemy

    return {"sqlalchemy": sqlalchemy.__version__, "sqlite": sqlite3.sqlite_version}
