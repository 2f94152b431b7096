"""The configuration table of BENCHMARKS.md: synthetic validation (tune) next to the shared test sets.

    python benchmarks/accuracy_table.py --tune runs/tune --real cpu12=benchmarks/results/real_offline.json \
        --real concat+steps+memory=runs/real_concat+steps+memory/results.json ... [--json OUT]

The validation column is what chose the default; the test columns were measured afterwards. The rank
agreement between the two (Spearman's rho, Kendall's tau over the candidates that have both) says how far
the synthetic ranking can be trusted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scipy.stats import kendalltau, spearmanr

MASKED = ("magnetic_tile", "kolektor", "pcb_deeppcb")


def test_summary(results: dict) -> dict:
    final = results["final"]
    pix = {k: [final[c][k] for c in MASKED if c in final and final[c].get(k) is not None]
           for k in ("pixel_auroc", "pixel_ap", "aupro")}
    train = results.get("train_seconds_per_task") or dict(zip(final, results.get("timing", {}).get("train_seconds", [])))
    return {"image_auroc": {c: final[c]["image_auroc"] for c in final},
            "mean_image_auroc": sum(final[c]["image_auroc"] for c in final) / len(final),
            **{f"masked_{k}": (sum(v) / len(v) if v else None) for k, v in pix.items()},
            "routing": results["final_mean"]["routing_accuracy"], "train_seconds": train}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune", type=Path, action="append", required=True, help="tune output folder(s) or tune.json file(s)")
    ap.add_argument("--real", action="append", default=[], metavar="NAME=RESULTS_JSON")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = {}
    for folder in args.tune:
        for r in json.loads((folder if folder.is_file() else folder / "tune.json").read_text())["candidates"]:
            rows[r["name"]] = {"validation_score": r["validation_score"],
                               "validation_image_auroc": r["validation_mean"]["image_auroc"],
                               "validation_pixel_auroc": r["validation_mean"]["pixel_auroc"],
                               "tune_seconds": r["seconds"]}
    for item in args.real:
        name, path = item.split("=", 1)
        rows.setdefault(name, {})["test"] = test_summary(json.loads(Path(path).read_text()))
    head = ("| candidate | validation score | syn. I-AUROC | syn. P-AUROC | test I-AUROC mean | magnetic_tile | kolektor "
            "| pcb_deeppcb | cubes | P-AUROC (masked) | P-AP | AUPRO | train s/task (max) |")
    print(head)
    print("|" + "|".join(["---"] * (head.count("|") - 1)) + "|")
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
    for name, r in rows.items():
        t = r.get("test")
        cells = [name, pct(r.get("validation_score")), pct(r.get("validation_image_auroc")),
                 pct(r.get("validation_pixel_auroc"))]
        if t:
            secs = [s for s in (t["train_seconds"].values() if isinstance(t["train_seconds"], dict)
                                else t["train_seconds"]) if s is not None]
            cells += [pct(t["mean_image_auroc"])] + [pct(t["image_auroc"].get(c)) for c in
                                                      ("magnetic_tile", "kolektor", "pcb_deeppcb", "cubes")]
            cells += [pct(t["masked_pixel_auroc"]), pct(t["masked_pixel_ap"]), pct(t["masked_aupro"]),
                      f"{max(secs):.0f}" if secs else "–"]
        else:
            cells += ["not run"] + ["–"] * 8
        print("| " + " | ".join(cells) + " |")
    both = [(r["validation_score"], r["test"]["mean_image_auroc"]) for r in rows.values()
            if "test" in r and r.get("validation_score") is not None]
    if len(both) >= 3:
        rho, tau = spearmanr(*zip(*both)).statistic, kendalltau(*zip(*both)).statistic
        print(f"\nrank agreement, validation score vs test mean I-AUROC over {len(both)} candidates: "
              f"Spearman rho {rho:.2f}, Kendall tau {tau:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
