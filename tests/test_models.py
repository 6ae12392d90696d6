"""Backbones and the classifier: shapes, parameter count, external weights, checkpoint round trips."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from oodforge.models.backbones import BACKBONES, create_backbone
from oodforge.models.classifier import (
    CheckpointError,
    Classifier,
    ModelConfig,
    build_classifier,
    load_classifier,
    save_classifier,
)

CIFAR = {"in_channels": 3, "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)}


def trained_like(config: ModelConfig, seed: int = 0) -> Classifier:
    """A classifier whose BatchNorm running statistics are no longer the defaults, in eval mode."""
    torch.manual_seed(seed)
    model = build_classifier(config)
    channels, side = config.in_channels, 28 if config.backbone == "small_cnn" else 32
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model.logits(torch.rand(8, channels, side, side))
        for name, parameter in model.named_parameters():
            if "bn" in name or name.startswith("head"):
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def inputs(config: ModelConfig, n: int = 4, seed: int = 1) -> torch.Tensor:
    side = 28 if config.backbone == "small_cnn" else 32
    return torch.rand(n, config.in_channels, side, side, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("backbone", "in_channels", "side", "feature_dim"),
    [("small_cnn", 1, 28, 256), ("resnet20", 3, 32, 64), ("resnet18", 3, 32, 512)],
)
def test_backbones_give_features_and_logits(backbone, in_channels, side, feature_dim) -> None:
    config = ModelConfig(backbone=backbone, num_classes=7, in_channels=in_channels)
    model = build_classifier(config).eval()
    x = torch.rand(3, in_channels, side, side)
    with torch.no_grad():
        features = model.features(x)
        logits = model.logits(x)
        forward = model(x)
    assert model.backbone.feature_dim == feature_dim
    assert features.shape == (3, feature_dim)
    assert logits.shape == (3, 7)
    torch.testing.assert_close(forward, logits)
    torch.testing.assert_close(model.head(features), logits)


def test_classifier_normalizes_inputs_with_the_config_statistics() -> None:
    config = ModelConfig(backbone="small_cnn", in_channels=1, mean=(0.25,), std=(0.5,))
    model = build_classifier(config).eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model.features(x), model.backbone((x - 0.25) / 0.5))


def test_resnet20_has_about_0_27m_parameters() -> None:
    backbone = create_backbone("resnet20")
    count = sum(p.numel() for p in backbone.parameters())
    assert 260_000 <= count <= 280_000
    # conv1 (3*16*9) + bn1 (32) + 3 stages of 3 blocks; 64*10 + 10 for the CIFAR-10 linear head on top
    model = build_classifier(ModelConfig(backbone="resnet20", num_classes=10, in_channels=3))
    assert sum(p.numel() for p in model.parameters()) == count + 650


def test_registered_backbones() -> None:
    assert {"small_cnn", "resnet20", "resnet18"} <= set(BACKBONES.names())
    with pytest.raises(KeyError, match="resnet20"):
        create_backbone("resnet1000")


def external_checkpoint(model: Classifier) -> dict:
    """The model's weights in the public CIFAR ResNet layout: ``module.`` prefix, head as ``linear.*``."""
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith("head."):
            key = "linear." + key.removeprefix("head.")
        else:
            key = key.removeprefix("backbone.")
        state["module." + key] = value.clone()
    return {"state_dict": state, "best_prec1": 91.25}


def test_external_weights_load_and_reproduce_the_logits(tmp_path) -> None:
    config = ModelConfig(backbone="resnet20", num_classes=10, **CIFAR)
    original = trained_like(config)
    checkpoint = external_checkpoint(original)
    assert "module.linear.weight" in checkpoint["state_dict"]
    assert "module.conv1.weight" in checkpoint["state_dict"]
    assert not any(k.endswith("num_batches_tracked") for k in checkpoint["state_dict"])
    path = tmp_path / "resnet20-external.th"
    torch.save(checkpoint, path)
    loaded = load_classifier(path, config).eval()
    x = inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(x), original.logits(x), rtol=0, atol=0)


def test_external_plain_state_dict_with_fc_head_loads(tmp_path) -> None:
    config = ModelConfig(backbone="small_cnn", num_classes=10, in_channels=1)
    original = trained_like(config)
    state = {("fc." + k.removeprefix("head.")) if k.startswith("head.") else k.removeprefix("backbone."): v
             for k, v in original.state_dict().items()}
    torch.save(state, tmp_path / "plain.pt")
    loaded = load_classifier(tmp_path / "plain.pt", config).eval()
    x = inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(x), original.logits(x), rtol=0, atol=0)


def test_external_weights_need_a_config(tmp_path) -> None:
    config = ModelConfig(backbone="resnet20", num_classes=10, **CIFAR)
    torch.save(external_checkpoint(build_classifier(config)), tmp_path / "w.th")
    with pytest.raises(CheckpointError, match=r"w\.th"):
        load_classifier(tmp_path / "w.th")


