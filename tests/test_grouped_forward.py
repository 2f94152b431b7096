"""One flow forward for a mixed batch: rows routed to different products are scored in one pass (each row through
its own expert) and get the scores and maps they get when each product's rows are scored alone."""

from __future__ import annotations

import pytest
import torch

from moleflow import MoleFlow
from moleflow.data.batch import Prepared
from moleflow.inspector import Inspector
from moleflow.pipeline import TorchBackend, inspect
from moleflow.model import CPU_TOKENS_PER_PASS, SHARED_FLOW, ExpertFlow, FlowStack

from helpers import product_images, random_images, tiny_config

N_TASKS = 4
ROW_TASKS = [2, 0, 3, 1, 2, 0, 0, 3, 1, 2]  # a mixed batch: every product, interleaved
TOL = 1e-5  # relative to the score scale: the grouped matmuls may round differently from one product's


def _inspector(**overrides) -> Inspector:
    """A complete inspector of N_TASKS distinct experts (random weights; no training), thresholds and, with
    `score.source=flow+memory`, a patch memory per product."""
    cfg = tiny_config(**{"backbone.random_weights": True, **overrides})
    inspector = Inspector(cfg)
    for _ in range(N_TASKS):
        inspector.add_expert()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move every expert off its (partly no-op) initial values so that experts differ
        for p in inspector.flow.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    h, w = inspector.grid
    for t in range(N_TASKS):
        inspector.set_threshold(t, 0.0)
        if inspector.memory is not None:
            inspector.memory.add_task(t, torch.randn(3, h, w, inspector.flow.dim, generator=gen) + t)
            inspector.memory.set_norm(t, torch.randn(2, h, w, generator=gen) * t + 5,
                                      torch.rand(2, h, w, generator=gen) + t)
    return inspector


def _tokens(inspector: Inspector, n: int, seed: int = 1) -> torch.Tensor:
    h, w = inspector.grid
    return torch.randn(n, h, w, inspector.flow.dim, generator=torch.Generator().manual_seed(seed))


def _assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = max(1.0, float(b.abs().max()))
    assert a.shape == b.shape and float((a - b).abs().max()) <= TOL * scale


CONFIGS = {
    "whitening+dia+lora": {},
    "soft_ln": {"model.task_adapter": "soft_ln"},
    "no_dia": {"model.dia_blocks": 0},
    "no_lora": {"model.use_lora": False},
    "no_lora_no_task_bias_no_adapter": {"model.use_lora": False, "model.use_task_bias": False,
                                        "model.task_adapter": "none", "model.use_scale_context": False},
    "flow+memory": {"score.source": "flow+memory"},
    "task_separated": {"model.task_separated": True},
}


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_mixed_batch_scores_equal_per_product_scores(overrides):
    inspector = _inspector(**overrides)
    tokens = _tokens(inspector, len(ROW_TASKS))
    ids = torch.tensor(ROW_TASKS)
    tasks = list(range(N_TASKS))
    with torch.no_grad():
        mixed = inspector.expert_scores(tokens, ids, tasks)
        alone = torch.empty_like(mixed)
        for t in tasks:
            rows = (ids == t).nonzero().squeeze(1)
            alone[rows] = inspector.expert_scores(tokens[rows], torch.zeros(len(rows), dtype=torch.long), [t])
    _assert_close(mixed, alone)
    # the flow's own outputs too, row by row: NLL, log-det and latent
    flow = inspector.flow
    with torch.no_grad():
        out = flow.forward_rows(tokens, ids)
        for t in tasks:
            rows = (ids == t).nonzero().squeeze(1)
            ref = flow(tokens[rows], t)
            for name in ("nll", "logdet", "z"):
                _assert_close(getattr(out, name)[rows], getattr(ref, name))


@pytest.mark.parametrize("overrides", [CONFIGS["whitening+dia+lora"], CONFIGS["flow+memory"]],
                         ids=["flow", "flow+memory"])
def test_inspect_of_a_mixed_batch_equals_inspecting_each_product_alone(overrides):
    """Scores, maps and decisions of images given to different products (oracle ids) in one batch."""
    inspector = _inspector(**overrides)
    size = inspector.config.data.image_size
    pixels = random_images(3, len(ROW_TASKS), size)
    ids = torch.tensor(ROW_TASKS)
    backend = TorchBackend(inspector)
    mixed = inspect(inspector, backend, Prepared.square(pixels), ids)
    assert mixed.task_ids.tolist() == ROW_TASKS
    for t in range(N_TASKS):
        rows = (ids == t).nonzero().squeeze(1)
        alone = inspect(inspector, backend, Prepared.square(pixels[rows]), ids[rows])
        _assert_close(mixed.scores[rows], alone.scores)
        _assert_close(mixed.maps[rows], alone.maps)
        _assert_close(mixed.patch_scores[rows], alone.patch_scores)


