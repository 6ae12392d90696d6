"""The detector base in scikit-learn's manner: params, repr, validation at the door, save/load, supports, variants."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

import oodforge
from oodforge.cli import app
from oodforge.detectors import DETECTORS, Detector, create_detector
from oodforge.evaluation.extraction import extract_outputs
from oodforge.evaluation.specs import parse_detector_spec


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU())
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.body(x))


@pytest.fixture(scope="module")
def fitted_setup():
    torch.manual_seed(3)
    model = oodforge.wrap_model(Net())
    train = extract_outputs(model, TensorDataset(torch.rand(120, 3, 4, 4), torch.arange(120) % 4), quiet=True)
    test = extract_outputs(model, torch.rand(30, 3, 4, 4) * 2, quiet=True)
    return model, train, test


def test_get_params_and_repr_come_from_init() -> None:
    knn = create_detector("knn", k=7)
    assert knn.get_params()["k"] == 7 and repr(knn).startswith("KNN(k=7")
    assert create_detector("msp").get_params() == {} and repr(create_detector("msp")) == "MSP()"


@pytest.mark.parametrize("spec, message", [
    ("knn:k=abc", "k must be int"), ("knn:kk=5", "no option 'kk'"), ("energy:temperature=0", "temperature"),
    ("odin:epsilon=-1", "epsilon"), ("react:percentile=150", "percentile"), ("flow:epochs=0", "epochs"),
])
def test_bad_parameters_fail_when_the_spec_is_read(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_detector_spec(spec)


def test_bad_detector_option_fails_before_training(tmp_path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--detectors", "knn:k=abc", "--out", str(out), "--quiet"])
    assert result.exit_code == 2 and "k must be int" in result.output
    assert not out.exists(), "nothing was trained or written"


def test_set_params_validates_and_unfits(fitted_setup) -> None:
    model, train, _ = fitted_setup
    knn = create_detector("knn", k=3).fit(train, model)
    assert knn.set_params(k=5).k == 5 and not knn.fitted_
    with pytest.raises(ValueError, match="no option"):
        knn.set_params(nope=1)


def test_every_detector_declares_what_it_reads_and_a_search_space_of_its_own_params() -> None:
    from oodforge.detectors.base import REQUIREMENTS

    for name in DETECTORS.names():
        cls = DETECTORS.get(name)
        assert set(cls.requires) <= set(REQUIREMENTS), name
        assert set(cls.search_space) <= set(cls.param_names()), name


def _fittable() -> list[str]:
    return [n for n in DETECTORS.names() if n != "cosine"]


@pytest.mark.parametrize("name", _fittable())
def test_state_saves_and_reloads_the_same_way(name: str, fitted_setup, tmp_path) -> None:
    model, train, test = fitted_setup
    options = {"flow": {"blocks": 2, "batch_size": 32}, "vim": {"dim": 8}}.get(name, {})
    if "layers" in DETECTORS.get(name).requires:  # the tiny net names no stages: read its body
        options = {"rankfeat": {"layer": "body"}}.get(name, {"layers": "body.0+body"})
        keys = create_detector(name, **options).layer_keys(model)
        train = train.with_layers(extract_outputs(model, TensorDataset(torch.rand(120, 3, 4, 4), torch.arange(120) % 4),
                                                  quiet=True, layers=keys).layers)
        test = test.with_layers(extract_outputs(model, torch.rand(30, 3, 4, 4) * 2, quiet=True, layers=keys).layers)
    inputs = TensorDataset(torch.rand(120, 3, 4, 4), torch.arange(120) % 4)  # for detectors that fit on inputs
    detector = create_detector(name, **options)._ready(train, model, lambda: DataLoader(inputs, batch_size=40))
    detector.fitted_ = True
    path = detector.save(tmp_path / f"{name}.pt")
    again = Detector.load(path, model=model)
    assert type(again) is type(detector) and again.get_params() == detector.get_params()
    if detector.needs_inputs:
        x = torch.rand(6, 3, 4, 4)
        torch.testing.assert_close(again.score(model, x), detector.score(model, x))
    else:
        torch.testing.assert_close(again.score_outputs(test), detector.score_outputs(test))


def test_supports_replaces_the_name_check(fitted_setup) -> None:
    model, _, _ = fitted_setup
    assert not create_detector("cosine").supports(model)
    assert create_detector("vim").supports(model) and create_detector("msp").supports(model)
    headless = nn.Sequential(nn.Flatten(), nn.Linear(48, 4), nn.Tanh())
    assert not create_detector("react").supports(headless) and not create_detector("vim").supports(headless)


def test_variants_get_distinct_rows_and_parameters_in_results(tmp_path) -> None:
    data = TensorDataset(torch.rand(80, 3, 4, 4), torch.arange(80) % 4)
    results = oodforge.evaluate_ood(Net(), data, data, {"noise": torch.rand(20, 3, 4, 4) * 3},
                                    detectors="knn:k=1,knn:k=20,msp", out=tmp_path / "run", quiet=True)
    labels = [r["detector"] for r in results.rows]
    assert labels == ["knn[k=1]", "knn[k=20]", "msp"]
    assert results.rows[0]["auroc"] != results.rows[1]["auroc"]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["detectors"]["knn[k=1]"]["params"]["k"] == 1
    assert saved["detectors"]["knn[k=20]"] == {**saved["detectors"]["knn[k=20]"], "detector": "knn"}
    assert saved["detectors"]["knn[k=20]"]["params"]["k"] == 20
    assert np.isfinite(saved["results"][0]["auroc"])


def test_recipe_adds_its_own_scores() -> None:
    from oodforge.training.config import TrainConfig, with_recipe_detectors

    assert with_recipe_detectors("msp", TrainConfig(head="arcface")) == "msp,cosine"
    assert with_recipe_detectors("msp", TrainConfig(loss="sde")) == "msp,semantic_energy,representation"
    assert with_recipe_detectors("msp,cosine:", TrainConfig(head="cosface")) == "msp,cosine:"
    assert with_recipe_detectors("msp", TrainConfig()) == "msp"
