"""Routing between look-alike products: the patch vote, the gated router, the ambiguity rule, confusability."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moleflow import MoleFlow, MoleflowError
from moleflow.export import export_onnx, predict_onnx
from moleflow.router import fitting_patches, masked_median, patch_misfit

from helpers import product_images, random_images, tiny_config

SHIFTS = (0.0, 1.5, -1.5)


def test_patch_misfit_ignores_a_minority_of_foreign_patches():
    z = torch.zeros(3, 2, 10, 10)  # 3 images, 2 products
    z[:, 1] = 1.0  # product 1 fits worse everywhere ...
    z[:, 0, :3] = 50.0  # ... except under a "defect" over 30 % of the patches, where product 0 fits terribly
    for statistic in ("median", "vote"):
        misfit = patch_misfit(z, statistic=statistic)
        assert misfit.shape == (3, 2) and misfit.argmin(1).tolist() == [0, 0, 0], statistic
    assert patch_misfit(z, statistic="median")[0].tolist() == [0.0, 1.0]
    assert patch_misfit(z, statistic="vote")[0].tolist() == pytest.approx([-0.7, -0.3])
    # the tiles of one image are averaged: image 0 has tiles 0 and 1, image 1 has tile 2
    z[1, 0] = 9.0
    tiled = patch_misfit(z, torch.tensor([0, 0, 1]), 2, "median")
    assert tiled[0].tolist() == [4.5, 1.0] and tiled[1].tolist() == [0.0, 1.0]
    with pytest.raises(MoleflowError, match="unknown patch statistic"):
        patch_misfit(z, statistic="mode")


def test_paired_misfit_compares_products_on_the_patches_that_fit_best():
    z = torch.full((1, 2, 10, 10), 2.0)  # 1 image, 2 products
    z[0, 1] = 2.2  # product 1 fits a little worse on the normal patches ...
    z[0, 0, :4] = 40.0  # ... a "defect" on 40 % of the patches fits product 1 less badly than product 0
    z[0, 1, :4] = 20.0
    paired = patch_misfit(z, statistic="paired", normal_share=0.5)
    assert paired[0].tolist() == pytest.approx([2.0, 2.2])  # the defect's patches dropped out
    everything = patch_misfit(z, statistic="paired", normal_share=1.0)  # the geometric mean over all patches
    assert everything.argmin(1).tolist() == [1]  # lets the defect decide
    z[0, 1] = float("inf")  # a product that is no candidate stays out
    assert patch_misfit(z, statistic="paired")[0, 1] == float("inf")


def test_patch_modes_need_a_patch_memory():
    with pytest.raises(MoleflowError, match="needs score.source=flow\\+memory"):
        tiny_config(**{"router.mode": "gated"})
    with pytest.raises(MoleflowError, match="router.trim_limit"):
        tiny_config(**{"router.trim_limit": 5.0})
    with pytest.raises(MoleflowError, match="router.trim_limit"):
        tiny_config(**{"router.trim_limit": 5.0, "router.mode": "gated", "score.source": "flow+memory"})
    with pytest.raises(MoleflowError, match="router.mode"):
        tiny_config(**{"router.mode": "nearest", "score.source": "flow+memory"})


@pytest.fixture(scope="module")
def model() -> MoleFlow:
    m = MoleFlow(tiny_config(**{"score.source": "flow+memory", "router.mode": "gated", "train.epochs": 1}))
    for i, shift in enumerate(SHIFTS):
        m.fit_task(random_images(i, 14, shift=shift), name=f"product{i}")
    return m


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    parts = [random_images(100 + i, 2, shift=shift) for i, shift in enumerate(SHIFTS)]
    mixed = torch.stack([p[j] for j in range(2) for p in parts])  # interleaved products
    defect = mixed[:1].clone()
    defect[:, :, 30:80, 30:80] += 6.0  # a large defect on a product-0 part
    return torch.cat([mixed, defect])


def _with_router(model: MoleFlow, **fields):
    """Context: the model's router settings changed for a block (routing happens at inference only)."""
    class _Ctx:
        def __enter__(self):
            self.old = {k: getattr(model.config.router, k) for k in fields}
            for k, v in fields.items():
                setattr(model.config.router, k, v)

        def __exit__(self, *exc):
            for k, v in self.old.items():
                setattr(model.config.router, k, v)
    return _Ctx()


