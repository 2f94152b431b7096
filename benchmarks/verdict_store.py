"""What recording a verdict costs: single inserts and one batch insert into the SQLite verdict store (WAL).

    python benchmarks/verdict_store.py [--n 2000] [--repeats 3] [--json benchmarks/results/verdict_store.json]

Each repeat opens a new store in a temporary folder (`RUN/verdicts.sqlite` as `moleflow serve`, `predict
--record` and `watch` open it: WAL, synchronous=NORMAL, busy timeout, BEGIN IMMEDIATE per write), then times
  * N single inserts, one transaction each (`VerdictStore.add`, what one image per request costs),
  * N single inserts that also return their row id (`add_many([row], return_ids=True)`, what `serve` does),
  * one batch insert of N verdicts in one transaction (`add_many`, what predict and watch do per batch),
with realistic rows (64-hex hashes, a path, floats, a decision). Reported: milliseconds per verdict (median
over repeats, and each repeat) and the database size per verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from moleflow.store.verdicts import VerdictStore, sqlite_journal_mode, sqlite_url, store_environment


def rows(n: int, offset: int = 0) -> list[dict]:
    return [{"sha256": f"{offset + i:064x}", "path": f"/line3/inbox/part_{offset + i:07d}.png", "product": "brick",
             "nearest_product": "brick", "router_distance": 12.5 + i % 7, "route_margin": 3.25, "route_ambiguous": False,
             "score": 1.0 + (i % 13) / 10, "threshold": 2.0, "decision": "anomalous" if i % 50 == 0 else "normal",
             "model_sha256": "d" * 64, "engine": "onnx", "latency_ms": 28.7, "source": "serve"} for i in range(n)]


def one_repeat(n: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "verdicts.sqlite"
        store = VerdictStore(sqlite_url(path))
        assert sqlite_journal_mode(store) == "wal"
        store.add(rows(1, 10**6)[0])  # the first connection and statement compilation are not timed

        singles = rows(n)
        start = time.perf_counter()
        for row in singles:
            store.add(row)
        single_ms = 1000 * (time.perf_counter() - start) / n

        with_ids = rows(n, n)
        start = time.perf_counter()
        for row in with_ids:
            store.add_many([row], return_ids=True)
        returning_ms = 1000 * (time.perf_counter() - start) / n

        batch = rows(n, 2 * n)
        start = time.perf_counter()
        store.add_many(batch)
        batch_ms = 1000 * (time.perf_counter() - start) / n

        assert len(store) == 3 * n + 1
        store.close()
        size = sum(p.stat().st_size for p in Path(folder).glob("verdicts.sqlite*"))
    return {"single_ms_per_verdict": single_ms, "single_with_id_ms_per_verdict": returning_ms,
            "batch_ms_per_verdict": batch_ms, "bytes_per_verdict": size / (3 * n + 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="verdicts per measurement (default 2000)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    repeats = [one_repeat(args.n) for _ in range(args.repeats)]
    result = {"command": "python benchmarks/verdict_store.py " + " ".join(os.sys.argv[1:]), "n": args.n,
              "median": {k: statistics.median(r[k] for r in repeats) for k in repeats[0]}, "repeats": repeats,
              "environment": {**store_environment(), "python": platform.python_version(),
                              "machine": platform.machine(), "load_average": os.getloadavg()}}
    med = result["median"]
    print(f"{args.n} verdicts, median of {args.repeats}: single insert {med['single_ms_per_verdict']:.3f} ms/verdict, "
          f"single with id {med['single_with_id_ms_per_verdict']:.3f} ms, batch {med['batch_ms_per_verdict']:.4f} "
          f"ms/verdict; {med['bytes_per_verdict']:.0f} bytes/verdict")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
