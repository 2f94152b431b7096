"""Reorganising the code changes no output: a fixed-seed run's results.json and scores equal the stored golden.

The golden was written by `python tests/golden_run.py` before the issue-25 reorganisation. Bit-identical floats
need the same torch build on the same kind of CPU; elsewhere scores are compared to 1e-5 relative, and the
test says which comparison it made.
"""

from __future__ import annotations

import json
import math

import golden_run


def _close(a, b, path=""):
    if isinstance(a, dict):
        assert set(a) == set(b), (path, sorted(set(a) ^ set(b)))
        for k in a:
            _close(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7), (path, a, b)
    else:
        assert a == b, (path, a, b)


def _csv_close(a: str, b: str, name: str):
    rows_a, rows_b = a.splitlines(), b.splitlines()
    assert len(rows_a) == len(rows_b), name
    for ra, rb in zip(rows_a, rows_b):
        for x, y in zip(ra.split(","), rb.split(",")):
            try:
                _close(float(x), float(y), name)
            except ValueError:
                assert x == y, (name, ra, rb)


def test_fixed_seed_run_matches_the_golden(tmp_path):
    golden = json.loads(golden_run.GOLDEN.read_text())
    got = golden_run.run(tmp_path)
    here = golden_run.made_on()
    same_machine = {k: here[k] for k in ("torch", "cpu")} == {k: golden["made_on"][k] for k in ("torch", "cpu")}
    if same_machine:
        print("golden comparison: byte-identical (same torch build and CPU model as the golden)")
        assert got["scores"] == golden["scores"]
        assert got["results"] == golden["results"]
        assert golden_run.digest(got) == golden["made_on"]["sha256"]
    else:
        print(f"golden comparison: to 1e-5 (golden made with {golden['made_on']}, here {here})")
        for name, text in golden["scores"].items():
            _csv_close(got["scores"][name], text, name)
        _close(got["results"], golden["results"])
