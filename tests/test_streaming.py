"""Learning streams a task's images through a DataLoader: same parameters whatever the loading, every tile trained on."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from moleflow import MoleFlow
from moleflow.data.batch import prepare_images, stream_prepared, tile_count
from moleflow.data.synthetic import generate_product
from moleflow.trainer import steps_per_epoch

from helpers import tiny_config


def _wide_images(n: int, seed: int) -> list[np.ndarray]:
    """n generated images of 224 x 112 pixels (2 tiles each with data.tiling=aspect)."""
    data = generate_product("brick", n_train=n, n_test_good=0, n_test_defect=0, size=112, seed=seed)
    return [np.concatenate([a, np.flip(a, 1)], axis=1) for a in data.train_images]


def test_streamed_files_with_workers_give_the_parameters_of_in_memory_images(tmp_path):
    images = _wide_images(14, 0)
    paths = []
    for i, img in enumerate(images):
        paths.append(tmp_path / f"{i:03d}.png")
        Image.fromarray(img).save(paths[-1])
    cfg = tiny_config(**{"train.epochs": 2, "data.tiling": "aspect", "data.resize_mode": "squash"})
    in_memory, streamed = MoleFlow(cfg), MoleFlow(cfg)
    streamed.loader_workers = 2
    in_memory.fit_task(images, name="a")
    streamed.fit_task([str(p) for p in paths], name="a")
    a, b = in_memory.inspector.model_state(), streamed.inspector.model_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert in_memory.tasks[0].threshold == streamed.tasks[0].threshold


def test_every_tile_of_a_tiled_task_is_trained_on():
    images = _wide_images(12, 1)
    cfg = tiny_config(**{"train.epochs": 2, "train.min_steps": 0, "data.tiling": "aspect",
                         "data.resize_mode": "squash"})
    model = MoleFlow(cfg)
    info = model.fit_task(images, name="wide")
    assert info.n_tiles == 2 * len(images)
    train_tiles = 2 * info.n_train
    assert info.train["steps"] == info.train["epochs"] * steps_per_epoch(train_tiles, cfg.train)
    # the memory holds patches of every training tile
    assert model.memory is None or model.memory.has(info.task_id)


def test_stream_prepared_batches_equal_prepare_images():
    cfg = tiny_config(**{"data.tiling": "aspect", "data.resize_mode": "squash"})
    model = MoleFlow(cfg)
    images = _wide_images(5, 2) + [np.zeros((112, 112, 3), np.uint8)]
    whole = prepare_images(images, model.transform, "aspect")
    parts = list(stream_prepared(images, model.transform, "aspect", batch_size=4))
    assert [p.n_images for p in parts] == [4, 2]
    joined = type(whole).concat(parts)
    assert torch.equal(joined.pixels, whole.pixels) and torch.equal(joined.owner, whole.owner)
    assert joined.layouts == whole.layouts
    assert [tile_count(i, "aspect") for i in images] == [2] * 5 + [1]
