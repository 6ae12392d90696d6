"""NAC-UE, the Mahalanobis feature ensemble (mds_ensemble) and deep ensembles: against pytorch-ood 0.4.0 where it has
the method and against references written from the papers, on a tiny trained conv net."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_ood.detector as P
import pytorch_ood.detector.nac as pytorch_ood_nac
import torch
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import oodforge
from oodforge.detectors import create_detector
from oodforge.evaluation.extraction import extract_outputs
from oodforge.util.errors import ConfigError

CLASSES = 4


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10), nn.Softplus(),
                         nn.Linear(10, CLASSES))


def images(n: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CLASSES
    colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])
    return 0.6 * colours[labels].view(n, 3, 1, 1) + 0.4 * torch.rand(n, 3, 8, 8, generator=generator), labels


def noise(n: int, seed: int = 5) -> Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def trained(seed: int = 0, steps: int = 30) -> nn.Module:
    model = oodforge.wrap_model(small_net(seed), layers=["1", "3"])
    x, y = images(400)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return trained()


def loader(x: Tensor, y: Tensor, batch_size: int = 64) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def auroc(id_scores: Tensor, ood_scores: Tensor) -> float:
    labels = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    return roc_auc_score(labels, np.r_[id_scores.double().numpy(), ood_scores.double().numpy()])


# ----------------------------------------------------------------------------------------------------------- NAC
def authors_edges(bins: int) -> np.ndarray:
    """The histogram edges of the NAC authors' code (``logspace`` in ood_coverage's coverage.py), in NumPy."""
    x = np.linspace(1, np.sqrt(1000.0), num=bins // 2)
    left = np.log(x) / np.log(1000.0)
    edges = np.concatenate([left[:-1], (1 - left)[::-1]])
    edges[-1] += 1e-2
    return np.append(edges, 1.2)


def authors_bins(states: Tensor, m: int) -> Tensor:
    """pytorch-ood's bin function replaced by the authors' edges (pytorch-ood bins geometrically)."""
    edges = torch.from_numpy(authors_edges(m)).to(states)
    return (torch.bucketize(states.contiguous(), edges, right=True) - 1).clamp(0, len(edges) - 2)


def test_nac_equals_pytorch_ood_with_the_authors_bins(model, monkeypatch) -> None:
    """On (N, D) layers pooling is moot, so with pytorch-ood's bins swapped for the authors' its scores are ours (the
    paper's absolute steepness, relative=False) up to its sign and its sum (not mean) over layers; with its own
    geometric bins the scores differ."""
    x_train, y_train = images(400)
    test = torch.cat([images(60, seed=2)[0], noise(60)])
    ours = create_detector("nac", layers="5+7", alpha=100.0, relative=False, bins=50, coverage=20)
    ours.fit(loader(x_train, y_train), model)
    net = model.net
    geometric = P.NACUE(net, layers=[net[5], net[7]], m_bins=50, alpha=100.0, o_star=20).fit(loader(x_train, y_train))
    monkeypatch.setattr(pytorch_ood_nac, "_bin_indices_geometric", authors_bins)
    theirs = P.NACUE(net, layers=[net[5], net[7]], m_bins=50, alpha=100.0, o_star=20).fit(loader(x_train, y_train))
    scores = ours.score(model, test)
    torch.testing.assert_close(scores.double(), -theirs.predict(test).double() / 2, rtol=1e-4, atol=1e-4)
    monkeypatch.undo()
    assert not torch.allclose(scores.double(), -geometric.predict(test).double() / 2, atol=1e-3)
    assert auroc(scores[:60], scores[60:]) > 0.9


def numpy_nac(net: nn.Sequential, x_train: Tensor, x_test: Tensor, cut: int, alpha: float, bins: int,
              r: int) -> np.ndarray:
    """NAC-UE of one conv layer (the output of ``net[:cut]``) from the paper's formulas and the authors' pooling
    (sums over positions of the map and of its KL gradient), one image at a time, the steepness ``alpha`` over
    the RMS of the training products; histograms in NumPy."""

    def product(x: Tensor) -> np.ndarray:
        maps = net[:cut](x.unsqueeze(0)).detach().requires_grad_(True)
        log_p = torch.log_softmax(net[cut:](maps), dim=1)
        kl = (-math.log(log_p.shape[1]) - log_p).mean()
        (grad,) = torch.autograd.grad(kl, maps)
        return (maps.detach().sum(dim=(2, 3)).double() * grad.sum(dim=(2, 3)).double()).squeeze(0).numpy()

    train = np.stack([product(x) for x in x_train])  # (N, neurons)
    steepness = alpha / np.sqrt(np.mean(train**2))
    edges = authors_edges(bins)
    train_bins = np.digitize(1 / (1 + np.exp(-steepness * train)), edges) - 1
    counts = np.stack([np.bincount(column, minlength=len(edges) - 1) for column in train_bins.T])  # (neurons, bins)
    test = np.stack([product(x) for x in x_test])
    test_bins = np.digitize(1 / (1 + np.exp(-steepness * test)), edges) - 1
    covered = np.minimum(counts[np.arange(counts.shape[0]), test_bins] / r, 1.0)
    return covered.mean(axis=1)


def test_nac_matches_the_paper_on_conv_maps(model) -> None:
    x_train, y_train = images(200)
    test = torch.cat([images(30, seed=3)[0], noise(30)])
    detector = create_detector("nac", layers="1+3", alpha="1+3", bins=20, coverage=5, train_images=150, seed=4)
    detector.fit(loader(x_train, y_train, batch_size=32), model)
    rows = torch.randperm(200, generator=torch.Generator().manual_seed(4))[:150]
    net = model.net
    expected = (numpy_nac(net, x_train[rows], test, 2, 1.0, 20, 5) + numpy_nac(net, x_train[rows], test, 4, 3.0, 20, 5))
    scores = detector.score(model, test)
    np.testing.assert_allclose(scores.numpy(), expected / 2, rtol=1e-5, atol=1e-6)
    assert detector.counts_[0].sum() == 150 * 8 and detector.counts_[1].sum() == 150 * 12
    assert auroc(scores[:30], scores[30:]) > 0.8


def test_nac_parameters_are_checked_when_built(model) -> None:
    with pytest.raises(ConfigError, match="nac: alpha must be > 0"):
        create_detector("nac", alpha=0)
    with pytest.raises(ConfigError, match="nac: coverage has 3 values for 2 layers"):
        create_detector("nac", layers="1+3", coverage="1+2+3")
    with pytest.raises(ConfigError, match="nac: bins must be a number"):
        create_detector("nac", bins="many")
    with pytest.raises(ConfigError, match="fits on the training inputs"):
        create_detector("nac").fit(extract_outputs(model, images(20)[0], quiet=True), model)


# -------------------------------------------------------------------------------------------------- mds_ensemble
def fgsm_reference(net: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """The paper's FGSM adversarial images: x + eps * sign(grad_x CE), clipped to the pixel range."""
    x = x.clone().requires_grad_(True)
    nn.functional.cross_entropy(net(x), y).backward()
    return (x.detach() + eps * x.grad.sign()).clamp(0, 1)


@pytest.fixture(scope="module")
def mds_setting(model):
    x_train, y_train = images(400)
    keys = ["1@mean", "3@mean"]
    train = extract_outputs(model, TensorDataset(x_train, y_train), quiet=True, layers=keys)
    net = model.net
    references = []
    for key, cut in zip(keys, (2, 4), strict=True):
        reference = P.MahalanobisODIN(lambda x, cut=cut: net[:cut](x).mean(dim=(2, 3)), eps=0.002)
        references.append(reference.fit_features(train.layers[key], y_train))
    detector = create_detector("mds_ensemble", layers="1+3", epsilon=0.002, regression_images=120, seed=1)
    detector.fit(loader(x_train, y_train), model)
    return x_train, y_train, references, detector


def reference_layer_scores(references, x: Tensor, n_train: int) -> Tensor:
    """M_l of each layer from pytorch-ood's MahalanobisODIN, which scores half the squared distance with an
    unnormalised covariance (so ours is -2N times its score)."""
    return torch.stack([-2 * n_train * r.predict(x).double() for r in references], dim=1)


def test_mds_ensemble_layer_scores_equal_pytorch_ood_mahalanobis_odin(model, mds_setting) -> None:
    x_train, _, references, detector = mds_setting
    x = torch.cat([images(40, seed=6)[0], noise(40)])
    torch.testing.assert_close(detector.layer_scores(model, x), reference_layer_scores(references, x, len(x_train)),
                               rtol=1e-3, atol=1e-3)


def test_mds_ensemble_regression_matches_the_paper(model, mds_setting) -> None:
    """The regression of the paper's OOD-free variant: ID images (1) against their FGSM images (0), fitted by
    LogisticRegressionCV on standardized per-layer scores; the score is the regression's log-odds."""
    x_train, y_train, references, detector = mds_setting
    rows = torch.randperm(400, generator=torch.Generator().manual_seed(1))[:120].sort().values
    x_fit, y_fit = x_train[rows], y_train[rows]
    clean = reference_layer_scores(references, x_fit, 400).numpy()
    adversarial = reference_layer_scores(references, fgsm_reference(model.net, x_fit, y_fit, 0.05), 400).numpy()
    data, labels = np.r_[clean, adversarial], np.r_[np.ones(120), np.zeros(120)]
    centre, scale = data.mean(axis=0), data.std(axis=0)
    regression = LogisticRegressionCV(l1_ratios=(0.0,), scoring="accuracy", use_legacy_attributes=False,
                                      max_iter=1000).fit((data - centre) / scale, labels)
    test = torch.cat([images(40, seed=7)[0], noise(40, seed=8)])
    expected = regression.decision_function((reference_layer_scores(references, test, 400).numpy() - centre) / scale)
    scores = detector.score(model, test)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-3, atol=1e-3)
    assert auroc(scores[:40], scores[40:]) > 0.9


