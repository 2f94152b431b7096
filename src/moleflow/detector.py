"""The public model object: learn products one after another, then score any image without its task id.

    model = MoleFlow(Config.from_preset("cpu"))
    model.fit_task(train_images_of_product_a, name="a")
    model.fit_task(train_images_of_product_b, name="b")
    pred = model.predict(test_images)      # pred.scores (N,), pred.maps (N,S,S), pred.task_ids (N,)
    model.save("run/model.pt"); model = MoleFlow.load("run/model.pt")

Images are file paths, PIL images, uint8 arrays (H,W,3) or an already normalised float tensor (N,3,S,S).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .backbones import FeatureExtractor
from .config import Config
from .data.tiling import TileLayout, split_tiles, stitch_maps, tile_layout
from .data.transforms import ImageTransform, load_rgb
from .errors import MoleflowError
from .memory import PatchMemory, patch_scores
from .model import MoLEFlow
from .router import PrototypeRouter
from .scoring import MapMaker, decision_threshold, image_scores
from .trainer import TrainReport, fit_task

log = logging.getLogger(__name__)

ImageInput = Union[str, Path, Image.Image, np.ndarray]
Images = Union[Sequence[ImageInput], torch.Tensor]


@dataclass
class TaskInfo:
    """One learned task (product, or several classes in a multi-class scenario)."""

    task_id: int
    name: str
    classes: list[str]
    n_train: int
    n_calibration: int
    threshold: float  # image score above which an image of this task is anomalous
    n_tiles: int = 0  # preprocessed tiles of all its images (= images without tiling)
    calibration: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # where its images came from (root, dataset), if known


@dataclass
class Prediction:
    """Scores of N images. Task ids are the router's choice (or the oracle's when given)."""

    scores: torch.Tensor  # (N,) image scores
    maps: torch.Tensor  # (N, S, S) pixel anomaly maps
    # raw patch scores (the flow NLL, or NLL + memory when score.source says so): (N, H, W), or with tiling
    # one stitched map per image
    patch_nll: torch.Tensor | list[torch.Tensor]
    task_ids: torch.Tensor  # (N,) long
    known: torch.Tensor  # (N,) bool: False = fits no learned product ("unknown product")
    anomalous: torch.Tensor  # (N,) bool: score above the routed task's calibrated threshold
    router_distance: torch.Tensor  # (N,) distance to the chosen prototype (nan with oracle ids)


@dataclass
class Prepared:
    """Preprocessed images: `pixels` (M, 3, S, S) holds the tiles of N images (M = N without tiling);
    `owner` (M,) the image of each tile; `layouts` (N,) how each image was cut (in tile order)."""

    pixels: torch.Tensor
    owner: torch.Tensor
    layouts: list[TileLayout]

    def select(self, images: torch.Tensor) -> "Prepared":
        """The tiles of the images `images` (sorted indices), with `owner` renumbered 0..len-1."""
        keep = torch.isin(self.owner, images)
        renumber = torch.full((len(self.layouts),), -1, dtype=torch.long)
        renumber[images] = torch.arange(len(images))
        return Prepared(self.pixels[keep], renumber[self.owner[keep]], [self.layouts[i] for i in images.tolist()])


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MoleflowError("device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return device


class MoleFlow:
    """Continual anomaly detector: frozen backbone, MoLE flow with per-task experts, prototype router."""

    def __init__(self, config: Config, device: str | torch.device = "cpu", precision: str = "fp32") -> None:
        self.config = config
        self.device = resolve_device(device)
        if precision not in ("fp32", "bf16", "fp16"):
            raise MoleflowError(f"precision {precision!r}: use fp32, bf16 or fp16")
        if precision == "fp16" and self.device.type != "cuda":
            raise MoleflowError("fp16 needs a CUDA GPU; use fp32 or bf16 on the CPU")
        self.precision = precision  # inference only; training always runs in fp32
        self.extractor = FeatureExtractor(config.backbone).to(self.device)
        self.flow = MoLEFlow(config.model, self.extractor.embed_dim, seed=config.train.seed).to(self.device)
        self.flow.eval()
        self.router = PrototypeRouter(config.router)
        self.memory = (PatchMemory(config.score.memory_fraction, config.train.seed,
                                   config.score.memory_max_tokens).to(self.device)
                       if config.score.source == "flow+memory" else None)
        self.tasks: list[TaskInfo] = []
        self.transform = ImageTransform(config.data.image_size, config.data.resize_mode,
                                        self.extractor.mean, self.extractor.std)
        size = config.data.image_size
        with torch.no_grad():  # the token grid of this backbone at this image size, e.g. 28 x 28 at 224 px
            self.grid = tuple(self.extractor.tokens(torch.zeros(1, 3, size, size, device=self.device)).shape[1:3])
        self.map_maker = MapMaker(self.grid, size, config.score.map_sigma).to(self.device)
        self._stitched_makers: dict[tuple[int, int], MapMaker] = {}  # map makers of stitched (tiled) grids

    # ------------------------------------------------------------------------------ inputs
    def prepare(self, images: Images) -> Prepared:
        """Preprocess images (cut into tiles when `data.tiling` says so) into normalised tiles (M, 3, S, S).

        A float tensor (N, 3, S, S) is taken as already preprocessed, one tile per image."""
        if isinstance(images, torch.Tensor):
            size = self.config.data.image_size
            if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (size, size):
                raise MoleflowError(f"an image tensor must be (N, 3, {size}, {size}), got {tuple(images.shape)}")
            n = len(images)
            return Prepared(images.float(), torch.arange(n), [TileLayout()] * n)
        out, owner, layouts = [], [], []
        for i, item in enumerate(images):
            if isinstance(item, (str, Path)):
                item = load_rgb(item)
            elif isinstance(item, np.ndarray):
                item = Image.fromarray(item)
            layout = tile_layout(*item.size, self.config.data.tiling)
            for tile in split_tiles(item, layout):
                out.append(self.transform(tile))
                owner.append(i)
            layouts.append(layout)
        if not out:
            raise MoleflowError("no images were given")
        return Prepared(torch.stack(out), torch.tensor(owner, dtype=torch.long), layouts)

    def to_tensor(self, images: Images) -> torch.Tensor:
        """Preprocessed tiles (M, 3, S, S) of the images (one per image without tiling)."""
        return self.prepare(images).pixels

    @torch.no_grad()
    def extract(self, images: Images, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone tokens (N, H, W, D) and routing features (N, D), on the CPU."""
        x = self.to_tensor(images)
        tokens, routing = [], []
        for chunk in x.split(batch_size):
            t, r = self.extractor(chunk.to(self.device))
            tokens.append(t.cpu())
            routing.append(r.cpu())
        return torch.cat(tokens), torch.cat(routing)

    @torch.no_grad()
    def extract_cached(self, images: torch.Tensor, batch_size: int = 32) -> tuple[torch.Tensor | np.memmap, torch.Tensor]:
        """Like `extract`, but tokens that would exceed `train.cache_memory_gb` go to a memory-mapped file
        (deleted when the array is freed); the backbone runs exactly once per image."""
        import tempfile

        n = len(images)
        h, w = self.grid
        nbytes = n * h * w * self.extractor.embed_dim * 4
        if nbytes <= self.config.train.cache_memory_gb * 1e9:
            return self.extract(images, batch_size)
        folder = self.config.train.cache_dir or tempfile.gettempdir()
        handle = tempfile.NamedTemporaryFile(prefix="moleflow-cache-", suffix=".f32", dir=folder)
        tokens = np.memmap(handle, dtype=np.float32, mode="w+", shape=(n, h, w, self.extractor.embed_dim))
        tokens._moleflow_file = handle  # keeps the file alive as long as the array
        routing = []
        for start in range(0, n, batch_size):
            t, r = self.extractor(images[start:start + batch_size].to(self.device))
            tokens[start:start + len(t)] = t.cpu().numpy()
            routing.append(r.cpu())
        log.info("feature cache: %.1f GB memory-mapped in %s", nbytes / 1e9, folder)
        return tokens, torch.cat(routing)

    # ------------------------------------------------------------------------------ training
    def fit_task(self, images: Images, name: str | None = None, classes: Sequence[str] | None = None,
                 progress: bool = False, source: dict[str, Any] | None = None) -> TaskInfo:
        """Learn a new task from its normal training images; earlier tasks are not touched.

        A `score.calibration_fraction` share of the images is held out (seeded) to calibrate the decision
        threshold; the rest trains the expert. The router prototype uses all the images.
        """
        prep = self.prepare(images)
        x, n = prep.pixels, len(prep.layouts)
        task = self.flow.add_task()
        try:
            gen = torch.Generator().manual_seed(self.config.train.seed * 7919 + task)
            perm = torch.randperm(n, generator=gen)
            n_cal = int(n * self.config.score.calibration_fraction) if n >= 10 else 0
            cal_idx, train_idx = perm[:n_cal].sort().values, perm[n_cal:].sort().values
            train_prep, cal_prep = prep.select(train_idx), prep.select(cal_idx)
            train_x = train_prep.pixels
            if self.config.train.feature_cache:
                tokens, routing = self.extract_cached(train_x)

                def batch_features(idx: torch.Tensor) -> torch.Tensor:
                    return torch.as_tensor(tokens[idx.numpy()] if isinstance(tokens, np.memmap) else tokens[idx])
            else:
                tokens, routing = None, self.extract(train_x)[1]

                def batch_features(idx: torch.Tensor) -> torch.Tensor:
                    return self.extractor(train_x[idx].to(self.device))[0]

            report = fit_task(self.flow, task, len(train_x), batch_features, self.config.train,
                              self.device, progress)
            if self.memory is not None:
                self.memory.add_task(task, tokens if tokens is not None else self.extract_cached(train_x)[0])
            cal_tokens, cal_routing = self.extract(cal_prep.pixels) if n_cal else (None, None)
            self.router.add_task(task, routing if cal_routing is None else torch.cat([routing, cal_routing]))
            info = self._calibrate(task, name or f"task{task}", list(classes or [name or f"task{task}"]),
                                   len(train_idx), cal_tokens, cal_prep, tokens, train_prep, report)
            info.n_tiles = int(len(x))
        except BaseException:
            self.flow.remove_task(task)  # leave the model as it was
            if task in self.router.prototypes:
                self.router.remove_task(task)
            if self.memory is not None:
                self.memory.remove_task(task)
            raise
        info.source = dict(source or {})
        self.tasks.append(info)
        return info

    def _calibrate(self, task: int, name: str, classes: list[str], n_train: int, cal_tokens: torch.Tensor | None,
                   cal_prep: Prepared, train_tokens, train_prep: Prepared, report: TrainReport) -> TaskInfo:
        """Decision threshold from held-out normal training images (or, without any, the training images,
        from the feature cache when there is one)."""
        if cal_tokens is not None and len(cal_tokens):
            tokens, prep, source = cal_tokens, cal_prep, "held-out normal training images"
        else:
            tokens = torch.as_tensor(train_tokens) if train_tokens is not None else self.extract(train_prep.pixels)[0]
            prep, source = train_prep, "training images (too few to hold out; optimistic)"
        if self.memory is not None:
            self._set_memory_norm(task, tokens)
        scores, pixel_median, pixel_max = self._score_tokens(tokens, task, prep)
        rate = self.config.score.false_alarm_rate
        calibration = {"source": source, "n": int(len(scores)), "false_alarm_rate": rate,
                       "score_mean": float(scores.mean()), "score_std": float(scores.std()) if len(scores) > 1 else 0.0,
                       "unknown_distance": self.router.prototypes[task].unknown_threshold,
                       "normal_pixel_median": pixel_median, "normal_pixel_max": pixel_max}
        return TaskInfo(task_id=task, name=name, classes=classes, n_train=n_train,
                        n_calibration=int(len(cal_prep.layouts)) if cal_tokens is not None else 0,
                        threshold=decision_threshold(scores, rate), calibration=calibration, train=report.to_dict())

    @torch.no_grad()
    def _set_memory_norm(self, task: int, tokens: torch.Tensor, batch_size: int = 64) -> None:
        """Standardise the flow NLL and the memory distance of `task` on normal tokens (N, H, W, D)."""
        nll, dist = [], []
        for t in tokens.split(batch_size):
            t = t.to(self.device)
            nll.append(self.flow(t, task).nll.cpu())
            dist.append(self.memory.distances(t, task).cpu())
        self.memory.set_norm(task, torch.cat(nll), torch.cat(dist))

    def patch_scores(self, tokens: torch.Tensor, task: int) -> torch.Tensor:
        """Patch anomaly scores (B, H, W) of tokens (B, H, W, D) of images of task `task`."""
        return patch_scores(self.flow, self.memory, tokens, task)

    @torch.no_grad()
    def _score_tokens(self, tokens: torch.Tensor, task: int, prep: Prepared, batch_size: int = 64
                      ) -> tuple[torch.Tensor, float, float]:
        """Image scores (N,) of normal tiles' tokens (M, H, W, D), and the median and max of their pixel maps."""
        nll = torch.cat([self.patch_scores(t.to(self.device), task).float().cpu() for t in tokens.split(batch_size)])
        scores, maps, _ = self.image_outputs(nll, prep)
        flat = maps.flatten(1)
        return scores, float(flat.median(1).values.median()), float(flat.max())

    def image_outputs(self, nll: torch.Tensor, prep: Prepared, batch_size: int = 64
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | list[torch.Tensor]]:
        """Tiles' patch scores (M, h, w) -> image scores (N,), pixel maps (N, S, S) and patch maps: (N, h, w)
        without tiling, else one stitched (k*h, w) or (h, k*w) map per image."""
        if all(layout.count == 1 for layout in prep.layouts):
            order = prep.owner.argsort()
            nll = nll[order]
            maps = torch.cat([self.map_maker(part.to(self.device)).cpu() for part in nll.split(batch_size)])
            return image_scores(nll, self.config.score), maps, nll
        patch_maps, scores, maps = [], [], []
        for i, layout in enumerate(prep.layouts):
            stitched = stitch_maps(nll[(prep.owner == i).nonzero().squeeze(1)], layout)
            grid = tuple(stitched.shape)
            if grid not in self._stitched_makers:
                self._stitched_makers[grid] = MapMaker(grid, self.config.data.image_size,
                                                       self.config.score.map_sigma).to(self.device)
            patch_maps.append(stitched)
            scores.append(image_scores(stitched[None], self.config.score)[0])
            maps.append(self._stitched_makers[grid](stitched[None].to(self.device)).cpu()[0])
        return torch.stack(scores), torch.stack(maps), patch_maps

    # ------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, images: Images, task_ids: Sequence[int] | torch.Tensor | None = None,
                batch_size: int = 32, among: Sequence[int] | None = None) -> Prediction:
        """Score images. Without `task_ids` the router picks each image's task (task-agnostic), among the
        tasks `among` if given (e.g. those learned up to a step of the sequence), else among all."""
        if not self.tasks:
            raise MoleflowError("the model has learned no task yet; call fit_task first")
        with self._autocast():
            return self._predict(images, task_ids, batch_size, among)

    def _autocast(self):
        if self.precision == "fp32":
            return torch.autocast(device_type=self.device.type, enabled=False)
        return torch.autocast(device_type=self.device.type,
                              dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    def _predict(self, images: Images, task_ids, batch_size: int, among) -> Prediction:
        prep = self.prepare(images)
        tokens, routing = self.extract(prep.pixels, batch_size)
        tokens, routing = tokens.float(), routing.float()
        n = len(prep.layouts)
        if task_ids is None and not self.config.router.enabled:
            raise MoleflowError("router.enabled is false (oracle mode): pass task_ids")
        if task_ids is None:
            ids, distance, known = self.router.route(routing, None if among is None else list(among), prep.owner)
        else:
            ids = torch.as_tensor(task_ids, dtype=torch.long).reshape(-1)
            if len(ids) != n:
                raise MoleflowError(f"{len(ids)} task ids for {n} images")
            unknown = set(ids.tolist()) - set(self.flow.task_ids)
            if unknown:
                raise MoleflowError(f"unknown task ids {sorted(unknown)}; learned tasks: {self.flow.task_ids}")
            distance, known = torch.full((n,), float("nan"), dtype=torch.float64), torch.ones(n, dtype=torch.bool)
        tile_ids = ids[prep.owner]
        h, w = tokens.shape[1:3]
        nll = torch.empty(len(tokens), h, w)
        for task in tile_ids.unique().tolist():
            index = (tile_ids == task).nonzero().squeeze(1)
            for chunk in index.split(batch_size):
                nll[chunk] = self.patch_scores(tokens[chunk].to(self.device), task).float().cpu()
        scores, maps, patch_maps = self.image_outputs(nll, prep, batch_size)
        thresholds = {t.task_id: t.threshold for t in self.tasks}
        limit = torch.tensor([thresholds[t] for t in ids.tolist()], dtype=scores.dtype)
        return Prediction(scores=scores, maps=maps, patch_nll=patch_maps, task_ids=ids, known=known,
                          anomalous=scores > limit, router_distance=distance)

    # ------------------------------------------------------------------------------ lifecycle
    def task_by_name(self, name: str) -> TaskInfo:
        for info in self.tasks:
            if info.name == name:
                return info
        raise MoleflowError(f"no task named {name!r}; tasks: {', '.join(t.name for t in self.tasks) or 'none'}")

    def remove_task(self, name: str) -> TaskInfo:
        """Delete one task's expert and prototype; the other tasks are unaffected."""
        info = self.task_by_name(name)
        self.flow.remove_task(info.task_id)
        self.router.remove_task(info.task_id)
        if self.memory is not None:
            self.memory.remove_task(info.task_id)
        self.tasks.remove(info)
        return info

    def save(self, path: str | Path) -> Path:
        from .checkpoint import save_checkpoint

        return save_checkpoint(self, path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu",
             backbone_weights: str | None = None) -> "MoleFlow":
        from .checkpoint import load_detector

        return load_detector(path, device, backbone_weights)

    def task_info_dicts(self) -> list[dict[str, Any]]:
        return [asdict(t) for t in self.tasks]
