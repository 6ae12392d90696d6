"""Detectors that perturb or resample the inputs: Mahalanobis with input preprocessing, MC dropout, iODIN, AdaScale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import oodforge
from oodforge.detectors import create_detector
from oodforge.detectors.base import ModelOutputs, features_and_logits
from oodforge.util.errors import ConfigError

pytorch_ood = pytest.importorskip("pytorch_ood")


class Net(nn.Module):
    """A tiny image classifier: 3x4x4 inputs, 16 tanh features (a full-rank covariance), 4 classes."""

    def __init__(self, dropout: float = 0.0, batch_norm: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers = [nn.Flatten(), nn.Linear(48, 16)] + ([nn.BatchNorm1d(16)] if batch_norm else []) + [nn.Tanh()]
        self.body = nn.Sequential(*layers, *([nn.Dropout(dropout)] if dropout else []))
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.body(x))


def images(n: int, seed: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y): 4 classes, each a fixed random pattern plus noise; ``scale`` > 1 moves images off the data."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(99))
    labels = torch.arange(n) % 4
    x = patterns[labels] + 0.3 * torch.randn(n, 3, 4, 4, generator=generator)
    return scale * x, labels


def outputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> ModelOutputs:
    with torch.no_grad():
        features, logits = features_and_logits(model, x)
    return ModelOutputs(logits, features.flatten(1), y)


@pytest.fixture(scope="module")
def tiny():
    model = oodforge.wrap_model(Net()).eval()
    x, y = images(120, seed=1)
    return model, outputs(model, x, y), images(30, seed=2)[0]


# ----------------------------------------------------------------------------- mahalanobis_odin


def _paper_statistics(train: ModelOutputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means and the inverse of the class-centred covariance divided by N (Lee et al.), in NumPy."""
    z, y = train.features.double().numpy(), train.labels.numpy()
    means = np.stack([z[y == c].mean(axis=0) for c in range(4)])
    centred = z - means[y]
    return torch.from_numpy(means), torch.from_numpy(np.linalg.inv(centred.T @ centred / len(z)))


def test_mahalanobis_odin_matches_pytorch_ood_given_the_papers_covariance(tiny) -> None:
    from pytorch_ood.detector import MahalanobisODIN

    model, train, x = tiny
    means, precision = _paper_statistics(train)
    reference = MahalanobisODIN(model.features, eps=0.01)
    reference.fit_features(train.features, train.labels)
    reference._base.mu, reference._base.precision = means.float(), precision.float()
    expected = -2.0 * reference.predict(x)  # its outlier score is half the squared distance
    ours = create_detector("mahalanobis_odin", epsilon=0.01).fit(train, model)
    torch.testing.assert_close(ours.score(model, x), expected, rtol=1e-4, atol=1e-4)
    plain = create_detector("mahalanobis").fit(train, model).score_outputs(outputs(model, x))
    assert not torch.allclose(ours.score(model, x), plain), "the input step changes the scores"
    assert (ours.score(model, x) > plain).float().mean() > 0.9, "the step moves inputs towards their nearest mean"


def test_mahalanobis_odin_differs_from_pytorch_ood_by_its_covariance_scale(tiny) -> None:
    """pytorch-ood does not divide the covariance by N: its distances are N times smaller (same ranking)."""
    from pytorch_ood.detector import MahalanobisODIN

    model, train, x = tiny
    reference = MahalanobisODIN(model.features, eps=0.01).fit_features(train.features, train.labels)
    ours = create_detector("mahalanobis_odin", epsilon=0.01).fit(train, model).score(model, x)
    torch.testing.assert_close(ours, -2.0 * len(train) * reference.predict(x), rtol=1e-3, atol=1e-3)


def test_mahalanobis_odin_at_zero_epsilon_is_mahalanobis_and_checks_epsilon(tiny) -> None:
    model, train, x = tiny
    plain = create_detector("mahalanobis").fit(train, model).score_outputs(outputs(model, x))
    torch.testing.assert_close(create_detector("mahalanobis_odin", epsilon=0.0).fit(train, model).score(model, x),
                               plain)
    with pytest.raises(ConfigError, match="mahalanobis_odin: epsilon"):
        create_detector("mahalanobis_odin", epsilon=-0.1)


# ----------------------------------------------------------------------------- mc_dropout


@pytest.mark.parametrize("mode", ["mean", "var"])
def test_mc_dropout_matches_pytorch_ood_mcd_with_the_same_seed(mode: str) -> None:
    from pytorch_ood.detector import MCD

    model = oodforge.wrap_model(Net(dropout=0.5, batch_norm=True)).eval()
    x = images(20, seed=3)[0]
    torch.manual_seed(7)
    expected = MCD(model, samples=10, mode=mode).predict(x)  # outlier scores: higher = more OOD
    ours = create_detector("mc_dropout", samples=10, mode=mode, seed=7).score(model, x)
    torch.testing.assert_close(ours, -expected, rtol=1e-5, atol=1e-6)
    assert not model.training and not any(m.training for m in model.modules()), "modes are restored"


