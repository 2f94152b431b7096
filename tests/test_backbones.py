"""Backbones: offline ImageNet weights that really classify, never silently random, feature shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moleflow import MoleflowError
from moleflow.backbones import FeatureExtractor, weights_env_var
from moleflow.config import BackboneConfig
from moleflow.data.transforms import ImageTransform


@pytest.mark.parametrize("name,size,channels", [("tf_efficientnet_lite0", 224, (40, 112)),
                                                ("tf_efficientnet_lite2", 260, (48, 120))])
def test_lite_weights_from_the_wheels_classify_a_cat(name, size, channels):
    """The positional key mapping is right: skimage's chelsea is an Egyptian cat (ImageNet class 285)."""
    import timm
    from PIL import Image
    from skimage import data

    from moleflow.backbones import lite_state_dict

    model = timm.create_model(name, pretrained=False)
    model.load_state_dict(lite_state_dict(name))
    model.eval()
    x = ImageTransform(size, "resize_crop")(Image.fromarray(data.chelsea()))[None]
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    assert probs.argmax().item() == 285
    assert probs[285] > 0.3  # a random network gives ~0.001
    ext = FeatureExtractor(BackboneConfig(name=name, feature_merge="concat"))
    assert ext.weights_source.startswith(name.replace("tf_efficientnet_", "efficientnet-"))
    assert ext.embed_dim == sum(channels) and len(ext.weights_sha256) == 64
    assert ext.tokens(torch.randn(1, 3, 256, 256)).shape == (1, 32, 32, sum(channels))


def test_cnn_feature_shapes_and_routing_feature():
    ext = FeatureExtractor(BackboneConfig(name="tf_efficientnet_lite0", embed_dim=64))
    assert ext.weights_source.startswith("efficientnet-lite0")
    tokens, routing = ext(torch.randn(2, 3, 224, 224))
    assert tokens.shape == (2, 28, 28, 64)
    torch.testing.assert_close(routing, tokens.mean(dim=(1, 2)))
    assert all(not p.requires_grad for p in ext.parameters())
    ext.train()
    assert not ext.model.training  # frozen batch-norm statistics


def test_wide_resnet_never_runs_with_random_weights_silently(monkeypatch):
    monkeypatch.delenv(weights_env_var("wide_resnet50_2"), raising=False)
    import moleflow.backbones as backbones

    def offline():
        raise OSError("no internet")

    monkeypatch.setattr(backbones, "_wrn50_download", offline)
    with pytest.raises(MoleflowError, match="MOLEFLOW_WEIGHTS_WIDE_RESNET50_2"):
        FeatureExtractor(BackboneConfig(name="wide_resnet50_2"))


def test_wide_resnet_loads_a_local_weights_file(tmp_path, monkeypatch):
    """A torchvision-format file (here: random tensors of the right shapes) is loaded and hashed."""
    import torchvision

    state = torchvision.models.wide_resnet50_2(weights=None).state_dict()
    path = tmp_path / "wrn50.pth"
    torch.save(state, path)
    monkeypatch.setenv(weights_env_var("wide_resnet50_2"), str(path))
    ext = FeatureExtractor(BackboneConfig(name="wide_resnet50_2", embed_dim=64))
    assert ext.weights_source == str(path)
    torch.testing.assert_close(ext.model.state_dict()["conv1.weight"], state["conv1.weight"])
    tokens, _ = ext(torch.randn(1, 3, 64, 64))
    assert tokens.shape == (1, 8, 8, 64)


def test_wrong_weights_file_is_refused(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(3)}, path)
    with pytest.raises(MoleflowError, match="miss"):
        FeatureExtractor(BackboneConfig(name="wide_resnet50_2", weights=str(path)))
    with pytest.raises(MoleflowError, match="not found"):
        FeatureExtractor(BackboneConfig(name="wide_resnet50_2", weights=str(tmp_path / "none.pth")))


def test_random_weights_only_when_asked_and_deterministic():
    a = FeatureExtractor(BackboneConfig(name="wide_resnet50_2", random_weights=True, embed_dim=32))
    b = FeatureExtractor(BackboneConfig(name="wide_resnet50_2", random_weights=True, embed_dim=32))
    assert a.weights_source == "random"
    assert a.weights_sha256 == b.weights_sha256


def test_vit_uses_its_own_normalisation_and_grid():
    ext = FeatureExtractor(BackboneConfig(name="vit_base_patch16_224", random_weights=True))
    assert ext.mean == (0.5, 0.5, 0.5) and ext.std == (0.5, 0.5, 0.5)
    tokens, routing = ext(torch.randn(1, 3, 224, 224))
    assert tokens.shape == (1, 14, 14, 768)
    assert np.isfinite(routing.numpy()).all()


def test_unknown_backbone():
    with pytest.raises(MoleflowError, match="unknown backbone"):
        FeatureExtractor(BackboneConfig(name="resnet9000", random_weights=True))