@pytest.mark.parametrize("mode", ["prototype", "patch", "gated"])
def test_every_router_mode_routes_distinct_products(model, probe, mode):
    with _with_router(model, mode=mode, gate=10.0):
        pred = model.predict(probe[:6])
    assert pred.task_ids.tolist() == [0, 1, 2, 0, 1, 2]
    # every mode weighs a runner-up (prototype: its log distance ratio) and chose clearly
    assert torch.isfinite(pred.route_margin).all() and (pred.route_margin > 0).all()
    if mode == "prototype":
        assert not pred.ambiguous.any()


@pytest.mark.parametrize("router", [{"mode": "patch"}, {"mode": "prototype", "metric": "pooled"}])
def test_ambiguous_parts_are_flagged_only_if_flagged_under_every_plausible_product(model, probe, router):
    with _with_router(model, **router, ambiguity_margin=1e9):  # every product is plausible for every part
        pred = model.predict(probe)
    assert pred.ambiguous.all()
    assert all(sorted(alt + [t]) == [0, 1, 2] for alt, t in zip(pred.alternatives, pred.task_ids.tolist()))
    under = {t: model.predict(probe, task_ids=[t] * len(probe)) for t in (0, 1, 2)}  # oracle: each product
    flagged_under_all = torch.stack([under[t].anomalous for t in (0, 1, 2)]).all(0)
    assert torch.equal(pred.anomalous, flagged_under_all)
    for i, t in enumerate(pred.task_ids.tolist()):  # reported against a product it passes under, with its score
        if not pred.anomalous[i]:
            assert not under[t].anomalous[i]
        assert float(pred.scores[i]) == pytest.approx(float(under[t].scores[i]), rel=1e-5, abs=1e-5)
        assert float(pred.thresholds[i]) == float(under[t].thresholds[i])
    assert bool(pred.anomalous[6])  # the large defect is flagged under all three
    with _with_router(model, **router, ambiguity_margin=0.0):  # no doubt: each part under its routed product
        plain = model.predict(probe)
    assert not plain.ambiguous.any() and plain.alternatives == [[]] * len(probe)
    assert (pred.anomalous <= plain.anomalous).all()  # the rule only ever clears a flag


