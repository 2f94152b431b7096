"""Who may import whom, beyond test_architecture.py's rules: the torch modules know no files, no command line and
no service; the model folder knows no model (issue 25). Imports inside functions count too."""

from __future__ import annotations

import pytest

from test_architecture import import_graph

TORCH_MODULES = ["moleflow.inspector", "moleflow.model", "moleflow.memory", "moleflow.router", "moleflow.scoring",
                 "moleflow.task_keys", "moleflow.nn.lora", "moleflow.nn.coupling", "moleflow.nn.adapters",
                 "moleflow.nn.dia", "moleflow.nn.init"]
ABOVE_THE_MODEL_FOLDER = ["moleflow.detector", "moleflow.learning", "moleflow.inspector", "moleflow.pipeline",
                          "moleflow.engine", "moleflow.features"]


def _imports(module: str) -> set[str]:
    import networkx as nx

    graph = import_graph()
    graph.remove_node("moleflow")  # the package's face (its `__version__`) re-exports the facade
    assert module in graph, f"{module} is not a module of the package"
    return set(nx.descendants(graph, module))  # what it imports, directly or through others


@pytest.mark.parametrize("module", TORCH_MODULES)
def test_torch_modules_import_no_store_cli_or_service(module):
    wrong = sorted(m for m in _imports(module)
                   if m.split(".")[1] in ("store", "cli", "serve", "detector", "learning", "engine"))
    assert not wrong, f"{module} imports {wrong}"


def test_the_model_folder_imports_no_model():
    wrong = sorted(set(_imports("moleflow.store.checkpoint")) & set(ABOVE_THE_MODEL_FOLDER))
    assert not wrong, f"store/checkpoint.py imports {wrong}"


def test_the_import_graph_sees_lazy_relative_imports():
    """The rule's reader sees an import inside a function (store/verdicts.py imports the model folder lazily)."""
    assert "moleflow.store.checkpoint" in _imports("moleflow.store.verdicts")
