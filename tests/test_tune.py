"""Model selection on synthetic anomalies in held-out training normals (`moleflow tune`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moleflow.cli import main
from moleflow.data.synthetic import write_mvtec_layout
from moleflow.data.synthetic_anomalies import ANOMALY_KINDS, cut_paste, paste_anomaly
from moleflow.errors import MoleflowError


def _image(seed: int, h: int = 96, w: int = 128) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(128, 30, (h, w, 3))).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", ANOMALY_KINDS)
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
    best = max(a["candidates"], key=lambda r: r["validation_score"])
    assert a["chosen"] == best["name"]
    import yaml

    chosen = yaml.safe_load((tmp_path / "a" / "chosen.yaml").read_text())
    assert chosen["score"]["source"] == ("flow+memory" if a["chosen"] == "memory" else "flow")