def test_a_batch_of_one_product_is_its_experts_plain_forward():
    """Bit-identical: one product's rows take the per-task forward (the training path), grouped or not."""
    inspector = _inspector(**{"score.source": "flow+memory"})
    tokens = _tokens(inspector, 5)
    with torch.no_grad():
        out = inspector.flow.forward_rows(tokens, [3] * 5)
        ref = inspector.flow(tokens, 3)
        assert all(torch.equal(getattr(out, n), getattr(ref, n)) for n in ("nll", "logdet", "z"))
        scores = inspector.expert_scores(tokens, torch.full((5,), 1), [0, 3])
        assert torch.equal(scores, inspector.patch_scores(tokens, 3).float())


def _count_flow_passes(inspector: Inspector) -> list[int]:
    """Calls of the coupling blocks (any FlowStack, shared or per task) are counted into the returned list."""
    calls = [0]
    for stack in inspector.flow.flows.values():
        assert isinstance(stack, FlowStack)
        stack.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("source", ["flow", "flow+memory"])
def test_a_batch_of_k_products_runs_one_flow_pass(source):
    inspector = _inspector(**{"score.source": source})
    calls = _count_flow_passes(inspector)
    tokens = _tokens(inspector, len(ROW_TASKS))
    assert inspector.flow.rows_per_pass(tokens, 64) >= len(ROW_TASKS)  # the whole batch fits one pass
    with torch.no_grad():
        inspector.expert_scores(tokens, torch.tensor(ROW_TASKS), list(range(N_TASKS)))
    assert calls[0] == 1
    calls[0] = 0
    with torch.no_grad():  # chunks of batch_size rows: one pass per chunk, not per product
        inspector.expert_scores(tokens, torch.tensor(ROW_TASKS), list(range(N_TASKS)), batch_size=4)
    assert calls[0] == 3


def test_task_separated_flows_fall_back_to_one_pass_per_product():
    inspector = _inspector(**CONFIGS["task_separated"])
    assert SHARED_FLOW in inspector.flow.flows and "1" in inspector.flow.flows
    calls = _count_flow_passes(inspector)
    with torch.no_grad():
        inspector.expert_scores(_tokens(inspector, len(ROW_TASKS)), torch.tensor(ROW_TASKS), list(range(N_TASKS)))
    assert calls[0] == N_TASKS


def test_cpu_passes_hold_a_bounded_number_of_patches():
    tokens = torch.zeros(64, 28, 28, 8)
    assert ExpertFlow.rows_per_pass(tokens, 32) == CPU_TOKENS_PER_PASS // (28 * 28)
    assert ExpertFlow.rows_per_pass(torch.zeros(2, 200, 200, 8), 32) == 1
    assert ExpertFlow.rows_per_pass(torch.zeros(64, 2, 2, 8), 32) == 32


def test_unlearned_task_in_a_mixed_batch_is_refused():
    inspector = _inspector()
    with pytest.raises(ValueError, match="task 7 is not learned"):
        inspector.flow.forward_rows(_tokens(inspector, 2), [0, 7])


def test_routed_predict_of_mixed_products_equals_predicting_each_product_alone():
    """A learned model (patch memory on): images the router sends to different products, in one batch."""
    products = ("brick", "coins", "grass", "camera")
    images = product_images(products, n_train=6, n_test_good=2)
    model = MoleFlow(tiny_config(**{"train.epochs": 1, "score.source": "flow+memory"}))
    for name in products:
        model.fit_task(images[name][0], name=name)
    mixed_images = [img for i in range(2) for name in products for img in images[name][1][i:i + 1]]
    mixed = model.predict(mixed_images)
    assert sorted(set(mixed.task_ids.tolist())) == [0, 1, 2, 3]  # really routed to every product
    for t in range(N_TASKS):
        rows = (mixed.task_ids == t).nonzero().squeeze(1).tolist()
        alone = model.predict([mixed_images[i] for i in rows])
        assert alone.task_ids.tolist() == [t] * len(rows)
        _assert_close(mixed.scores[rows], alone.scores)
        _assert_close(mixed.maps[rows], alone.maps)
        assert torch.equal(mixed.anomalous[rows], alone.anomalous)
