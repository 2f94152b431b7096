"""Configuration of a MoLE-Flow run: dataclasses with validation, named presets and `key=value` overrides.

Every option of the method (spec §1 and §9.2) is a field here. A config is plain data: it is
serialised with every run (`to_dict`) and rebuilt from it (`from_dict`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import MoleflowError

TaskAdapter = Literal["whitening", "soft_ln", "none"]
ScoreMode = Literal["top_k", "top_k_percent", "percentile", "max", "mean", "spatial_cluster"]
ResizeMode = Literal["squash", "letterbox", "resize_crop"]
FeatureMerge = Literal["mean", "concat"]
ScoreSource = Literal["flow", "flow+memory"]


@dataclass
class BackboneConfig:
    """Frozen feature extractor. `weights` is a local file; `None` means the backbone's default source."""

    name: str = "tf_efficientnet_lite0"
    weights: str | None = None
    random_weights: bool = False  # tests only: never implied, must be asked for
    embed_dim: int | None = None  # D; None = the backbone's default (768 for WRN50 / ViT-B)
    # how the two CNN layers become one token: "mean" (spec §2.2: each layer's 3x3 neighbourhoods pooled to
    # D, then the mean of the layers) or "concat" (PatchCore: each channel's 3x3 mean, the layers' channels
    # side by side, D = the channel count, e.g. 40 + 112 = 152 for lite0; embed_dim must be None or equal)
    feature_merge: FeatureMerge = "mean"
    # what runs a CNN backbone on the CPU: "onnxruntime" (the same weights traced once per process; about three times
    # as fast as PyTorch's eager CPU kernels for lite0, tokens equal to float rounding) or "torch". ViT backbones, GPUs
    # and autocast always run in PyTorch. Not part of the method: results differ only by float rounding
    runtime: Literal["onnxruntime", "torch"] = "onnxruntime"


@dataclass
class DataConfig:
    """Image preprocessing. `squash` resizes the whole image to a square so no part is cut off."""

    image_size: int = 224
    resize_mode: ResizeMode = "squash"
    # "aspect": cut an image whose long side is r >= 1.5 times its short side into round(r) near-square
    # tiles along it; maps are stitched back on the whole image (data/tiling.py). "none": one view per image.
    tiling: Literal["none", "aspect"] = "none"
    # which training images show the same part: a CSV (columns `file`, `group`) in the product's folder
    # (data/groups.py). Held-out images (calibration, `moleflow tune`'s validation) are then whole groups, so that
    # no held-out image has a twin in training. None: hold images out one by one.
    group_file: str | None = "provenance.csv"


@dataclass
class ModelConfig:
    """The flow and the per-task experts (spec §2.4-2.9)."""

    num_coupling_blocks: int = 6
    clamp: float = 1.9
    use_lora: bool = True
    lora_rank: int = 64
    lora_alpha: float | None = None  # None: alpha = rank (scaling 1); the reference code used 1.0 (§12.9)
    use_task_bias: bool = True
    use_scale_context: bool = True
    scale_context_kernel: int = 5
    scale_context_init: float = 0.1
    scale_context_max: float = 0.2
    use_spatial_context: bool = True
    spatial_context_kernel: int = 3
    spatial_context_mode: Literal["depthwise_residual", "depthwise"] = "depthwise_residual"
    use_pos_embedding: bool = True
    task_adapter: TaskAdapter = "whitening"
    whitening_identity_init: bool = True  # False: tasks >= 1 start at gamma = 1.25 as in the reference (§12.8)
    dia_blocks: int = 2  # 0 disables DIA
    dia_hidden_ratio: float = 0.5
    freeze_base: bool = True  # False: "sequential" fine-tuning of every shared parameter
    task_separated: bool = False  # every task gets its own full flow
    # a learning step with several products: one expert (adapter, LoRA, task bias, DIA), prototype and threshold
    # per "product" (default), or one per "task" for all its products as in the spec (§12.14: what makes 3-3,
    # 5-5 and 14-1 collapse; the `repo` preset keeps it)
    experts: Literal["product", "task"] = "product"


