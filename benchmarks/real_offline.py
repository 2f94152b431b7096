"""Real-data continual benchmark: magnetic_tile -> kolektor -> pcb_deeppcb -> cubes, offline, CPU preset.

    python benchmarks/real_offline.py [--data ../shared/datasets] [--out runs/bench_real]

Equivalent to `moleflow bench real`; writes benchmarks/results/real_offline.json.
"""

import sys
from pathlib import Path

from moleflow.cli import main

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    args = sys.argv[1:]
    defaults = {"--data": str(here.parent.parent / "shared" / "datasets"), "--out": "runs/bench_real",
                "--json": str(here / "results" / "real_offline.json")}
    for flag, value in defaults.items():
        if flag not in args:
            args += [flag, value]
    sys.exit(main(["bench", "real", "--preset", "cpu"] + args))
