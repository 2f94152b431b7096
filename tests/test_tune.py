"""Model selection on synthetic anomalies in held-out training normals (`moleflow tune`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moleflow.cli import main
from moleflow.data.synthetic import write_mvtec_layout
from moleflow.data.synthetic_anomalies import ANOMALY_KINDS, SUBTLE_KINDS, cut_paste, noise_blob, paste_anomaly
from moleflow.errors import MoleflowError


def _image(seed: int, h: int = 96, w: int = 128) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(128, 30, (h, w, 3))).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", ANOMALY_KINDS + SUBTLE_KINDS)
def test_every_kind_is_covered_by_its_mask(kind):
    """The mask covers what was pasted: painted kinds mark pixels covered at least half by the shape, so
    only faint anti-aliased edges (well under the defect's own contrast) may change outside it."""
    for seed in range(3):
        image, donor = _image(seed), _image(seed + 10)
        out, mask = paste_anomaly(image, donor, kind, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8 and mask.shape == image.shape[:2]
        assert 0.001 <= mask.mean() <= 0.25
        diff = np.abs(out.astype(int) - image.astype(int)).max(-1)
        assert diff[~mask].max(initial=0) <= 0.35 * diff[mask].mean(), kind


def test_cut_paste_mask_is_exactly_the_changed_pixels():
    image, donor = _image(3), _image(4)
    out, mask = cut_paste(image, donor, np.random.default_rng(5))
    assert np.array_equal(mask, np.any(out != image, axis=-1))
    ys, xs = np.nonzero(mask)  # one rectangle
    assert mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].mean() > 0.9


@pytest.mark.parametrize("kind", SUBTLE_KINDS)
def test_subtle_kinds_change_exactly_their_mask_inside_one_blob(kind):
    """Subtle anomalies: the mask is exactly the changed pixels, inside a blob of 0.5-5 % of the image, and the
    change is faint (a mean change well under a painted hole's)."""
    image, donor = _image(7), _image(8)
    rng = np.random.default_rng(9)
    blob = noise_blob(image.shape[:2], np.random.default_rng(9))
    assert 0.004 <= blob.mean() <= 0.051
    out, mask = paste_anomaly(image, donor, kind, rng, severity=0.5)
    assert np.array_equal(mask, np.any(out != image, axis=-1))
    assert np.array_equal(mask, mask & blob)  # the same draw: the change stays inside its blob
    change = np.abs(out.astype(int) - image.astype(int)).max(-1)[mask].mean()
    hole, hole_mask = paste_anomaly(image, donor, "hole", np.random.default_rng(9), severity=1.0)
    assert change < np.abs(hole.astype(int) - image.astype(int)).max(-1)[hole_mask].mean()


def test_painted_and_subtle_validations_hold_out_the_same_images(tmp_path):
    from moleflow.data.datasets import load_class
    from moleflow.tuning import make_validation_split

    root = tmp_path / "data"
    write_mvtec_layout(root, ["brick"], n_train=20, n_test_good=1, n_test_defect=1, size=64, seed=0)
    split = load_class(root, "brick", "folder")
    painted, subtle = (make_validation_split(split, tmp_path / kind, 0.25, None, 0, kind) for kind in ("painted", "subtle"))
    assert [s.image for s in painted.train] == [s.image for s in subtle.train]
    assert [s.defect_type for s in painted.test if s.label] != [s.defect_type for s in subtle.test if s.label]
    assert {s.defect_type for s in subtle.test if s.label} <= set(SUBTLE_KINDS)
    with pytest.raises(MoleflowError, match="unknown anomaly set"):
        make_validation_split(split, tmp_path / "x", 0.25, None, 0, "loud")


def test_the_faint_validation_paints_the_same_kinds_at_a_lower_contrast(tmp_path):
    """`faint`: the held-out images and kinds of `painted`, each defect drawn at a lower contrast."""
    from PIL import Image

    from moleflow.data.datasets import load_class
    from moleflow.tuning import SEVERITY, make_validation_split

    assert SEVERITY["faint"][1] <= SEVERITY["painted"][0]
    root = tmp_path / "data"
    write_mvtec_layout(root, ["brick"], n_train=40, n_test_good=1, n_test_defect=1, size=64, seed=0)
    split = load_class(root, "brick", "folder")
    sets = {kind: make_validation_split(split, tmp_path / kind, 0.25, None, 0, kind) for kind in ("painted", "faint")}
    assert [s.image for s in sets["painted"].train] == [s.image for s in sets["faint"].train]
    kinds = {k: [s.defect_type for s in v.test if s.label] for k, v in sets.items()}
    assert kinds["painted"] == kinds["faint"] and set(kinds["faint"]) <= set(ANOMALY_KINDS)

    def contrast(validation) -> float:  # mean change inside the masks, over all anomalous images
        good = {s.image.name: np.asarray(Image.open(s.image), dtype=int) for s in validation.test if not s.label}
        return float(np.mean([np.abs(np.asarray(Image.open(s.image), dtype=int) - good[s.image.name]).max(-1)
                              [np.asarray(Image.open(s.mask)) > 0].mean() for s in validation.test if s.label]))

    assert contrast(sets["faint"]) < 0.6 * contrast(sets["painted"])


def test_unknown_kind_is_refused():
    with pytest.raises(MoleflowError, match="unknown anomaly kind"):
        paste_anomaly(_image(0), _image(1), "smudge", np.random.default_rng(0))


TINY = ["--preset", "tiny", "--no-progress", "--max-train", "20",
        "--candidate", "short:train.epochs=1", "--candidate", "memory:train.epochs=1,score.source=flow+memory"]


def test_tune_chooses_reproducibly_without_reading_test_images(tmp_path):
    root = tmp_path / "data"
    write_mvtec_layout(root, ["brick", "grass"], n_train=20, n_test_good=2, n_test_defect=2, size=112, seed=0)
    for cls in ("brick", "grass"):  # unreadable test files: tune must never open them
        for f in (root / cls / "test").rglob("*.png"):
            f.write_bytes(b"not an image")
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["tune", "--data", str(root), "--classes", "brick", "grass", "--out", str(out)] + TINY) == 0
        runs.append(json.loads((out / "tune.json").read_text()))
        assert (out / "chosen.yaml").exists() and (out / "short" / "results.json").exists()
    a, b = runs
    assert a["chosen"] == b["chosen"]
    assert [r["validation_score"] for r in a["candidates"]] == [r["validation_score"] for r in b["candidates"]]
    assert a["n_validation"]["brick"] == {"normal": 4, "anomalous": 4, "fit": 16}
    assert a["anomalies"] == "faint" and a["anomaly_kinds"] == list(ANOMALY_KINDS)  # the default validation
    best = max(a["candidates"], key=lambda r: r["validation_score"])
    assert a["chosen"] == best["name"]
    import yaml

    chosen = yaml.safe_load((tmp_path / "a" / "chosen.yaml").read_text())
    assert chosen["score"]["source"] == ("flow+memory" if a["chosen"] == "memory" else "flow")