@dataclass
class TrainConfig:
    """Optimisation of one task (spec §3-4)."""

    epochs: int = 60
    # a floor on optimiser steps per task: a small task trains for more epochs (ceil(min_steps / steps per
    # epoch)) so it gets as many updates as a large one; the schedule spans the longer run. 0 = epochs only.
    min_steps: int = 0
    batch_size: int = 16
    lr: float = 3e-4
    optimizer: Literal["adamp", "adamw"] = "adamp"
    weight_decay: float = 0.01
    warmup_epochs: int = 2  # tasks >= 1 only
    min_lr_ratio: float = 0.01
    grad_clip: float = 0.5
    tail_weight: float = 0.7
    tail_ratio: float = 0.02
    lambda_logdet: float = 1e-4
    drop_last: bool = False  # the reference dropped up to batch_size - 1 images per epoch (§12.17)
    max_loss: float = 1e8  # a batch with a loss above this or non-finite is skipped and counted
    seed: int = 0
    feature_cache: bool = True  # compute backbone features once per task, not once per epoch
    cache_memory_gb: float = 4.0  # a larger cache goes to a memory-mapped file (see cache_dir)
    cache_dir: str | None = None  # folder for memory-mapped caches (default: the system temp folder)
    # how a first step of several products trains the shared flow before it is frozen: "side_by_side", their
    # batches interleaved, each product with the epochs it would get alone (the shared flow sees products in
    # proportion to their batches); "balanced", the same with every product given as many steps as the largest;
    # "first_only", the first product alone trains it and the others learn their experts on it frozen (exactly
    # what learning them one per step gives). Chosen by `moleflow tune` on synthetic anomalies in held-out
    # training normals (BENCHMARKS.md, "Several products in one step"): balanced 94.87, side_by_side 94.50,
    # first_only 94.12
    first_step: Literal["side_by_side", "balanced", "first_only"] = "balanced"
    # each optimiser step trains the flow on one random window of the token grid, this share of its height and
    # width, cut at the grid's edge so that every token is trained equally often (`trainer.step_window`; the
    # window's flow input is the whole grid's, prepared from the window and the mixer's reach, so a window keeps
    # its place); 1 = the whole grid (spec). A product's learning takes about a sixth of the whole grid's time at
    # 0.35 and a fifth at 0.5 (docs/accuracy.md §15)
    step_window: float = 1.0


