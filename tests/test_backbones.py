from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models import ResNet18_Weights, get_model

from storage.checkpoints import CHECKPOINT_FORMAT
from tasks.backbones.config import BackboneConfig, resolve
from tasks.backbones.config import BackboneError
from tasks.backbones.source import WeightsNotFoundError
from tasks.backbones.models import build, hub_file


def features(extractor, x):
    with torch.inference_mode():
        return extractor(x)


def reference_model(seed: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = get_model("resnet18", weights=None, num_classes=7)
    model.fc = torch.nn.Identity()
    return model.eval()


def test_preprocessing_comes_from_the_weights_unless_overridden():
    spec = resolve(BackboneConfig(name="resnet18", weights="DEFAULT"))
    assert spec.weights_id == "ResNet18_Weights.IMAGENET1K_V1"
    assert (spec.preprocess.resize, spec.preprocess.crop, spec.preprocess.interpolation) == (256, 224, "bilinear")
    assert spec.preprocess.mean == (0.485, 0.456, 0.406)
    over = resolve(BackboneConfig(name="resnet18", weights="none", preprocess={"resize": 40, "crop": 32, "mean": [0.5] * 3}))
    assert (over.preprocess.resize, over.preprocess.crop, over.preprocess.mean) == (40, 32, (0.5, 0.5, 0.5))
    assert over.preprocess.std == (0.229, 0.224, 0.225)  # torchvision's ImageNet default for the model
    vit = resolve(BackboneConfig(name="vit_b_16", weights="none"))
    assert (vit.preprocess.resize, vit.preprocess.crop) == (256, 224)


def test_enum_weights_missing_from_hub_cache_say_which_file_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    spec = resolve(BackboneConfig(name="resnet18", weights="IMAGENET1K_V1"))
    with pytest.raises(WeightsNotFoundError) as exc:
        build(spec)
    msg = str(exc.value)
    assert ResNet18_Weights.IMAGENET1K_V1.url in msg
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in msg
    assert "never downloads" in msg and "backbone.weights" in msg


def test_enum_weights_are_read_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(5)
    source = get_model("resnet18", weights=None)  # 1000 classes, as the real file has
    path = hub_file(ResNet18_Weights.IMAGENET1K_V1)
    path.parent.mkdir(parents=True)
    torch.save(source.state_dict(), path)
    extractor = build(resolve(BackboneConfig(name="resnet18", weights="DEFAULT")))
    source.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(features(extractor, x)["penultimate"], source.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("wrap", ["plain", "checkpoint", "dataparallel", "safetensors"])
def test_local_weights_file(tmp_path, wrap):
    model = reference_model()
    torch.manual_seed(3)
    state = get_model("resnet18", weights=None, num_classes=7).state_dict()  # head of another size: dropped
    path = tmp_path / ("w.safetensors" if wrap == "safetensors" else "w.pt")
    if wrap == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        payload = {
            "plain": state,
            "checkpoint": {"format": CHECKPOINT_FORMAT, "model": state, "epoch": 3},
            "dataparallel": {f"module.{k}": v for k, v in state.items()},
        }[wrap]
        torch.save(payload, path)
    spec = resolve(BackboneConfig(name="resnet18", weights=str(path)))
    assert spec.weights_id.startswith("sha256:")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(features(build(spec), x)["penultimate"], model(x), rtol=0, atol=0)


def test_bad_weights_files_are_refused_by_name(tmp_path):
    with pytest.raises(BackboneError, match="weights file .*nope.pt does not exist"):
        resolve(BackboneConfig(name="resnet18", weights=str(tmp_path / "nope.pt")))
    pickled = tmp_path / "object.pt"
    torch.save({"model": Path("not a tensor")}, pickled)  # loading it would need unpickling a class
    with pytest.raises(BackboneError, match="cannot load weights file .*object.pt"):
        build(resolve(BackboneConfig(name="resnet18", weights=str(pickled))))
    other = tmp_path / "mobilenet.pt"
    torch.save(get_model("mobilenet_v3_small", weights=None).state_dict(), other)
    with pytest.raises(BackboneError, match="do not fit resnet18"):
        build(resolve(BackboneConfig(name="resnet18", weights=str(other))))


def test_several_layers_in_one_forward_are_pooled():
    spec = resolve(BackboneConfig(name="resnet18", weights="none", layers=["layer2", "penultimate", "layer4.1.conv2"]))
    out = features(build(spec), torch.randn(3, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "layer2": (3, 128), "penultimate": (3, 512), "layer4.1.conv2": (3, 512),
    }
    assert list(out) == ["layer2", "penultimate", "layer4.1.conv2"]


def test_token_models_pool_over_tokens():
    spec = resolve(BackboneConfig(name="vit_b_32", weights="none", layers=["encoder.layers.encoder_layer_0"]))
    extractor = build(spec)
    out = features(extractor, torch.randn(1, 3, 224, 224))
    assert out["encoder.layers.encoder_layer_0"].shape == (1, 768)


def test_random_init_is_reproducible_and_keyed_by_seed():
    x = torch.randn(2, 3, 32, 32)
    a = features(build(resolve(BackboneConfig(name="resnet18", weights="none"))), x)["penultimate"]
    b = features(build(resolve(BackboneConfig(name="resnet18", weights="none"))), x)["penultimate"]
    c_spec = resolve(BackboneConfig(name="resnet18", weights="none", init_seed=1))
    c = features(build(c_spec), x)["penultimate"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert c_spec.weights_id == "none(seed=1)"


def test_frozen_extractor_has_no_trainable_parameters():
    extractor = build(resolve(BackboneConfig(name="resnet18", weights="none")))
    assert not extractor.training
    assert not any(p.requires_grad for p in extractor.parameters())
