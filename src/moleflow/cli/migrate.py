"""`moleflow migrate`: convert a moleflow 0.1 run (one model.pt) into the checked model folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..detector import MoleFlow
from ..errors import MoleflowError
from ..store import run_lock
from ..store.checkpoint import LEGACY_FILE, find_model
from .common import add_lock_option

EXAMPLES = """examples:
  moleflow migrate runs/old_run      # runs/old_run/model.pt -> runs/old_run/model/ (manifest + safetensors)
"""


def add_parser(sub) -> None:
    p = sub.add_parser("migrate", help="convert an old single-file run (model.pt) to the checked model folder",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Load RUN_DIR/model.pt safely (tensors only, no code), check that the model "
                                   "scores the same after conversion, write RUN_DIR/model/ and remove model.pt.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--backbone-weights", help="backbone weights file, if the run's is not found here")
    add_lock_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    with run_lock(args.run_dir, args.wait):
        found = find_model(args.run_dir)
        if found.suffix != ".pt":
            print(f"{args.run_dir} already holds a model folder ({found}); nothing to do")
            return 0
        old = MoleFlow.load(found, backbone_weights=args.backbone_weights)
        size = old.config.data.image_size
        probe = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
        expected = old.predict(probe).scores
        folder = old.save(found.parent)
        if not torch.equal(MoleFlow.load(folder, backbone_weights=args.backbone_weights).predict(probe).scores,
                           expected):
            raise MoleflowError(f"{folder}: the converted model scores differently; {found} is kept; please report this")
        found.unlink()
    print(f"converted {found} into {folder} ({len(old.tasks)} tasks); {LEGACY_FILE} removed")
    return 0