def test_mc_dropout_keeps_batch_norm_in_eval_and_resamples_dropout() -> None:
    model = oodforge.wrap_model(Net(dropout=0.5, batch_norm=True)).eval()
    batch_norm = model.net.body[2]
    batch_norm.running_mean.fill_(0.25)
    x = images(20, seed=3)[0]
    with torch.no_grad():
        msp = torch.softmax(model(x), dim=1).max(dim=1).values
    state = torch.get_rng_state()
    scores = create_detector("mc_dropout", samples=8, seed=1).score(model, x)
    assert torch.equal(torch.get_rng_state(), state), "the global random state is left alone"
    assert torch.equal(batch_norm.running_mean, torch.full((16,), 0.25)), "BatchNorm statistics are not updated"
    torch.testing.assert_close(create_detector("mc_dropout", samples=8, seed=1).score(model, x), scores)
    assert not torch.allclose(create_detector("mc_dropout", samples=8, seed=2).score(model, x), scores)
    assert not torch.allclose(scores, msp), "dropout is active in the passes"
    assert (create_detector("mc_dropout", mode="var").score(model, x) < 0).all()


def test_mc_dropout_is_skipped_for_networks_without_dropout_and_checks_its_options() -> None:
    detector = create_detector("mc_dropout")
    assert detector.supports(oodforge.wrap_model(Net(dropout=0.3)))
    assert not detector.supports(oodforge.wrap_model(Net()))
    x, y = images(40, seed=4)
    results = oodforge.evaluate_ood(Net(), (x, y), x, {"far": images(20, seed=5, scale=4.0)[0]},
                                    detectors="mc_dropout,msp", quiet=True)
    assert [row["detector"] for row in results.rows] == ["msp"]
    with pytest.raises(ConfigError, match="mc_dropout: samples"):
        create_detector("mc_dropout", samples=1)
    with pytest.raises(ConfigError, match="mc_dropout: mode"):
        create_detector("mc_dropout", mode="entropy")
    with pytest.raises(ConfigError, match="score\\(model, x\\)"):
        detector.score_outputs(ModelOutputs(torch.zeros(2, 4), torch.zeros(2, 16)))


# ----------------------------------------------------------------------------- iodin


def _weights(model: nn.Module) -> tuple[np.ndarray, ...]:
    """W1, b1, W2, b2 of the tanh network: f(x) = W2 tanh(W1 x + b1) + b2."""
    body, head = model.net.body[1], model.net.fc
    return tuple(p.detach().double().numpy() for p in (body.weight, body.bias, head.weight, head.bias))


