"""Intermediate layers: default layer names per family, hooks, reductions, the output cache, and the detectors that
read them (multi_mahalanobis, gram, rankfeat) against pytorch-ood 0.4.0 and NumPy references."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_ood.detector as P
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import oodforge
from oodforge.data.imageset import ImageSet
from oodforge.detectors import create_detector
from oodforge.detectors.base import forward_outputs
from oodforge.detectors.layers import gram_features, rank1_removed_mean, spatial_mean
from oodforge.evaluation.cache import OutputCache
from oodforge.evaluation.extraction import extract_outputs
from oodforge.models.adapters import build_model
from oodforge.util.errors import ConfigError

CLASSES = 4


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, CLASSES))


def images(n: int, shift: float = 0.0, seed: int = 1) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CLASSES
    colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])
    x = 0.6 * colours[labels].view(n, 3, 1, 1) + 0.4 * torch.rand(n, 3, 8, 8, generator=generator) + shift
    return x, labels


@pytest.fixture(scope="module")
def setting():
    model = oodforge.wrap_model(small_net(), layers=["1", "3"])
    x_train, y_train = images(400)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(30):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x_train), y_train).backward()
        optimizer.step()
    model.eval()
    keys = ["1@mean", "3@mean", "1@gram3", "3@gram3", "3@rankfeat"]
    train = extract_outputs(model, TensorDataset(x_train, y_train), quiet=True, layers=keys)
    test = extract_outputs(model, images(120, seed=2)[0], quiet=True, layers=keys)
    ood = extract_outputs(model, torch.rand(120, 3, 8, 8) * 1.5, quiet=True, layers=keys)
    return model, x_train, y_train, train, test, ood


def auroc(id_scores: Tensor, ood_scores: Tensor) -> float:
    labels = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    return roc_auc_score(labels, np.r_[id_scores.double().numpy(), ood_scores.double().numpy()])


def test_default_layers_of_each_family() -> None:
    resnet = oodforge.wrap_model(build_model("torchvision:resnet18", num_classes=10))
    assert resnet.default_layers() == ["layer1", "layer2", "layer3", "layer4"]
    convnext = oodforge.wrap_model(build_model("torchvision:convnext_tiny", num_classes=10))
    assert convnext.default_layers() == ["features.1", "features.3", "features.5", "features.7"]
    timm_net = oodforge.wrap_model(build_model("timm:resnet18", num_classes=10))
    assert timm_net.default_layers()[-4:] == ["layer1", "layer2", "layer3", "layer4"]
    from oodforge.models.classifier import Classifier, ModelConfig

    assert Classifier(ModelConfig(backbone="resnet20", num_classes=10)).default_layers() == [
        "backbone.layer1", "backbone.layer2", "backbone.layer3"]
    assert oodforge.wrap_model(small_net()).default_layers() == []
    with pytest.raises(ConfigError, match="layer 'nope' not found"):
        oodforge.wrap_model(small_net(), layers=["nope"])


@pytest.mark.parametrize("spec", ["torchvision:resnet18", "timm:resnet18"])
def test_last_stage_mean_is_the_penultimate_feature(spec: str) -> None:
    model = oodforge.wrap_model(build_model(spec, num_classes=10)).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features, logits, layers = forward_outputs(model, x, ["layer4@mean", "layer2@mean"])
    torch.testing.assert_close(layers["layer4@mean"], features, rtol=1e-5, atol=1e-6)
    assert layers["layer2@mean"].shape == (2, 128) and logits.shape == (2, 10)


def test_reductions_against_numpy_and_pytorch_ood() -> None:
    maps = torch.relu(torch.randn(3, 5, 4, 4, dtype=torch.float64)).float()
    np.testing.assert_allclose(spatial_mean(maps).numpy(), maps.numpy().mean(axis=(2, 3)), rtol=1e-6)
    gram = gram_features(maps, 3)
    for p in range(1, 4):
        expected = P.Gram._gram_vector(maps.double(), p).float()
        torch.testing.assert_close(gram[:, (p - 1) * 5 : p * 5], expected, rtol=1e-5, atol=1e-6)
    removed = rank1_removed_mean(maps)
    for i, m in enumerate(maps.double().numpy()):
        u, s, vt = np.linalg.svd(m.reshape(5, 16), full_matrices=False)
        reference = (m.reshape(5, 16) - s[0] * np.outer(u[:, 0], vt[0])).mean(axis=1)
        np.testing.assert_allclose(removed[i].numpy(), reference, atol=1e-4)


def test_multi_mahalanobis_equals_pytorch_ood(setting) -> None:
    model, _, y_train, train, test, ood = setting
    ours = create_detector("multi_mahalanobis", layers="1+3", weights="1+0.5").fit(train, model)
    theirs = P.MultiMahalanobis([nn.Identity()], alpha=[1.0, 0.5])
    theirs.fit_structured([train.layers["1@mean"], train.layers["3@mean"]], y_train)
    n = len(y_train)
    for outputs in (test, ood):
        other = theirs.predict_structured([outputs.layers["1@mean"], outputs.layers["3@mean"]])
        torch.testing.assert_close(ours.score_outputs(outputs).double(), -2 * n * other.double(), rtol=1e-3, atol=1e-3)
    assert auroc(ours.score_outputs(test), ours.score_outputs(ood)) > 0.9


def numpy_gram(train, test, orders: int, holdout: float, seed: int, keys: list[str]) -> np.ndarray:
    """Gram's score from the paper's formulas, in NumPy (the class split drawn as the detector documents)."""
    predicted = train.logits.argmax(dim=1)
    generator = torch.Generator().manual_seed(seed)
    fit, held = {}, {}
    for c in range(CLASSES):
        rows = torch.nonzero(predicted == c).flatten()
        rows = rows[torch.randperm(len(rows), generator=generator)].numpy()
        cut = int(holdout * len(rows))
        fit[c], held[c] = rows[cut:], rows[:cut]
    test_pred = test.logits.argmax(dim=1).numpy()
    train_pred = predicted.numpy()
    total = np.zeros(len(test))
    for key in keys:
        g, t = train.layers[key].double().numpy(), test.layers[key].double().numpy()
        low = np.stack([g[fit[c]].min(axis=0) for c in range(CLASSES)])
        high = np.stack([g[fit[c]].max(axis=0) for c in range(CLASSES)])

        def deviation(values, classes, low=low, high=high):
            lo, hi = low[classes], high[classes]
            return (np.maximum(lo - values, 0) / np.abs(lo + 1e-6) + np.maximum(values - hi, 0) / np.abs(hi + 1e-6)
                    ).sum(axis=1)

        rows = np.concatenate([held[c] for c in range(CLASSES)])
        norm = deviation(g[rows], train_pred[rows]).mean()
        total += deviation(t, test_pred) / (norm if norm > 0 else 1.0)
    return -total


def test_gram_matches_the_paper_in_numpy(setting) -> None:
    model, _, _, train, test, ood = setting
    detector = create_detector("gram", orders=3).fit(train, model)
    assert detector.keys_ == ["1@gram3", "3@gram3"]
    for outputs in (test, ood):
        expected = numpy_gram(train, outputs, 3, 0.1, 0, detector.keys_)
        np.testing.assert_allclose(detector.score_outputs(outputs).numpy(), expected, rtol=1e-5, atol=1e-4)
    assert auroc(detector.score_outputs(test), detector.score_outputs(ood)) > 0.7


def test_rankfeat_equals_pytorch_ood_with_the_full_svd(setting) -> None:
    model, *_ = setting
    net = model.net
    x = torch.cat([images(20, seed=3)[0], torch.rand(20, 3, 8, 8)])
    theirs = P.RankFeat(backbone=net[:4], head=lambda maps: net[4:](maps))
    with torch.no_grad():
        expected = -theirs.predict(x)
    ours = create_detector("rankfeat")._ready(None, model)
    torch.testing.assert_close(ours.score(model, x), expected.float(), rtol=1e-3, atol=1e-3)


def test_layers_are_cached_per_key_and_reused(setting, tmp_path) -> None:
    model, *_ = setting
    pixels = (torch.rand(30, 8, 8, 3) * 255).to(torch.uint8).numpy()
    data = ImageSet("tiny", pixels, np.arange(30) % CLASSES)
    cache = OutputCache(tmp_path)
    first = cache.outputs(model, data, quiet=True, layers=["1@mean"])
    expected = first.layers["1@mean"].clone()
    layer_folders = list(tmp_path.rglob("values.npy"))
    assert len(layer_folders) == 1
    again = cache.outputs(model, data, quiet=True, layers=["1@mean", "3@gram2"])
    assert len(list(tmp_path.rglob("values.npy"))) == 2
    torch.testing.assert_close(again.layers["1@mean"], first.layers["1@mean"])
    fresh = OutputCache(tmp_path / "other").outputs(model, data, quiet=True, layers=["3@gram2"])
    torch.testing.assert_close(again.layers["3@gram2"], fresh.layers["3@gram2"])
    layer_folders[0].write_bytes(b"damaged")  # a damaged entry is recomputed, not read
    torch.testing.assert_close(cache.outputs(model, data, quiet=True, layers=["1@mean"]).layers["1@mean"], expected)


def test_evaluate_ood_runs_multi_layer_detectors(setting, tmp_path) -> None:
    model, x_train, y_train, *_ = setting
    results = oodforge.evaluate_ood(model, TensorDataset(x_train, y_train), TensorDataset(*images(80, seed=4)),
                                    {"noise": torch.rand(80, 3, 8, 8) * 1.5},
                                    detectors="gram,multi_mahalanobis,rankfeat", out=tmp_path / "run", quiet=True)
    by_detector = {row["detector"]: row["auroc"] for row in results.rows}
    assert set(by_detector) == {"gram", "multi_mahalanobis", "rankfeat"}
    assert by_detector["multi_mahalanobis"] > 0.9


def test_bad_layer_names_are_one_error(setting) -> None:
    model, *_ = setting
    with pytest.raises(ConfigError, match="no layer 'nope'"):
        create_detector("gram", layers="nope").score(model, torch.rand(2, 3, 8, 8))
    with pytest.raises(ConfigError, match="unknown layer reduction"):
        forward_outputs(model, torch.rand(2, 3, 8, 8), ["1@median"])
    with pytest.raises(ConfigError, match="names no default layers"):
        create_detector("gram").layer_keys(oodforge.wrap_model(small_net()))
    with pytest.raises(ConfigError, match="rankfeat: layer"):
        create_detector("rankfeat", layer="1+3")


def test_reductions_run_in_float32_under_bf16_autocast(setting) -> None:
    model, *_ = setting
    x = images(8, seed=5)[0]
    with torch.no_grad():
        _, _, plain = forward_outputs(model, x, ["3@rankfeat"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, _, mixed = forward_outputs(model, x, ["3@rankfeat"])
    assert mixed["3@rankfeat"].dtype == torch.float32
    # the maps themselves come out of bf16 convolutions; the power iteration on them must not lose more
    torch.testing.assert_close(mixed["3@rankfeat"], plain["3@rankfeat"], rtol=0.05, atol=0.05)


MULTI_LAYER = "gram,multi_mahalanobis,rankfeat,nac:train_images=40,mds_ensemble:regression_images=40"


@pytest.mark.parametrize("spec", ["torchvision:resnet18", "timm:resnet18"])
def test_multi_layer_detectors_run_on_torchvision_and_timm_networks(spec: str, tmp_path) -> None:
    """Every detector that reads intermediate layers, on a torchvision and a timm ResNet-18 through wrap_model, with
    the default layers (the four stages), end to end through evaluate_ood."""
    torch.manual_seed(0)
    model = oodforge.wrap_model(build_model(spec, num_classes=CLASSES)).eval()
    x_train, y_train = images(48, seed=6)
    big = nn.functional.interpolate(x_train, size=32)
    results = oodforge.evaluate_ood(model, TensorDataset(big, y_train),
                                    TensorDataset(nn.functional.interpolate(images(24, seed=7)[0], size=32)),
                                    {"noise": torch.rand(24, 3, 32, 32)}, detectors=MULTI_LAYER, quiet=True,
                                    out=tmp_path / "run", batch_size=24)
    rows = {row["detector"]: row for row in results.rows}
    assert len(rows) == 5, sorted(rows)
    assert all(np.isfinite(row["auroc"]) for row in rows.values())