def test_mds_ensemble_parameters_are_checked_when_built() -> None:
    with pytest.raises(ConfigError, match="mds_ensemble: epsilon must be >= 0"):
        create_detector("mds_ensemble", epsilon=-0.1)
    with pytest.raises(ConfigError, match="mds_ensemble: adversarial_epsilon"):
        create_detector("mds_ensemble", adversarial_epsilon=0)


# ------------------------------------------------------------------------------------------------------ ensemble
def test_ensemble_is_the_max_of_the_mean_softmax_of_its_members(model, tmp_path) -> None:
    second, third = trained(seed=1, steps=10), trained(seed=2, steps=5)
    torch.save(second.net.state_dict(), tmp_path / "second.pt")  # the bare net's weights
    torch.save({"format": "oodforge-classifier", "state_dict": third.state_dict()}, tmp_path / "third.pt")
    detector = create_detector("ensemble", members=f"{tmp_path / 'second.pt'}+{tmp_path / 'third.pt'}")
    x = torch.cat([images(20, seed=9)[0], noise(20)])
    with torch.no_grad():
        probabilities = [torch.softmax(m(x), dim=1).numpy() for m in (model, second, third)]
    expected = (sum(probabilities) / 3).max(axis=1)
    np.testing.assert_allclose(detector.score(model, x).numpy(), expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(expected, probabilities[0].max(axis=1), atol=1e-3)  # the members count


def test_ensemble_refuses_missing_and_unfitting_members(model, tmp_path) -> None:
    torch.save(model.state_dict(), tmp_path / "good.pt")
    with pytest.raises(ConfigError, match=r"ensemble: members file not found: .*nope\.pt$"):
        create_detector("ensemble", members=f"{tmp_path / 'good.pt'}+{tmp_path / 'nope.pt'}")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    detector = create_detector("ensemble", members=str(tmp_path / "other.pt"))
    with pytest.raises(ConfigError, match="other.pt does not fit the model"):
        detector.score(model, images(4)[0])
