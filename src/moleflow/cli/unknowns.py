"""`moleflow unknowns`: the parts the line called "unknown product": list them, cluster them, export them for
`moleflow add-task --discover`."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from ..errors import MoleflowError

EXAMPLES = """examples:
  moleflow unknowns runs/real                          # how many, since when, nearest products
  moleflow unknowns runs/real --cluster                # how many products they seem to be (discover.py)
  moleflow unknowns runs/real --export                 # copies into runs/real/unknowns/<date>/ + pile.json
  moleflow unknowns runs/real --export /data/line4_new --link --since 2025-03-01
  moleflow add-task runs/real --discover --data runs/real/unknowns/<date> --name new-
The pile: verdicts "unknown product" in the store, less parts a person reviewed as a learned product
(wrong_product naming it) or as defective, and parts already exported (each export writes pile.json, which
later piles leave out; --all offers them again). Only parts whose image file still exists with its recorded
content can be exported (serve uploads: start the service with --keep-images).
"""


def add_parser(sub) -> None:
    p = sub.add_parser("unknowns", help="parts of no learned product: list, cluster, export for add-task --discover",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--store", metavar="URL|FILE", help="the verdict store (default RUN_DIR/verdicts.sqlite)")
    p.add_argument("--since", help="only parts inspected at or after this time (ISO 8601)")
    p.add_argument("--until", help="only parts inspected before this time")
    p.add_argument("--all", action="store_true", help="include parts exported before")
    p.add_argument("--export", nargs="?", const="", metavar="DIR",
                   help="copy the pile's images into DIR (default RUN_DIR/unknowns/<date>/) with pile.json")
    p.add_argument("--link", action="store_true", help="with --export: symbolic links instead of copies")
    p.add_argument("--cluster", action="store_true", help="cluster the pile into products (loads the model)")
    p.add_argument("--backbone-weights", help="backbone weights file, if the run's is not found here")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..feedback import cluster_pile, default_export_dir, discover_command, export_pile, unknown_pile
    from ..store.checkpoint import read_tasks
    from ..store.verdicts import VerdictStore

    if args.link and args.export is None:
        raise MoleflowError("--link goes with --export")
    _, tasks = read_tasks(args.run_dir)
    with VerdictStore.open(args.store, run_dir=args.run_dir) as store:
        pile = unknown_pile(store, args.run_dir, learned=[t["name"] for t in tasks], since=args.since,
                            until=args.until, include_exported=args.all)
    if not pile:
        print("no unknown-product parts" + ("" if args.all else " waiting (not exported yet)"))
        return 0
    with_files = [r for r in pile if r["file"]]
    nearest = Counter(r.get("nearest_product") or "?" for r in pile)
    print(f"{len(pile)} unknown-product parts, {pile[0]['at'][:19]} to {pile[-1]['at'][:19]}; {len(with_files)} with "
          f"their image file; nearest learned product: " + ", ".join(f"{n} {p}" for p, n in nearest.most_common()))
    if args.cluster:
        from ..detector import MoleFlow

        model = MoleFlow.load(args.run_dir, backbone_weights=args.backbone_weights)
        found = cluster_pile(model, with_files)
        print(f"they look like {found['k']} product(s) ({found['method']}): "
              + ", ".join(f"{c['name']} {c['n']} parts" for c in found["clusters"]))
    if args.export is not None:
        dest = Path(args.export) if args.export else default_export_dir(args.run_dir)
        summary = export_pile(pile, dest, link=args.link)
        print(f"exported {len(summary['parts'])} parts to {dest} ({summary['mode']})"
              + (f"; {len(summary['missing'])} without their image file (not exported)" if summary["missing"] else ""))
        if summary["parts"]:
            print(f"learn them: {discover_command(args.run_dir, dest)}")
    return 0