def _forward(weights: tuple[np.ndarray, ...], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w1, b1, w2, b2 = weights
    h = np.tanh(x @ w1.T + b1)
    return h, h @ w2.T + b2


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _iodin_reference(model: nn.Module, x: torch.Tensor, temperature: float, epsilon: float) -> np.ndarray:
    """iODIN from its definition, with the input gradient of the tanh network written out by hand."""
    weights = _weights(model)
    w1, _, w2, _ = weights
    flat = x.double().flatten(1).numpy()
    h, f = _forward(weights, flat)
    p = _softmax(f / temperature)
    d_logits = (p - np.eye(4)[f.argmax(axis=1)]) / temperature  # d CE(f / T, argmax) / d f
    gradient = ((d_logits @ w2) * (1 - h**2)) @ w1
    step = np.zeros_like(flat)
    rows, where = np.arange(len(flat)), np.abs(gradient).argmax(axis=1)
    step[rows, where] = np.where(gradient[rows, where] >= 0, 1.0, -1.0)
    return _softmax(_forward(weights, flat - epsilon * step)[1] / temperature).max(axis=1)


@pytest.mark.parametrize("temperature, epsilon", [(1.0, 0.3), (1000.0, 0.05)])
def test_iodin_matches_a_numpy_reference(tiny, temperature: float, epsilon: float) -> None:
    model, _, x = tiny
    ours = create_detector("iodin", temperature=temperature, epsilon=epsilon).score(model, x)
    np.testing.assert_allclose(ours.numpy(), _iodin_reference(model, x, temperature, epsilon), rtol=1e-5, atol=1e-7)


def test_iodin_steps_one_element_and_raises_confidence(tiny) -> None:
    model, train, x = tiny
    odin = create_detector("odin", temperature=1.0, epsilon=0.0).score(model, x)
    iodin = create_detector("iodin", temperature=1.0, epsilon=0.3).score(model, x)
    assert (iodin > odin).all(), "one step against the loss raises every sample's MSP"
    full = create_detector("odin", temperature=1.0, epsilon=0.3).score(model, x)
    assert ((iodin - odin) < (full - odin)).float().mean() > 0.9, "one element moves the MSP less than all of them"
    torch.testing.assert_close(create_detector("iodin", temperature=5.0, epsilon=0.0).score(model, x),
                               create_detector("odin", temperature=5.0, epsilon=0.0).score(model, x))
    with pytest.raises(ConfigError, match="iodin: temperature"):
        create_detector("iodin", temperature=0.0)


# ----------------------------------------------------------------------------- adascale_a / adascale_l

ADASCALE = {"p_min": 60.0, "p_max": 90.0, "shift_percent": 10.0, "correction_percent": 25.0, "shift_weight": 10.0,
            "perturb_fraction": 0.1, "epsilon": 0.2}


def _adascale_shift(weights: tuple[np.ndarray, ...], x: torch.Tensor, o: dict) -> tuple[np.ndarray, ...]:
    """(h, f, Q') from the paper's definitions, with the input gradient of the tanh network written out by hand."""
    w1, _, w2, _ = weights
    flat = x.double().flatten(1).numpy()
    h, f = _forward(weights, flat)
    gradient = ((w2[f.argmax(axis=1)]) * (1 - h**2)) @ w1  # d f_y / d x, y = argmax f
    count = max(1, int(flat.shape[1] * o["perturb_fraction"]))
    mask = np.zeros_like(flat)
    np.put_along_axis(mask, np.argsort(np.abs(gradient), axis=1)[:, :count], 1.0, axis=1)
    h_perturbed = _forward(weights, flat + o["epsilon"] * np.sign(gradient) * mask)[0]
    order = np.argsort(-h, axis=1)
    k1, k2 = (max(1, int(16 * o[k] / 100)) for k in ("shift_percent", "correction_percent"))
    q = np.take_along_axis(np.abs(h - h_perturbed), order[:, :k1], axis=1).sum(axis=1)
    c_o = np.take_along_axis(np.maximum(h_perturbed, 0), order[:, :k2], axis=1).sum(axis=1)
    return h, f, c_o + o["shift_weight"] * q


def _adascale_reference(model: nn.Module, train_x: torch.Tensor, x: torch.Tensor, variant: str, o: dict
                        ) -> np.ndarray:
    weights = _weights(model)
    reference = _adascale_shift(weights, train_x, o)[2]
    h, f, q = _adascale_shift(weights, x, o)
    cdf = (reference[None, :] <= q[:, None]).mean(axis=1)  # the ID empirical CDF at Q'
    p = o["p_min"] + (1 - cdf) * (o["p_max"] - o["p_min"])
    relu = np.maximum(h, 0)
    kept = np.maximum(16 - np.round(16 * p / 100), 1).astype(int)
    top = np.array([np.sort(row)[::-1][:k].sum() for row, k in zip(relu, kept, strict=True)])
    r = relu.sum(axis=1) / top
    w2, b2 = weights[2], weights[3]
    logits = (h * np.exp(r)[:, None]) @ w2.T + b2 if variant == "a" else f * (r**2)[:, None]
    return np.log(np.exp(logits).sum(axis=1))


@pytest.mark.parametrize("variant", ["a", "l"])
def test_adascale_matches_a_numpy_reference(tiny, variant: str) -> None:
    model, _, x = tiny
    train_x = images(120, seed=1)[0]
    detector = create_detector(f"adascale_{variant}", **ADASCALE).fit(train_x, model)
    expected = _adascale_reference(model, train_x, x, variant, ADASCALE)
    np.testing.assert_allclose(detector.score(model, x).numpy(), expected, rtol=1e-5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(train_x, torch.arange(120) % 4), batch_size=50)
    again = create_detector(f"adascale_{variant}", **ADASCALE).fit(loader, model)
    torch.testing.assert_close(again.score(model, x), detector.score(model, x))


def test_adascale_percentile_adapts_to_the_feature_shift(tiny) -> None:
    model, _, x = tiny
    detector = create_detector("adascale_a", **ADASCALE).fit(images(120, seed=1)[0], model)
    _, _, shift = detector.shift_statistics(model, x)
    p = detector.percentiles(shift)
    assert p.min() >= 60 and p.max() <= 90 and p.std() > 3, "percentiles spread over [p_min, p_max]"
    order = shift.argsort()
    assert (p[order].diff() <= 0).all(), "a larger shift Q' gets a lower percentile (weaker scaling)"
    subset = create_detector("adascale_a", **ADASCALE, train_images=50).fit(images(120, seed=1)[0], model)
    assert len(subset.reference_) == 50 and len(detector.reference_) == 120


def test_adascale_checks_its_options(tiny) -> None:
    with pytest.raises(ConfigError, match="adascale_l: p_min and p_max"):
        create_detector("adascale_l", p_min=90.0, p_max=80.0)
    with pytest.raises(ConfigError, match="adascale_a: perturb_fraction"):
        create_detector("adascale_a", perturb_fraction=0.0)
    with pytest.raises(ConfigError, match="adascale_a: shift_percent"):
        create_detector("adascale_a", shift_percent=0.0)
    model, train, x = tiny
    with pytest.raises(ConfigError, match="adascale_l fits on the training inputs"):
        create_detector("adascale_l").fit(train, model)
    detector = create_detector("adascale_l").fit(x, model)
    with pytest.raises(ConfigError, match="score\\(model, x\\)"):
        detector.score_outputs(train)
