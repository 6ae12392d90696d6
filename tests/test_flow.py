"""The normalizing-flow feature-density detector: density accuracy, persistence, edge cases."""

import warnings

import normflows as nf
import pytest
import torch
from torch.distributions import MultivariateNormal

from oodforge.detectors.base import ModelOutputs, NotFittedError, create_detector
from oodforge.detectors.flow import NONFINITE_SCORE, FlowDensity

MEAN = torch.tensor([1.0, -2.0])
COVARIANCE = torch.tensor([[2.0, 1.2], [1.2, 1.0]])


def outputs(features: torch.Tensor) -> ModelOutputs:
    return ModelOutputs(torch.zeros(len(features), 3), features)


@pytest.fixture(scope="module")
def gaussian():
    """A correlated 2-D Gaussian, held-out samples from it, and a flow fitted on 4000 samples."""
    torch.manual_seed(0)
    truth = MultivariateNormal(MEAN, COVARIANCE)
    train, held_out = truth.sample((4000,)), truth.sample((5000,))
    detector = FlowDensity(normalize=False, epochs=10, lr=1e-2, val_fraction=0.1, quiet=True)
    return truth, held_out, detector.fit(outputs(train))


@pytest.fixture(scope="module")
def sphere_fit():
    """A default-normalizing flow fitted on 8-D features clustered around one direction."""
    torch.manual_seed(1)
    features = torch.randn(1000, 8) * 0.3 + torch.tensor([4.0] + [0.0] * 7)
    return FlowDensity(epochs=2, lr=1e-3, quiet=True).fit(outputs(features)), features


def test_learns_the_true_gaussian_log_likelihood(gaussian):
    truth, held_out, detector = gaussian
    flow_ll = detector.score_outputs(outputs(held_out)).mean().item()
    true_ll = truth.log_prob(held_out).mean().item()
    assert abs(flow_ll - true_ll) < 0.1


def test_history_records_validation_log_likelihood(gaussian):
    truth, _, detector = gaussian
    history = detector.history_
    assert [record["epoch"] for record in history] == list(range(1, 11))
    assert all(set(record) == {"epoch", "train_log_likelihood", "val_log_likelihood"} for record in history)
    # 400 held-out ID samples: their mean log-likelihood is near the true entropy's negative
    true_mean_ll = -truth.entropy().item()
    assert abs(history[-1]["val_log_likelihood"] - true_mean_ll) < 0.25


def test_in_distribution_scores_above_far_points(gaussian, sphere_fit):
    _, held_out, detector = gaussian
    far = MEAN + torch.tensor([[8.0, -8.0], [-10.0, 0.0], [0.0, 12.0]])
    near_mean = detector.score_outputs(outputs(MEAN[None]))
    assert detector.score_outputs(outputs(far)).max() < near_mean
    assert detector.score_outputs(outputs(far)).max() < detector.score_outputs(outputs(held_out)).median()
    sphere_detector, features = sphere_fit
    opposite = -features[:200]  # the opposite direction on the unit sphere
    assert (
        sphere_detector.score_outputs(outputs(opposite)).max()
        < sphere_detector.score_outputs(outputs(features[:200])).min()
    )


def test_actnorm_initializes_on_the_first_batch():
    torch.manual_seed(2)
    features = torch.randn(300, 4) * torch.tensor([3.0, 0.5, 1.0, 2.0]) + 5.0
    detector = FlowDensity(blocks=1, normalize=False, lr=1e-12, batch_size=300, quiet=True)
    detector.fit(outputs(features))
    actnorms = [f for f in detector.flow_.flows if isinstance(f, nf.flows.ActNorm)]
    assert actnorms and all(float(a.data_dep_init_done) == 1.0 for a in actnorms)
    standardized, _ = detector.flow_.flows[-1].inverse(features)  # the ActNorm nearest the data
    assert torch.allclose(standardized.mean(dim=0), torch.zeros(4), atol=1e-4)
    assert torch.allclose(standardized.std(dim=0), torch.ones(4), atol=1e-4)


def test_save_load_round_trip_gives_identical_scores(sphere_fit, tmp_path):
    detector, features = sphere_fit
    path = detector.save(tmp_path / "flow.pt")
    loaded = FlowDensity.load(path)
    probe = torch.cat([features[:50], torch.randn(50, 8)])
    assert torch.equal(loaded.score_outputs(outputs(probe)), detector.score_outputs(outputs(probe)))
    assert loaded.get_config() == detector.get_config()
    assert loaded.history_ == detector.history_


def test_loading_a_corrupt_file_names_it(sphere_fit, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        FlowDensity.load(garbage)
    good = sphere_fit[0].save(tmp_path / "truncated.pt")
    good.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.pt"):
        FlowDensity.load(good)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        FlowDensity.load(tmp_path / "missing.pt")


def test_nonfinite_log_likelihoods_get_the_lowest_score_and_a_counted_warning(sphere_fit):
    detector, features = sphere_fit
    probe = features[:5].clone()
    probe[1, 3] = float("nan")
    probe[3, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="2 of 5 log-likelihoods were NaN or infinite"):
        scores = detector.score_outputs(outputs(probe))
    assert scores.shape == (5,)
    assert scores[1] == scores[3] == NONFINITE_SCORE == scores.min()
    assert torch.isfinite(scores).all() and (scores[[0, 2, 4]] > NONFINITE_SCORE).all()


def test_nonfinite_training_rows_are_dropped_with_a_warning():
    features = torch.randn(200, 4)
    features[7] = float("nan")
    with pytest.warns(RuntimeWarning, match="dropped 1 of 200"):
        detector = FlowDensity(quiet=True).fit(outputs(features))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.isfinite(detector.score_outputs(outputs(features[:5]))).all()


def test_scoring_or_saving_before_fit_raises(tmp_path):
    detector = create_detector("flow", quiet=True)
    assert isinstance(detector, FlowDensity)
    with pytest.raises(NotFittedError):
        detector.score_outputs(outputs(torch.randn(4, 8)))
    with pytest.raises(NotFittedError):
        detector.save(tmp_path / "unfitted.pt")


def test_fit_leaves_global_rng_and_thread_count_alone_and_checks_shapes(sphere_fit):
    features = torch.randn(100, 6)
    rng_state, threads = torch.random.get_rng_state(), torch.get_num_threads()
    FlowDensity(blocks=2, quiet=True, seed=5).fit(outputs(features))
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert torch.get_num_threads() == threads
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        sphere_fit[0].score_outputs(outputs(torch.randn(3, 5)))
    with pytest.raises(ValueError, match="val_fraction"):
        FlowDensity(val_fraction=1.0).fit(outputs(torch.randn(10, 4)))
