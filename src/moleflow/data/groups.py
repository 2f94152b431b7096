"""Which training images show the same physical part: groups read from a product's provenance file, and hold-outs
that keep a group whole.

Why. Images held out of training (for the decision threshold, or for `moleflow tune`'s validation) stand in for new
parts. A data set often holds several images of one part (magnetic_tile photographs each tile under six lightings:
666 training images of 107 tiles); a random split then holds out images whose twins were learned, which look
more normal than a new part does. The conformal threshold assumes held-out images exchangeable with new parts, and a
validation should rank settings as new parts would: both want whole parts held out. Test sets are usually split
that way (magnetic_tile's, kolektor's and pcb_deeppcb's test groups share no group with training).

The file. `<product folder>/<name>` (default `provenance.csv`, `data.group_file`), a CSV with a header that has at
least the columns `file` (the image's path relative to the product folder, e.g. `train/good/001.png`) and `group`
(any text; images with the same text are one part). It is looked for in the image's folder and up to three folders
above it. An image the file does not list is a group of its own; without any file every image is.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import MoleflowError

SEARCH_DEPTH = 3  # good/ -> train/ -> the product folder


def _read_groups(path: Path) -> dict[str, str]:
    """`file` -> `group` of one group file (paths relative to the file's folder, '/'-separated)."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields = set(reader.fieldnames or [])
            if not {"file", "group"} <= fields:
                raise MoleflowError(f"{path}: a group file needs the columns 'file' and 'group' (has "
                                    f"{', '.join(sorted(fields)) or 'none'}); fix it, or set data.group_file=null "
                                    "to hold images out one by one")
            return {row["file"].replace("\\", "/"): row["group"] for row in reader if row.get("group")}
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise MoleflowError(f"{path}: cannot read the group file ({err}); fix it, or set data.group_file=null") from err


def image_groups(images: Sequence[object] | torch.Tensor, file_name: str | None) -> list[str] | None:
    """One group label per image: the group its product's `file_name` gives it, else the image's own path.
    None when no image is listed in any such file (tensors and in-memory images have no file), so that callers
    split image by image as before."""
    if file_name is None or isinstance(images, torch.Tensor):
        return None
    tables: dict[Path, dict[str, str] | None] = {}  # folder -> its group file's table (None: no file there)
    groups: list[str] = []
    listed = False
    for image in images:
        if not isinstance(image, (str, Path)):
            return None
        path = Path(image).resolve()
        label = None
        for folder in list(path.parents)[:SEARCH_DEPTH + 1]:
            if folder not in tables:
                candidate = folder / file_name
                tables[folder] = _read_groups(candidate) if candidate.is_file() else None
            table = tables[folder]
            if table is not None:
                label = table.get(path.relative_to(folder).as_posix())
                if label is not None:
                    label = f"{folder}::{label}"
                break
        listed = listed or label is not None
        groups.append(label if label is not None else str(path))
    return groups if listed else None


def group_members(groups: Sequence[str]) -> list[list[int]]:
    """The indices of each group's images, the groups in the order they first appear."""
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    return list(members.values())


def whole_groups_fit(members: list[list[int]], n_out: int) -> bool:
    """Whether whole groups can make a hold-out of `n_out` images without missing it by too much: no group holds more
    than half of them (else callers hold images out one by one)."""
    return bool(members) and max(len(m) for m in members) * 2 <= n_out


def group_holdout(groups: Sequence[str], n_out: int, generator: torch.Generator) -> torch.Tensor | None:
    """Indices of at least `n_out` images made of whole groups, the groups taken in a random order (`generator`)
    until `n_out` is reached; None when they do not fit (`whole_groups_fit`)."""
    if n_out <= 0:
        return torch.zeros(0, dtype=torch.long)
    members = group_members(groups)
    if not whole_groups_fit(members, n_out):
        return None
    out: list[int] = []
    for j in torch.randperm(len(members), generator=generator).tolist():
        if len(out) >= n_out:
            break
        out.extend(members[j])
    return torch.tensor(sorted(out), dtype=torch.long)