def test_the_median_over_fitting_patches_leaves_a_defect_out():
    """A bright defect on a third of a part drags the median of every coordinate towards a brighter look-alike;
    leaving out the patches that fit no product (grown by one patch) gives back the part's own median."""
    rng = np.random.default_rng(0)
    tokens = torch.from_numpy(rng.normal(0.0, 1.0, (1, 12, 12, 4))).float()
    worst = torch.zeros(1, 12, 12)
    tokens[0, :, :4] += 3.0  # the defect: columns 0-3
    worst[0, :, :4] = 9.0  # far from every product's memory
    keep = fitting_patches(worst, 5.0)
    assert keep[0, :, 5:].all() and not keep[0, :, :5].any()  # grown by one patch
    clean = tokens[0, :, 5:].reshape(-1, 4)
    expected = clean.sort(0).values[(len(clean) - 1) // 2]  # the lower median, as `router.features` takes it
    assert torch.equal(masked_median(tokens, keep)[0], expected)
    everything = tokens[0].reshape(-1, 4).sort(0).values[(144 - 1) // 2]
    assert (everything > expected).all()  # the plain median is dragged towards the defect
    few = torch.zeros(1, 12, 12, dtype=torch.bool)
    few[0, :2] = True  # fewer than a quarter kept: the median of all patches
    assert torch.equal(masked_median(tokens, few)[0], everything)


def test_trimmed_routing_reads_the_memories_only_where_products_are_close(model, probe):
    with _with_router(model, mode="prototype", metric="pooled", ambiguity_margin=0.0, trim_limit=0.0):
        plain = model.predict(probe)
    with _with_router(model, mode="prototype", metric="pooled", ambiguity_margin=0.0, trim_limit=5.0,
                      trim_gate=0.0):
        unchanged = model.predict(probe)  # no runner-up within the gate: the pooled prototype alone
    assert torch.equal(unchanged.route_margin, plain.route_margin)
    with _with_router(model, mode="prototype", metric="pooled", ambiguity_margin=0.0, trim_limit=5.0,
                      trim_gate=1e9):
        trimmed = model.predict(probe)  # every part compared again on the median of its fitting patches
    assert not torch.equal(trimmed.route_margin, plain.route_margin)
    assert trimmed.task_ids[:6].tolist() == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize("router", [{"mode": "gated", "gate": 10.0, "ambiguity_margin": 0.0},
                                    {"mode": "gated", "gate": 10.0, "ambiguity_margin": 1e9},
                                    {"mode": "prototype", "metric": "pooled", "ambiguity_margin": 0.0},
                                    {"mode": "prototype", "metric": "pooled", "ambiguity_margin": 1e9},
                                    {"mode": "prototype", "metric": "pooled", "ambiguity_margin": 0.0,
                                     "trim_limit": 1.0, "trim_gate": 1e9},
                                    {"mode": "prototype", "metric": "pooled", "ambiguity_margin": 0.2,
                                     "trim_limit": 1.0, "trim_gate": 0.5}])
def test_the_exported_graph_and_the_onnx_engine_follow_the_same_rule(model, probe, router, tmp_path):
    from moleflow.engine import make_engine

    with _with_router(model, **router):
        pred = model.predict(probe)
        out = predict_onnx(export_onnx(model, tmp_path), probe.numpy())
        engine = make_engine(model, "onnx", cache_dir=tmp_path / "engine").inspect(model.prepare(probe))
    np.testing.assert_array_equal(np.array([0, 1, 2])[out["task_index"]], pred.task_ids.numpy())
    np.testing.assert_array_equal(out["anomalous"], pred.anomalous.numpy())
    assert np.abs(out["scores"] - pred.scores.numpy()).max() < 1e-4
    assert np.abs(out["maps"] - pred.maps.numpy()).max() < 1e-4
    np.testing.assert_allclose(out["router_distance"], pred.router_distance.numpy(), rtol=1e-4, atol=1e-4)
    assert torch.equal(engine.task_ids, pred.task_ids) and torch.equal(engine.anomalous, pred.anomalous)
    assert torch.equal(engine.ambiguous, pred.ambiguous) and engine.alternatives == pred.alternatives
    assert float((engine.scores - pred.scores).abs().max()) < 1e-4


def test_the_trimmed_evidence_chooses_the_product_in_every_path(model, probe, tmp_path, monkeypatch):
    """Where the median over the fitting patches names another product than the plain median, that product is
    chosen: by `route` (predict), by the exported graph and by the ONNX engine alike. The trimmed distances are
    replaced by the plain ones rolled by one product, so the trimmed choice of every distinct part is the next
    product and differs from the plain pooled choice (which a real trim on these parts would not)."""
    from moleflow.engine import make_engine
    from moleflow.inspector import Inspector

    def rolled(self, tokens, fitting, close, tasks):
        return self.router.choice_distances(self.router.features(tokens), tasks).roll(1, dims=1)

    monkeypatch.setattr(Inspector, "_trimmed_distances", rolled)
    with _with_router(model, mode="prototype", metric="pooled", ambiguity_margin=0.0, trim_limit=5.0,
                      trim_gate=1e9):
        pred = model.predict(probe[:6])
        out = predict_onnx(export_onnx(model, tmp_path), probe[:6].numpy())
        engine = make_engine(model, "onnx", cache_dir=tmp_path / "engine").inspect(model.prepare(probe[:6]))
    assert pred.task_ids.tolist() == [1, 2, 0, 1, 2, 0]
    assert (pred.route_margin > 0).all() and not pred.ambiguous.any()
    np.testing.assert_array_equal(np.array([0, 1, 2])[out["task_index"]], pred.task_ids.numpy())
    assert torch.equal(engine.task_ids, pred.task_ids)
    # the distance reported and the unknown-product check are the chosen product's
    own = model.inspector.router.distances(model.inspector.features(model.prepare(probe[:6]).pixels)[1])
    assert torch.allclose(pred.router_distance.double(), own[torch.arange(6), pred.task_ids], rtol=1e-5)


def test_a_part_reported_against_another_plausible_product_lists_the_routed_one(model, probe):
    """An ambiguous part flagged under its routed product but normal under another plausible one is reported
    against that other product; its other plausible products then name the router's choice, never itself."""
    with _with_router(model, mode="prototype", metric="pooled", ambiguity_margin=1e9):
        routed = model.predict(probe[:6])
    strict = routed.task_ids[0].item()
    old = {t: model.inspector.threshold(t) for t in (0, 1, 2)}
    for t in (0, 1, 2):  # everything is flagged under the routed product of part 0, nothing under the others
        model.inspector.set_threshold(t, -1e9 if t == strict else 1e9)
    try:
        with _with_router(model, mode="prototype", metric="pooled", ambiguity_margin=1e9):
            pred = model.predict(probe[:6])
    finally:
        for t, v in old.items():
            model.inspector.set_threshold(t, v)
    moved = [i for i in range(6) if routed.task_ids[i] == strict]
    assert moved and all(pred.task_ids[i] != strict and not pred.anomalous[i] for i in moved)
    assert all(strict in pred.alternatives[i] for i in moved)
    for i, t in enumerate(pred.task_ids.tolist()):
        assert t not in pred.alternatives[i] and sorted(pred.alternatives[i] + [t]) == [0, 1, 2]


def test_the_pooled_metric_keeps_a_defective_part_with_its_product_where_own_covariances_do_not():
    """Two look-alike products whose means differ along e1; A varies little along e2, B a lot. A part of A with a
    defect that moves it along e2 is nearer B under each product's own covariance (B allows that move), but the
    pooled metric counts the move the same for both and keeps the part with A."""
    from moleflow.config import RouterConfig
    from moleflow.router import PrototypeRouter, mahalanobis

    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.1], dtype=torch.float64)
    b = torch.randn(400, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0], dtype=torch.float64)
    b[:, 0] += 3.0
    own, pooled = (PrototypeRouter(RouterConfig(metric=m)) for m in ("mahalanobis", "pooled"))
    for router in (own, pooled):
        router.add_task(0, a)
        router.add_task(1, b)
    part = torch.tensor([[0.5, 2.0]], dtype=torch.float64)  # an A part (e1 = 0.5) moved 20 of A's sigmas along e2
    assert own(part)[0].tolist() == [1] and pooled(part)[0].tolist() == [0]
    cov = (torch.linalg.inv(own.prototype(0)[1]) + torch.linalg.inv(own.prototype(1)[1])) / 2
    assert torch.allclose(pooled.pooled_precision([0, 1]), torch.linalg.inv(cov))
    expected = torch.stack([mahalanobis(part, own.prototype(t)[0], torch.linalg.inv(cov)) for t in (0, 1)], 1)
    assert torch.allclose(pooled.choice_distances(part, [0, 1]), expected)
    # the reported distance and the unknown-product check stay in the chosen product's own metric
    index, distance, known = pooled(part)
    assert torch.allclose(distance, own.distances(part, [0, 1])[:, 0]) and not bool(known[0])
    assert torch.equal(own.choice_distances(part), own.distances(part))  # the spec's metric chooses with its own
    pooled.remove_task(1)  # a changed set of prototypes is never measured with the old pooled metric
    pooled.add_task(1, b * 2)
    cov = (torch.linalg.inv(pooled.prototype(0)[1]) + torch.linalg.inv(pooled.prototype(1)[1])) / 2
    assert torch.allclose(pooled.pooled_precision([0, 1]), torch.linalg.inv(cov))