@dataclass
class RouterConfig:
    """Prototype router (spec §5). `enabled=False` is oracle routing (the true task id is given)."""

    enabled: bool = True
    # the distance that chooses the product: "mahalanobis", each product's own precision (spec §5); "pooled", one
    # precision for all, the inverse of the mean of the products' covariances (linear discriminant analysis: a
    # defect moves the choice only along what separates the products; docs/decisions.md §8); "euclidean". The
    # distance reported and the unknown-product limit are always in the chosen product's own metric
    metric: Literal["mahalanobis", "pooled", "euclidean"] = "mahalanobis"
    covariance: Literal["ledoit_wolf", "oas", "ridge"] = "ledoit_wolf"
    ridge: float = 1e-5
    unknown_quantile: float = 0.99  # distance quantile of held-out own-task images ...
    unknown_margin: float = 2.0  # ... times this margin: farther is an "unknown product"
    # the image's routing feature, from its patch tokens (B, H, W, D): the coordinate-wise "median" over the
    # grid, which a defect on a minority of patches cannot move far, or the "mean" of the spec (§5, `repo`).
    # Chosen on held-out TRAINING normals with pasted defects (benchmarks/routing_stress.py, docs/decisions.md)
    statistic: Literal["mean", "median"] = "median"
    # how an image's product is chosen (docs/decisions.md §8): "prototype", the nearest Gaussian prototype (spec
    # §5); "patch", the product whose patch memory fits the image's patches best (the median over the patches of
    # the nearest-neighbour distance; needs score.source=flow+memory); "gated", the prototype unless the runner-up
    # prototype is within a factor 1 + `gate` of the nearest, then among the products within that factor the
    # smallest log(prototype distance) + patch_weight x log(patch misfit)
    mode: Literal["prototype", "patch", "gated"] = "prototype"
    gate: float = 0.2
    patch_weight: float = 2.0
    # a part whose evidence (log units, see `mode`) is within this of the best-fitting product's is "ambiguous":
    # it is scored under each such product too and flagged only if flagged under all of them (0: never)
    ambiguity_margin: float = 0.0
    # mode "prototype" only, needs the patch memories: where other products' log choice distances are within
    # `trim_gate` of the nearest, those products are compared again on the median of only the patches that fit
    # one of them (standardised memory distance <= `trim_limit`; the others, grown by one patch, are left out: a
    # defect does not drag the routing feature towards a look-alike product). 0: never (docs/decisions.md §8)
    trim_limit: float = 0.0
    trim_gate: float = 0.1
    # metric "pooled" only: add this weight x the mean of the products' defect-move moments to the pooled covariance
    # (each product pastes painted defects into some of its own training images when it is learned and keeps how they
    # moved its routing feature, `defect_moves`), so that a move along a direction defects take counts less. 0: never
    defect_weight: float = 0.0


@dataclass
class ScoreConfig:
    """Image-score aggregation and pixel maps (spec §6) and the decision threshold."""

    mode: ScoreMode = "top_k"
    top_k: int = 3
    top_k_percent: float = 0.05
    percentile: float = 0.99
    cluster_weight: float = 0.5
    cluster_percentile: float = 0.9
    cluster_top_k_ratio: float = 0.02
    map_sigma: float = 4.0
    # what a pixel map shows: "none", the patch scores themselves (spec §6); "median", each patch's score above its
    # image's median patch score, so an offset shared by the whole part (its lighting, its own variation) is not
    # shown as a place. Maps only: image scores and decisions read the patch scores as they are. Measured on
    # validation and not taken (docs/accuracy.md §12, benchmarks/map_making.py)
    map_centre: Literal["none", "median"] = "none"
    # "flow" (spec §6): the patch score is the flow's NLL. "flow+memory": per task, a seeded random
    # `memory_fraction` of its training patch tokens is kept; the patch score is the sum of the flow NLL and
    # the nearest-neighbour distance to that memory, each standardised by its mean and std over held-out
    # normal training patches of the task (never test images). Not part of the faithful method.
    source: ScoreSource = "flow"
    memory_fraction: float = 0.1
    # at most this many tokens per task (seeded random subset): inference cost stays bounded for large or
    # tiled products (a 666-image product cut into ~2 tiles would otherwise keep ~100 k tokens)
    memory_max_tokens: int = 20000
    # 0: keep that random subset. k > 0: thin it to k tokens by PatchCore's greedy k-center coreset, which keeps
    # the coverage of normal patches with far fewer rows (the exact nearest-neighbour search is most of the
    # CPU inference time; see BENCHMARKS.md "Serving"). How the cpu preset's value was chosen: docs/decisions.md
    memory_coreset: int = 0
    # the patch score is the standardised NLL plus this times the standardised memory distance (1: their plain sum;
    # the cpu preset's 4 was chosen on the faint validation, docs/accuracy.md §14)
    memory_weight: float = 1.0
    # how the two standardised terms make a patch's score: "sum" (the default, docs/accuracy.md §11) or "max", the
    # larger of the two (a patch is as anomalous as its more alarmed source; measured and not taken:
    # benchmarks/memory_weight_choice.py, docs/accuracy.md §11)
    memory_combine: Literal["sum", "max"] = "sum"
    # decision threshold: the split-conformal order statistic of held-out normal training scores that keeps
    # false alarms on new good parts at or below this rate (calibration.py)
    false_alarm_rate: float = 0.01
    # training images held out for calibration: calibration_fraction of them, or more, up to what
    # false_alarm_rate needs (1/rate - 1 images: 99 at 1 %), as long as calibration_keep_train images remain to
    # train the expert (a small product keeps its images for training: holding out 25 % of 28 generated images
    # dropped image AUROC from above 90 to 86 in tests/test_end_to_end.py). 0: nothing held out, thresholds from the
    # training images, optimistic (the reference)
    calibration_fraction: float = 0.1
    calibration_keep_train: int = 200


