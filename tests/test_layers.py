"""Who may import whom: the torch modules know no files, no CLI and no server; the model folder knows no model."""

from __future__ import annotations

import ast
import pathlib

import pytest

import moleflow

ROOT = pathlib.Path(moleflow.__file__).parent


def imported_modules(path: pathlib.Path) -> set[str]:
    """The moleflow modules a file imports (anywhere in it, lazy imports included), as dotted names below
    `moleflow` ("store.checkpoint", "cli", ...)."""
    package = path.relative_to(ROOT).parent.parts
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[:len(package) - node.level + 1])
                names = (node.module or "").split(".") if node.module else []
                target = ".".join(base + names)
                out |= {f"{target}.{a.name}".strip(".") for a in node.names} if not node.module else {target}
            elif node.module and node.module.startswith("moleflow"):
                out.add(node.module.removeprefix("moleflow").lstrip("."))
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("moleflow").lstrip(".") for a in node.names if a.name.startswith("moleflow")}
    return out


def _under(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


TORCH_MODULES = ["inspector.py", "model.py", "memory.py", "router.py", "scoring.py", "task_keys.py",
                 *[str(p.relative_to(ROOT)) for p in (ROOT / "nn").glob("*.py")]]


@pytest.mark.parametrize("name", TORCH_MODULES)
def test_torch_modules_import_no_store_cli_or_server(name):
    bad = {m for m in imported_modules(ROOT / name) if _under(m, ("store", "cli", "serve"))}
    assert not bad, f"{name} imports {sorted(bad)}"


def test_the_model_folder_does_not_import_the_model():
    bad = {m for m in imported_modules(ROOT / "store" / "checkpoint.py")
           if _under(m, ("detector", "inspector", "learning", "engine", "pipeline", "cli", "serve"))}
    assert not bad, f"store/checkpoint.py imports {sorted(bad)}"


@pytest.mark.parametrize("name", ["detector.py", "learning.py", "features.py", "pipeline.py", "engine.py",
                                  "export.py", "trainer.py", "parallel.py", "calibration.py", "task_info.py"])
def test_the_library_imports_no_cli_or_server(name):
    bad = {m for m in imported_modules(ROOT / name) if _under(m, ("cli", "serve"))}
    assert not bad, f"{name} imports {sorted(bad)}"


def test_the_import_check_sees_relative_and_lazy_imports():
    """The checker itself: a lazy relative import inside a function is seen."""
    found = imported_modules(ROOT / "store" / "verdicts.py")
    assert "store.checkpoint" in found