def test_confusability_is_measured_when_a_product_is_learned():
    data = product_images(("brick", "coins"), n_train=24, n_test_good=1)
    m = MoleFlow(tiny_config(**{"score.source": "flow+memory", "router.mode": "gated", "train.epochs": 1,
                                "score.calibration_fraction": 0.25}))
    first = m.fit_task(data["brick"][0], name="brick")
    second = m.fit_task(data["coins"][0], name="coins")
    assert first.confusability["among"] == ["brick"] and first.confusability["good"] == {"brick": 1.0}
    conf = second.confusability
    assert conf["n"] == second.n_calibration > 0 and conf["among"] == ["brick", "coins"]
    for case in ("good", "defect"):  # shares over the products learned so far, for good and pasted-defect parts
        assert sum(conf[case].values()) == pytest.approx(1.0) and set(conf[case]) <= {"brick", "coins"}
        assert 0.0 <= conf["ambiguous"][case] <= 1.0
    assert conf["good"].get("coins", 0.0) >= 0.5
    # the final prototype holds the held-out images too (as the spec builds it): the router's limit is recorded
    assert second.calibration["unknown_distance"] == m.router.unknown_threshold(second.task_id)


def test_gated_evidence_weighs_prototype_distance_and_patch_misfit_in_log_units(model):
    distances = torch.tensor([[1.0, 1.1], [1.0, 1.1]], dtype=torch.float64)
    misfit = torch.tensor([[2.0, 1.0], [1.0, 1.02]], dtype=torch.float64)
    with _with_router(model, mode="gated", patch_weight=2.0):
        evidence = model.inspector._evidence(distances, misfit)
    expected = distances.log() + 2.0 * misfit.log()
    assert torch.allclose(evidence, expected)
    assert evidence.argmin(1).tolist() == [1, 0]  # the patches overrule a close prototype, not a clear one
    scaled = model.inspector._evidence(distances * 7.0, misfit * 3.0)  # no unit of the features enters a margin
    assert torch.allclose(scaled[:, 1] - scaled[:, 0], evidence[:, 1] - evidence[:, 0])
    with _with_router(model, mode="patch"):
        assert torch.allclose(model.inspector._evidence(distances, misfit), misfit.log())