@dataclass
class Config:
    """Everything a run needs. Build with `Config.from_preset(name)` and refine with `with_overrides`."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    preset: str = "custom"

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------- presets
    @classmethod
    def from_preset(cls, name: str) -> "Config":
        """A named preset: see `PRESETS`."""
        if name not in PRESETS:
            raise MoleflowError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
        cfg = PRESETS[name]()
        cfg.preset = name
        cfg.validate()
        return cfg

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        """Rebuild a config from plain data (a run's config.yaml, a checkpoint): every value is converted to
        its field's declared type and checked; a bad value or an unknown key is a one-line `MoleflowError`."""
        if not isinstance(data, dict):
            raise MoleflowError(f"a config must be a mapping of sections ({_SECTIONS_TEXT}), "
                                f"got {type(data).__name__}; {_SEE_ALL}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key == "preset":
                if not isinstance(value, str):
                    raise MoleflowError(f"preset={value!r}: expected a string")
                kwargs[key] = value
            elif key in _SECTION_TYPES:
                kwargs[key] = _convert_section(key, value)
            else:
                raise MoleflowError(f"unknown config section {key!r}{_did_you_mean(str(key), [*_SECTION_TYPES, 'preset'])}; "
                                    f"sections: {_SECTIONS_TEXT}, preset; {_SEE_ALL}")
        return cls(**kwargs)

    def with_overrides(self, overrides: list[str] | dict[str, Any]) -> "Config":
        """Return a copy with `section.key=value` overrides applied: string values are parsed as YAML scalars,
        then every value is converted to its field's type and checked (as in `from_dict`)."""
        items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides]
        data = self.to_dict()
        for dotted, raw in items:
            section, key = _resolve_key(dotted)
            field_type = _field_types(_SECTION_TYPES[section])[key]
            data[section][key] = _parse_override(raw, field_type) if isinstance(raw, str) else raw
        data["preset"] = self.preset
        return Config.from_dict(data)

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise `MoleflowError` naming the first invalid value."""
        m, t, s, r, d = self.model, self.train, self.score, self.router, self.data

        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise MoleflowError(f"invalid config: {msg}")

        check(m.num_coupling_blocks >= 0, "model.num_coupling_blocks must be >= 0")
        check(m.dia_blocks >= 0, "model.dia_blocks must be >= 0")
        check(m.lora_rank >= 1, "model.lora_rank must be >= 1")
        check(m.scale_context_kernel % 2 == 1, "model.scale_context_kernel must be odd")
        check(m.spatial_context_kernel % 2 == 1, "model.spatial_context_kernel must be odd")
        check(m.task_adapter in ("whitening", "soft_ln", "none"), "model.task_adapter: whitening|soft_ln|none")
        check(0 < m.dia_hidden_ratio, "model.dia_hidden_ratio must be > 0")
        check(t.epochs >= 1 and t.batch_size >= 1, "train.epochs and train.batch_size must be >= 1")
        check(t.min_steps >= 0, "train.min_steps must be >= 0")
        check(0.0 < t.step_window <= 1.0, "train.step_window must be in (0, 1]")
        check(s.source in ("flow", "flow+memory"), "score.source: flow|flow+memory")
        check(0.0 < s.memory_fraction <= 1.0, "score.memory_fraction must be in (0, 1]")
        check(s.memory_max_tokens >= 1, "score.memory_max_tokens must be >= 1")
        check(s.memory_coreset >= 0, "score.memory_coreset must be >= 0 (0 = no coreset)")
        check(s.memory_weight >= 0, "score.memory_weight must be >= 0")
        check(s.memory_combine in ("sum", "max"), "score.memory_combine: sum|max")
        check(s.map_centre in ("none", "median"), "score.map_centre: none|median")
        check(self.backbone.feature_merge in ("mean", "concat"), "backbone.feature_merge: mean|concat")
        check(self.backbone.runtime in ("onnxruntime", "torch"), "backbone.runtime: onnxruntime|torch")
        check(t.lr > 0, "train.lr must be > 0")
        check(0.0 <= t.tail_weight, "train.tail_weight must be >= 0")
        check(0.0 < t.tail_ratio <= 1.0, "train.tail_ratio must be in (0, 1]")
        check(t.optimizer in ("adamp", "adamw"), "train.optimizer: adamp|adamw")
        check(s.mode in ("top_k", "top_k_percent", "percentile", "max", "mean", "spatial_cluster"),
              f"score.mode {s.mode!r} unknown")
        check(s.top_k >= 1, "score.top_k must be >= 1")
        check(0.0 < s.percentile <= 1.0, "score.percentile must be in (0, 1]")
        check(0.0 < s.false_alarm_rate < 1.0, "score.false_alarm_rate must be in (0, 1)")
        check(0.0 <= s.calibration_fraction < 0.5, "score.calibration_fraction must be in [0, 0.5)")
        check(s.calibration_keep_train >= 0, "score.calibration_keep_train must be >= 0")
        check(r.metric in ("mahalanobis", "pooled", "euclidean"), "router.metric: mahalanobis|pooled|euclidean")
        check(r.covariance in ("ledoit_wolf", "oas", "ridge"), "router.covariance: ledoit_wolf|oas|ridge")
        check(r.mode in ("prototype", "patch", "gated"), "router.mode: prototype|patch|gated")
        check(r.gate >= 0 and r.ambiguity_margin >= 0 and r.patch_weight >= 0 and r.trim_limit >= 0
              and r.trim_gate >= 0 and r.defect_weight >= 0,
              "router.gate, patch_weight, ambiguity_margin, trim_limit, trim_gate and defect_weight must be >= 0")
        check(not r.defect_weight or r.metric == "pooled",
              "router.defect_weight weighs defects in the pooled metric: it needs router.metric=pooled "
              "(or router.defect_weight=0)")
        check(not r.trim_limit or (r.mode == "prototype" and s.source == "flow+memory"),
              "router.trim_limit reads the products' patch memories in prototype mode: it needs router.mode=prototype "
              "and score.source=flow+memory (or router.trim_limit=0)")
        check(r.mode == "prototype" or s.source == "flow+memory",
              f"router.mode={r.mode} routes on the products' patch memories: it needs score.source=flow+memory")
        check(d.image_size >= 32 and d.image_size % 8 == 0, "data.image_size must be a multiple of 8, >= 32")
        check(d.resize_mode in ("squash", "letterbox", "resize_crop"), "data.resize_mode: squash|letterbox|resize_crop")
        check(d.tiling in ("none", "aspect"), "data.tiling: none|aspect")
        check(d.tiling == "none" or d.resize_mode == "squash", "data.tiling=aspect needs data.resize_mode=squash")
        if self.backbone.embed_dim is not None:
            check(self.backbone.embed_dim % 4 == 0 and self.backbone.embed_dim >= 8,
                  "backbone.embed_dim must be a multiple of 4 (positional encoding), >= 8")


_SECTION_TYPES: dict[str, type] = {
    "backbone": BackboneConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "router": RouterConfig,
    "score": ScoreConfig,
}


def _split_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise MoleflowError(f"override {text!r} must look like section.key=value, e.g. train.epochs=10")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


# ---------------------------------------------------------------------------- typed conversion of values
_SECTIONS_TEXT = ", ".join(_SECTION_TYPES)
_SEE_ALL = "run `moleflow config --preset cpu` to see every key"


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@functools.lru_cache(maxsize=None)
def _field_types(section_cls: type) -> dict[str, Any]:
    """Field name -> declared type (the annotations are strings under `from __future__ import annotations`)."""
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


@functools.lru_cache(maxsize=None)
def _adapter(section_cls: type) -> Any:
    import pydantic

    return pydantic.TypeAdapter(section_cls)


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    """The members of `A | B` / `Optional[A]`, or None when `tp` is not a union."""
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else None


def _non_null(tp: Any) -> list[Any]:
    members = _union_args(tp)
    return [tp] if members is None else [a for a in members if a is not type(None)]


def _is_optional(tp: Any) -> bool:
    members = _union_args(tp)
    return members is not None and type(None) in members


def _describe(tp: Any) -> str:
    """What a field expects, in words: 'an integer', 'a number or null', "one of 'a', 'b'"."""
    if _union_args(tp) is not None:
        text = " or ".join(_describe(a) for a in _non_null(tp))
        return f"{text} or null" if _is_optional(tp) else text
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"a list of {_describe(args[0])}s, e.g. [1,2]" if args else "a list, e.g. [1,2]"
    return {bool: "true or false (also yes/no, 1/0)", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _type_error(section: str, key: Any, value: Any, tp: Any) -> MoleflowError:
    return MoleflowError(f"{section}.{key}={value!r}: expected {_describe(tp)}")


def _convert_section(section: str, value: Any) -> Any:
    """A section's plain mapping -> its dataclass, every value converted to the declared type (pydantic, lax
    mode: "1e-4" -> 1e-4, "3" -> 3, 3 -> 3.0, "yes" -> True) and refused with one line when it cannot be
    (1.5 for an integer, "maybe" for a bool, a value outside a Literal's choices)."""
    import pydantic

    section_cls = _SECTION_TYPES[section]
    if not isinstance(value, dict):
        raise MoleflowError(f"config section {section!r} must be a mapping of keys to values, got {value!r}; {_SEE_ALL}")
    hints = _field_types(section_cls)
    unknown = sorted(str(k) for k in value if k not in hints)
    if unknown:
        hint = _did_you_mean(unknown[0], list(hints)) if len(unknown) == 1 else ""
        raise MoleflowError(f"unknown config key{'s' if len(unknown) > 1 else ''} in {section}: "
                            f"{', '.join(unknown)}{hint}; valid keys: {', '.join(hints)}; {_SEE_ALL}")
    clean: dict[str, Any] = {}
    for key, v in value.items():
        tp = hints[key]
        if isinstance(v, str) and _is_optional(tp) and v.strip().lower() in ("none", "null"):
            v = None
        # pydantic's lax mode reads True as 1: refuse a bool where only a number is wanted
        if isinstance(v, bool) and bool not in _non_null(tp) and any(t in (int, float) for t in _non_null(tp)):
            raise _type_error(section, key, v, tp)
        clean[key] = v
    try:
        return _adapter(section_cls).validate_python(clean)
    except pydantic.ValidationError as exc:
        messages = []
        for err in exc.errors():
            key = err["loc"][0] if err["loc"] else "?"
            messages.append(str(_type_error(section, key, err.get("input", value.get(key)), hints.get(key, Any))))
        raise MoleflowError("; ".join(dict.fromkeys(messages))) from None


def _resolve_key(dotted: str) -> tuple[str, str]:
    """'train.epochs' -> ('train', 'epochs'), or a one-line error listing the valid sections or keys."""
    parts = dotted.split(".")
    if len(parts) != 2:
        raise MoleflowError(f"config key {dotted!r} must look like section.key, e.g. train.epochs "
                            f"(sections: {_SECTIONS_TEXT}); {_SEE_ALL}")
    section, key = parts
    if section not in _SECTION_TYPES:
        raise MoleflowError(f"unknown config section {section!r} in {dotted!r}{_did_you_mean(section, list(_SECTION_TYPES))}; "
                            f"sections: {_SECTIONS_TEXT}; {_SEE_ALL}")
    keys = list(_field_types(_SECTION_TYPES[section]))
    if key not in keys:
        raise MoleflowError(f"unknown config key {dotted!r}{_did_you_mean(key, keys)}; "
                            f"valid keys in {section}: {', '.join(keys)}; {_SEE_ALL}")
    return section, key


def _parse_override(raw: str, tp: Any) -> Any:
    """A `--set` value: a YAML scalar or flow list (`[1,2]`); the typed conversion does the rest. A text
    field keeps the text as typed (`backbone.weights=007.pt`); text that is not YAML stays text."""
    import yaml

    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if value is not None and not isinstance(value, str) and str in _non_null(tp):
        return raw
    return value


def _main() -> Config:
    """MAIN of the paper (spec §1): WRN50, D=768, MoLE6 + DIA2, rank 64, TAL 0.7 / 0.02, 60 epochs."""
    return Config(backbone=BackboneConfig(name="wide_resnet50_2", embed_dim=768))


def _cpu_faithful() -> Config:
    """The method as specified, sized for a 2-core CPU: EfficientNet-Lite0, D=128, rank 16, 12 epochs.

    Every component of MAIN is on; only sizes shrink: D=128 (the lite0 layers give 360 and 1008
    aggregated channels, pooled to 128), LoRA rank 16 (rank is immaterial in MAIN, spec §11.4) and
    fewer epochs. This was the `cpu` preset before the accuracy work (docs/accuracy.md).
    """
    cfg = Config(backbone=BackboneConfig(name="tf_efficientnet_lite0", embed_dim=128))
    cfg.model.lora_rank = 16
    cfg.train.epochs = 12
    return cfg


def _cpu() -> Config:
    """The default: the best CPU setting found, chosen by `moleflow tune` on synthetic anomalies in held-out
    training normals (docs/accuracy.md §5, §7), never on test images. On top of `cpu-faithful`: the backbone's
    40 + 112 channels side by side (D = 152), a floor of 200 optimiser steps per task over at least 4
    epochs, each on a window of the token grid, elongated images cut into near-square tiles, and a per-product
    patch memory (a 1,000-token greedy coreset of its training patches) weighed 4 to 1 with the flow, and a router that
    measures every product with one pooled metric (chosen on training images with look-alike pairs,
    docs/decisions.md §8). Not the faithful method (the memory, tiling, windows and pooled metric are additions);
    `main`/`repo` are.
    """
    cfg = _cpu_faithful()
    cfg.backbone.feature_merge = "concat"
    cfg.backbone.embed_dim = None
    cfg.train.epochs = 4
    cfg.train.min_steps = 200
    # each step trains the flow on a window of about half the token grid's side (14 x 14 of 28 x 28, cut at the
    # edges so that every token is trained equally often): cheaper steps than the whole grid. The cheapest candidate
    # within 0.3 points of the whole grid on the faint validation, within the learning-cost goal (docs/accuracy.md
    # §7, §15; benchmarks/results/tune_step_window_faint.json)
    cfg.train.step_window = 0.5
    cfg.score.source = "flow+memory"
    # 1,000 coreset tokens per product: the smallest candidate no worse on synthetic validation than the
    # 20,000-token random memory (docs/decisions.md §7); the exact search is then ~20x cheaper
    cfg.score.memory_coreset = 1000
    # a patch's score: standardised flow NLL + 4 x standardised memory distance, chosen by the faint validation, the
    # one that ranks settings most like real defects (benchmarks/memory_weight_choice.py, docs/accuracy.md §14)
    cfg.score.memory_weight = 4.0
    cfg.data.tiling = "aspect"
    # routing: the nearest prototype, every product measured with one pooled metric (linear discriminant analysis),
    # and an ambiguous part (log distances within the margin) scored under every plausible product: chosen on held-out
    # training images with pasted defects and real look-alike pairs over the gated router of prototype and patch
    # memory (benchmarks/routing_pooled.py, docs/decisions.md §8); products within 0.1 of the nearest compared
    # again without the patches that fit none of them (limit 5), chosen on the same images
    # (benchmarks/routing_trimmed.py); the pooled covariance plus 2 x the mean of the products' painted-defect moves
    # (each product measures them on its own training images), chosen on the same validation by a rule written
    # before each seed ran (benchmarks/routing_nuisance.py), with the ambiguity margin (0.035) its rule gives there
    cfg.router.metric = "pooled"
    cfg.router.ambiguity_margin = 0.035
    cfg.router.trim_limit = 5.0
    cfg.router.trim_gate = 0.1
    cfg.router.defect_weight = 2.0
    return cfg


def _cpu_fine() -> Config:
    """`cpu` at 288 px (a 36 x 36 token grid instead of 28 x 28): the candidate the validation ranked first in the
    agreement study (docs/accuracy.md §10), for lines that can spend ~1.7x the learning time and half the
    throughput. Not the default: it misses the CPU speed targets (a product in a minute, >= 40 images/s)."""
    cfg = _cpu()
    cfg.data.image_size = 288
    return cfg


def _repo() -> Config:
    """Repo-faithful MAIN: the reference implementation's behaviour where §12 lists a bug we fix by default."""
    cfg = _main()
    cfg.model.lora_alpha = 1.0
    cfg.model.whitening_identity_init = False
    cfg.router.covariance = "ridge"
    cfg.router.statistic = "mean"
    cfg.model.experts = "task"
    cfg.train.drop_last = True
    cfg.data.resize_mode = "resize_crop"
    cfg.score.cluster_top_k_ratio = cfg.train.tail_ratio
    # the reference trains on every training image and holds nothing out for calibration: decision
    # thresholds then come from the training images themselves and are optimistic (too few false alarms)
    cfg.score.calibration_fraction = 0.0
    return cfg


def _tiny() -> Config:
    """A very small model for tests and smoke runs (not for accuracy)."""
    cfg = _cpu_faithful()
    cfg.backbone.embed_dim = 32
    cfg.data.image_size = 112
    cfg.model.num_coupling_blocks = 2
    cfg.model.lora_rank = 4
    cfg.train.epochs = 2
    cfg.train.batch_size = 8
    return cfg


PRESETS = {"main": _main, "cpu": _cpu, "cpu-fine": _cpu_fine, "cpu-faithful": _cpu_faithful, "repo": _repo,
           "tiny": _tiny}

# Named ablations (spec §9.2 / §11.2): each maps to config overrides of the base preset.
ABLATIONS: dict[str, dict[str, Any]] = {
    "no_lora": {"model.use_lora": False, "model.use_task_bias": False},
    "no_router": {"router.enabled": False},
    "no_task_adapter": {"model.task_adapter": "none"},
    "no_whitening_adapter": {"model.task_adapter": "soft_ln"},
    "no_pos_embedding": {"model.use_pos_embedding": False},
    "no_spatial_context": {"model.use_spatial_context": False},
    "no_scale_context": {"model.use_scale_context": False},
    "no_dia": {"model.dia_blocks": 0},
    "no_task_bias": {"model.use_task_bias": False},
    "no_mahalanobis": {"router.metric": "euclidean"},
    "no_tail_loss": {"train.tail_weight": 0.0},
    "no_logdet_reg": {"train.lambda_logdet": 0.0},
    "sequential": {"model.freeze_base": False},
    "task_separated": {"model.task_separated": True},
    "dia_only": {"model.num_coupling_blocks": 0},
}
