"""A bench run x seed's evaluation is stored beside its model and reused only while nothing it depends on
changed; a damaged or foreign store is scored again."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import needs_mnist_family
from oodforge.bench import jobs as bench_module
from oodforge.cli import app
from oodforge.evaluation.result import Evaluation
from oodforge.runs.store import EVALUATION_JSON, EVALUATION_SCORES, load_evaluation, save_evaluation

runner = CliRunner()


def _evaluation() -> Evaluation:
    scores = {"m/msp/id": np.array([0.9, 0.8], dtype=np.float32), "m/msp/ood": np.array([0.1, 0.7])}
    return Evaluation(0.75, [{"method": "m", "detector": "msp", "auroc": 1.0}], scores, {"rank": 3.0},
                      {"outputs_s": 1.5}, tuning={"validation": {"ood": ["v"]}}, failed={"x": {"why": "nan"}},
                      precision="bf16-mixed", records={"msp": {"name": "msp", "params": {}}})


def test_store_round_trip_and_refusals(tmp_path) -> None:
    save_evaluation(tmp_path, "key1", _evaluation())
    back = load_evaluation(tmp_path, "key1")
    assert back is not None and back.id_accuracy == 0.75 and back.precision == "bf16-mixed"
    assert back.results == _evaluation().results and back.tuning == {"validation": {"ood": ["v"]}}
    assert back.detector_records() == {"msp": {"name": "msp", "params": {}}}
    assert set(back.scores) == {"m/msp/id", "m/msp/ood"}
    np.testing.assert_array_equal(back.scores["m/msp/ood"], [0.1, 0.7])
    assert load_evaluation(tmp_path, "another key") is None  # made another way: score again
    np.savez(tmp_path / EVALUATION_SCORES, **{"m/msp/id": np.zeros(2)})  # scores not the ones recorded
    assert load_evaluation(tmp_path, "key1") is None
    (tmp_path / EVALUATION_JSON).write_text("{truncated")
    assert load_evaluation(tmp_path, "key1") is None
    assert load_evaluation(tmp_path / "none", "key1") is None


@needs_mnist_family
def test_bench_reuses_stored_evaluations_until_the_scoring_changes(tmp_path, monkeypatch) -> None:
    config = tmp_path / "bench.yaml"
    text = ("benchmark: fashion_mnist\ndetectors: {detectors}\nseeds: [0]\n"
            "defaults: {{epochs: 1, train_subset: 512, lr: 0.05}}\nruns:\n  - {{name: ce, loss: ce}}\n")
    config.write_text(text.format(detectors="msp,energy"))
    out = tmp_path / "bench"
    result = runner.invoke(app, ["bench", str(config), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    first = json.loads((out / "results.json").read_text())
    assert (out / "ce" / "seed0" / EVALUATION_JSON).is_file()

    calls = []
    real_evaluate = bench_module.evaluate
    monkeypatch.setattr(bench_module, "evaluate", lambda *a, **k: calls.append(k) or real_evaluate(*a, **k))
    result = runner.invoke(app, ["bench", str(config), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    again = json.loads((out / "results.json").read_text())
    assert calls == []  # nothing scored again
    assert again["results"] == first["results"] and again["detectors"] == first["detectors"]
    assert again["scores_sha256"] == first["scores_sha256"]

    result = runner.invoke(app, ["bench", str(config), "--out", str(out), "--quiet", "--rescore"])
    assert result.exit_code == 0, result.output
    assert len(calls) == 1
    rescored = json.loads((out / "results.json").read_text())
    auroc = lambda r: [row["auroc"] for row in r["results"]]  # noqa: E731
    assert auroc(rescored) == pytest.approx(auroc(first), abs=1e-6)

    config.write_text(text.format(detectors="msp,energy,maxlogit"))  # another scoring: scored again
    result = runner.invoke(app, ["bench", str(config), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert len(calls) == 2
    assert {r["detector"] for r in json.loads((out / "results.json").read_text())["results"]} == {
        "msp", "energy", "maxlogit"}