def test_a_new_look_alike_product_draws_an_older_products_held_out_parts(tmp_path, caplog):
    """The other direction of confusability: learning a twin of an older product moves some of the older product's
    held-out good parts to it. That is recorded in the new product's `draws`, logged, and `routing_now` shows it;
    the kept held-out features survive saving and loading, and go with their product."""
    import logging

    from moleflow.data.synthetic import generate_product

    data = product_images(("brick", "coins"), n_train=24, n_test_good=1)
    twin = list(generate_product("brick", n_train=24, n_test_good=0, n_test_defect=0, size=112, seed=7).train_images)
    m = MoleFlow(tiny_config(**{"train.epochs": 1, "score.calibration_fraction": 0.25}))
    brick = m.fit_task(data["brick"][0], name="brick")
    coins = m.fit_task(data["coins"][0], name="coins")
    assert coins.confusability["draws"] == {}  # a distinct product draws nothing
    assert m.routing_now() == {"brick": {"n": brick.n_calibration, "routed": {"brick": 1.0}, "ambiguous": 0.0},
                               "coins": {"n": coins.n_calibration, "routed": {"coins": 1.0}, "ambiguous": 0.0}}
    with caplog.at_level(logging.WARNING, logger="moleflow.learning"):
        second = m.fit_task(twin, name="brick2")
    now = m.routing_now()
    assert second.confusability["draws"] == {"brick": now["brick"]["routed"]["brick2"]}
    assert now["brick"]["routed"]["brick2"] > 0 and sum(now["brick"]["routed"].values()) == pytest.approx(1.0)
    assert "brick2 draws held-out good parts of other products: brick" in caplog.text
    assert now["coins"]["routed"] == {"coins": 1.0}
    # the own column is the prototype without the held-out parts (out of sample, as when they were first routed)
    features, image, mean, precision = m.router.holdout(brick.task_id)
    assert len(torch.unique(image)) == brick.n_calibration and not torch.equal(mean, m.router.prototype(0)[0])
    m.save(tmp_path / "m")
    loaded = MoleFlow.load(tmp_path / "m")
    assert loaded.routing_now() == now
    loaded.remove_task("brick2")
    assert loaded.routing_now()["brick"]["routed"] == {"brick": 1.0}
    assert not [k for k in loaded.inspector.state_dict() if "holdout" in k and k.endswith(f"_{second.task_id}")]