def test_save_and_load_round_trip_gives_identical_logits(tmp_path) -> None:
    config = ModelConfig(backbone="resnet20", num_classes=5, **CIFAR)
    original = trained_like(config, seed=3)
    path = tmp_path / "run" / "model.pt"
    save_classifier(original, path, extra={"epochs": 2})
    assert path.is_file()
    assert not [p for p in path.parent.iterdir() if p.name != "model.pt"]  # no temporary file left behind
    loaded = load_classifier(path).eval()
    assert loaded.config == config
    assert isinstance(loaded.config.mean, tuple)
    x = inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(x), original.logits(x), rtol=0, atol=0)
    assert torch.load(path, weights_only=True)["extra"] == {"epochs": 2}


def test_corrupt_checkpoint_raises_checkpoint_error_naming_the_file(tmp_path) -> None:
    path = tmp_path / "broken-model.pt"
    path.write_bytes(np.random.default_rng(0).bytes(2048))
    with pytest.raises(CheckpointError, match=r"broken-model\.pt"):
        load_classifier(path, ModelConfig())


def test_missing_checkpoint_raises_checkpoint_error_naming_the_file(tmp_path) -> None:
    with pytest.raises(CheckpointError, match=r"nowhere\.pt"):
        load_classifier(tmp_path / "nowhere.pt", ModelConfig())


def test_checkpoint_that_is_not_a_dict_is_refused(tmp_path) -> None:
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"list\.pt"):
        load_classifier(tmp_path / "list.pt", ModelConfig())


def test_external_weights_with_missing_keys_raise(tmp_path) -> None:
    config = ModelConfig(backbone="resnet20", num_classes=10, **CIFAR)
    checkpoint = external_checkpoint(build_classifier(config))
    del checkpoint["state_dict"]["module.layer3.2.bn2.running_var"]
    torch.save(checkpoint, tmp_path / "partial.th")
    with pytest.raises(CheckpointError, match="running_var"):
        load_classifier(tmp_path / "partial.th", config)


def test_external_weights_with_wrong_shapes_raise_checkpoint_error(tmp_path) -> None:
    ten_classes = ModelConfig(backbone="resnet20", num_classes=10, **CIFAR)
    torch.save(external_checkpoint(build_classifier(ten_classes)), tmp_path / "ten.th")
    with pytest.raises(CheckpointError, match=r"ten\.th"):
        load_classifier(tmp_path / "ten.th", ModelConfig(backbone="resnet20", num_classes=5, **CIFAR))


def test_oodforge_checkpoint_with_wrong_shapes_raises_checkpoint_error(tmp_path) -> None:
    model = build_classifier(ModelConfig(backbone="small_cnn", num_classes=10))
    path = tmp_path / "model.pt"
    save_classifier(model, path)
    state = torch.load(path, weights_only=True)
    state["state_dict"]["head.weight"] = torch.zeros(3, 256)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"model\.pt"):
        load_classifier(path)


# ---------------------------------------------------------------- real weights


def real_file(relative: str) -> Path:
    if "OODFORGE_DATA" not in os.environ:
        pytest.skip("OODFORGE_DATA is not set")
    path = Path(os.environ["OODFORGE_DATA"]) / relative
    if not path.exists():
        pytest.skip(f"{path} is missing")
    return path


def test_real_resnet20_weights_load_without_missing_keys() -> None:
    path = real_file("weights/resnet20-12fca82f.th")
    config = ModelConfig(backbone="resnet20", num_classes=10, in_channels=3,
                         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    model = load_classifier(path, config).eval()  # raises CheckpointError on any missing/unexpected key
    raw = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    torch.testing.assert_close(model.backbone.conv1.weight, raw["module.conv1.weight"])
    torch.testing.assert_close(model.head.weight, raw["module.linear.weight"])
    torch.testing.assert_close(model.backbone.layer3[2].bn2.running_var, raw["module.layer3.2.bn2.running_var"])


def test_real_resnet20_classifies_cifar10_test_images() -> None:
    path = real_file("weights/resnet20-12fca82f.th")
    real_file("cifar10-jpeg.tar.gz")
    from oodforge.data.datasets import load_dataset

    config = ModelConfig(backbone="resnet20", num_classes=10, in_channels=3,
                         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    model = load_classifier(path, config).eval()
    test = load_dataset("cifar10", "test", os.environ["OODFORGE_DATA"])
    index = np.random.default_rng(0).choice(len(test), 500, replace=False)
    x = torch.from_numpy(test.images[index]).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        predicted = model.logits(x).argmax(dim=1).numpy()
    accuracy = (predicted == test.labels[index]).mean()
    assert accuracy > 0.7  # README: 81% on this JPEG copy; chance is 10%