def test_the_defect_weighted_metric_discounts_the_direction_defects_move_along():
    """Two look-alike products whose means differ along e1 and e2 alike. Their painted defects move the feature
    along e1 only. A part of A with a defect that moves it along e1 goes to B under the pooled metric; with the
    defects' moment added to the pooled covariance (`router.defect_weight`), e1 counts less and e2, which defects do
    not move, keeps the part with A. Good parts route as before."""
    from moleflow.config import RouterConfig
    from moleflow.defect_moves import move_moment
    from moleflow.router import PrototypeRouter, pool_precisions

    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 2, generator=g, dtype=torch.float64)
    b = torch.randn(400, 2, generator=g, dtype=torch.float64) + torch.tensor([6.0, 6.0], dtype=torch.float64)
    moves = torch.zeros(50, 2, dtype=torch.float64)
    moves[:, 0] = torch.randn(50, generator=g, dtype=torch.float64) * 3.0  # defects move e1 only
    plain, weighted = (PrototypeRouter(RouterConfig(metric="pooled", defect_weight=w)) for w in (0.0, 1.0))
    for router in (plain, weighted):
        for t, x in enumerate((a, b)):
            router.add_task(t, x)
            router.set_defect_moves(t, move_moment(x[:50], x[:50] + moves))
    moment = move_moment(a[:50], a[:50] + moves)
    assert torch.allclose(moment, moves.T @ moves / 50)
    defective = torch.tensor([[7.0, 0.5]], dtype=torch.float64)  # an A part moved along e1 by a defect
    assert plain(defective)[0].tolist() == [1] and weighted(defective)[0].tolist() == [0]
    good = torch.cat([a[-100:], b[-100:]])
    for router in (plain, weighted):
        assert router(good)[0].tolist() == [0] * 100 + [1] * 100
    precisions = [plain.prototype(t)[1] for t in (0, 1)]
    assert torch.allclose(plain.pooled_precision([0, 1]), pool_precisions(precisions))  # weight 0: the LDA metric
    cov = sum(torch.linalg.inv(p) for p in precisions) / 2 + moment
    assert torch.allclose(weighted.pooled_precision([0, 1]), torch.linalg.inv(cov))
    weighted.remove_task(1)
    assert weighted.defect_moves([0, 1]) == [weighted.defect_moves([0])[0]]  # the removed product's went with it
    with pytest.raises(MoleflowError, match="router.defect_weight"):
        tiny_config(**{"router.defect_weight": 1.0, "router.metric": "mahalanobis"})


def test_a_product_learns_how_painted_defects_move_its_feature(tmp_path):
    """With `router.defect_weight` a product keeps the moment of its painted-defect moves, measured on its own
    training images; it is saved with the product, loaded with the model and chooses the product in every path."""
    data = product_images(("brick", "coins"), n_train=24, n_test_good=2)
    m = MoleFlow(tiny_config(**{"train.epochs": 1, "score.calibration_fraction": 0.25, "router.metric": "pooled",
                                "router.defect_weight": 2.0}))
    for name in ("brick", "coins"):
        m.fit_task(data[name][0], name=name)
    moments = m.router.defect_moves(m.router.task_ids)
    dim = m.router.prototype(0)[0].shape[0]
    assert len(moments) == 2 and all(x.shape == (dim, dim) and x.trace() > 0 for x in moments)
    assert torch.allclose(moments[0], moments[0].T)
    images = data["brick"][1] + data["coins"][1]
    before = m.predict(images)
    assert before.task_ids.tolist() == [0] * len(data["brick"][1]) + [1] * len(data["coins"][1])
    m.save(tmp_path / "m")
    loaded = MoleFlow.load(tmp_path / "m")
    assert all(torch.equal(x, y) for x, y in zip(loaded.router.defect_moves([0, 1]), moments))
    after = loaded.predict(images)
    assert torch.equal(after.task_ids, before.task_ids) and torch.allclose(after.scores, before.scores)
    out = predict_onnx(export_onnx(loaded, tmp_path / "onnx"), loaded.prepare(images).pixels.numpy())
    np.testing.assert_array_equal(out["task_index"], before.task_ids.numpy())
    # the exported graph measures with the weighted metric: its choice is that of the router's pooled precision
    weighted = loaded.router.pooled_precision([0, 1])
    loaded.config.router.defect_weight = 0.0
    assert not torch.allclose(loaded.router.pooled_precision([0, 1]), weighted)
