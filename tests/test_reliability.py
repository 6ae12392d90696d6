"""Issue 13, first part: no silent wrong answer from NaN (weights, scores, accuracy)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

import oodforge
from conftest import needs_mnist_family
from oodforge.cli import app
from oodforge.detectors import DETECTORS, Detector
from oodforge.models.classifier import CheckpointError, ModelConfig, build_classifier, load_classifier, save_classifier


def test_non_finite_weights_are_never_saved_and_never_loaded(tmp_path) -> None:
    model = build_classifier(ModelConfig())
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        save_classifier(model, tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()
    state = {"format": "oodforge-classifier", "model_config": ModelConfig().__dict__, "state_dict": model.state_dict(),
             "extra": {}}
    torch.save(state, tmp_path / "nan.ckpt")
    with pytest.raises(CheckpointError, match=r"nan\.ckpt.*not finite"):
        load_classifier(tmp_path / "nan.ckpt")


class HalfNaN(Detector):
    """Test double: NaN on every other OOD score (a broken detector)."""

    def _score(self, outputs):
        scores = torch.softmax(outputs.logits, dim=1).max(dim=1).values
        if len(scores) == 15:  # the OOD set below
            scores[::2] = float("nan")
        return scores


class OneNaN(Detector):
    """Test double: a single NaN among 60 ID scores (1.7%: over the limit) or 200 (0.5%: under it)."""

    def _score(self, outputs):
        scores = outputs.logits[:, 0].clone()
        scores[0] = float("nan")
        return scores


@pytest.fixture
def registered(monkeypatch):
    for name, cls in (("half_nan", HalfNaN), ("one_nan", OneNaN)):
        monkeypatch.setitem(DETECTORS._factories, name, cls)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 3))


def test_detector_with_non_finite_scores_fails_alone_and_is_recorded(tmp_path, registered) -> None:
    data = TensorDataset(torch.rand(60, 3, 2, 2), torch.arange(60) % 3)
    results = oodforge.evaluate_ood(_net(), data, data, {"noise": torch.rand(15, 3, 2, 2)},
                                    detectors="msp,half_nan,one_nan", out=tmp_path / "run", quiet=True)
    assert {r["detector"] for r in results.rows} == {"msp"}
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["failed_detectors"]["half_nan"]["nonfinite_share"]["noise"] == pytest.approx(8 / 15)
    assert "NaN or infinite" in saved["failed_detectors"]["one_nan"]["error"]
    assert all(np.isfinite(r["auroc"]) for r in saved["results"])


def test_a_small_non_finite_share_is_kept_and_recorded(registered) -> None:
    data = TensorDataset(torch.rand(200, 3, 2, 2), torch.arange(200) % 3)
    results = oodforge.evaluate_ood(_net(), data, data, {"noise": torch.rand(200, 3, 2, 2)},
                                    detectors="one_nan", quiet=True)
    (row,) = results.rows
    assert row["nonfinite_share"] == pytest.approx(2 / 400)


def test_every_detector_non_finite_is_an_error(registered) -> None:
    data = TensorDataset(torch.rand(60, 3, 2, 2), torch.arange(60) % 3)
    with pytest.raises(FloatingPointError, match="no detector gave finite scores"):
        oodforge.evaluate_ood(_net(), data, data, {"noise": torch.rand(15, 3, 2, 2)}, detectors="half_nan",
                              quiet=True)


@needs_mnist_family
def test_diverged_training_ends_in_one_error_line_not_auroc_50(tmp_path) -> None:
    result = CliRunner().invoke(app, ["train", "--lr", "1e30", "--train-subset", "128", "--batch-size", "128",
                                      "--epochs", "1", "--detectors", "msp,energy", "--out", str(tmp_path / "run"),
                                      "--quiet"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and "NaN or inf" in lines[-1]
    assert not (tmp_path / "run" / "results.json").exists()


# ---------------------------------------------------------------- values and model/data checked at the door

runner = CliRunner()


def _one_error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["--epochs", "-1"], "epochs must be >= 1"), (["--train-subset", "-5"], "train_subset must be >= 1"),
    (["--lr", "0"], "lr must be > 0"), (["--real-ratio", "1.5"], "real_ratio"), (["--devices", "abc"], "devices"),
])
def test_bad_training_values_fail_before_anything_runs(tmp_path, args, message) -> None:
    out = tmp_path / "run"
    line = _one_error(runner.invoke(app, ["train", *args, "--out", str(out), "--quiet"]))
    assert message in line and not out.exists()


@pytest.mark.parametrize("config, message", [
    ({"runs": [{"name": "ce", "epochs": "two"}]}, "epochs must be int"),
    ({"runs": [{"name": "ce", "lr": "fast"}]}, "lr must be float"),
    ({"seeds": 0, "runs": [{"name": "ce"}]}, "seeds must be a non-empty list"),
    ({"defaults": [1, 2], "runs": [{"name": "ce"}]}, "defaults must be a dict"),
    ({"detectors": 5, "runs": [{"name": "ce"}]}, "detectors must be a str"),
    ({"runs": [{"name": 7}]}, "run name 7"),
    ({"runs": "ce"}, "'runs' must be a non-empty list"),
    ({"runs": [{"name": ".."}]}, "run name '..'"),
    ({"runs": [{"name": "ok"}, {"name": "bad", "epochs": -1}]}, "run bad (seed 0): training config: epochs"),
])
def test_bad_bench_configs_fail_before_any_training(tmp_path, config, message) -> None:
    import yaml

    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    line = _one_error(runner.invoke(app, ["bench", str(path), "--out", str(out), "--quiet"]))
    assert message in line and not out.exists()


@needs_mnist_family
def test_model_and_benchmark_are_checked_against_each_other(tmp_path) -> None:
    five = build_classifier(ModelConfig(num_classes=5))
    save_classifier(five, tmp_path / "five.ckpt")
    line = _one_error(runner.invoke(app, ["score", "--benchmark", "fashion_mnist", "--model",
                                          str(tmp_path / "five.ckpt"), "--out", str(tmp_path / "s"), "--quiet"]))
    assert "5 classes" in line and "has 10" in line
    line = _one_error(runner.invoke(app, ["train", "--init", str(tmp_path / "five.ckpt"), "--epochs", "1",
                                          "--out", str(tmp_path / "t"), "--quiet"]))
    assert "five.ckpt predicts 5 classes" in line
    rgb = build_classifier(ModelConfig(num_classes=10, in_channels=3, mean=(0.5,) * 3, std=(0.5,) * 3))
    save_classifier(rgb, tmp_path / "rgb.ckpt")
    line = _one_error(runner.invoke(app, ["score", "--benchmark", "fashion_mnist", "--model",
                                          str(tmp_path / "rgb.ckpt"), "--out", str(tmp_path / "s"), "--quiet"]))
    assert "3-channel" in line and "1-channel" in line


def test_yaml_alias_bomb_is_refused_before_anything_runs(tmp_path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]"
              for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\ndescription: *a8\nruns: [{name: ce}]\n")
    assert path.stat().st_size < 1000
    out = tmp_path / "out"
    line = _one_error(runner.invoke(app, ["bench", str(path), "--out", str(out), "--quiet"]))
    assert "alias" in line and str(path) in line and not out.exists()
    small = tmp_path / "ok.yaml"  # a few aliases, as configs use them, are fine
    small.write_text("runs: [{name: a, epochs: &e 0}, {name: b, epochs: *e}]\n")
    from oodforge.bench.jobs import load_bench_config

    assert [r["epochs"] for r in load_bench_config(small)["runs"]] == [0, 0]


def test_unknown_head_or_loss_option_is_one_line(tmp_path) -> None:
    out = tmp_path / "run"
    line = _one_error(runner.invoke(app, ["train", "--head-option", "foo=1", "--out", str(out), "--quiet"]))
    assert "head 'linear' has no option 'foo'" in line and not out.exists()
    line = _one_error(runner.invoke(app, ["train", "--loss", "ls", "--loss-option", "bogus=1", "--out", str(out),
                                          "--quiet"]))
    assert "loss 'ls' has no option 'bogus'; its options: eps" in line


def test_shipped_bench_configs_load_and_every_recipe_validates(tmp_path) -> None:
    from pathlib import Path

    from oodforge.bench.jobs import bench_recipes, benchmark_reference, load_bench_config
    from oodforge.data.benchmarks import get_benchmark
    from oodforge.evaluation.specs import parse_detector_spec

    configs = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "configs").glob("*.yaml"))
    assert len(configs) >= 10
    for path in configs:
        config = load_bench_config(path)
        reference = benchmark_reference(config.get("benchmark", "fashion_mnist"), path)
        get_benchmark(reference)
        parse_detector_spec(config.get("detectors", "msp"))
        recipes = bench_recipes(config, reference, tmp_path / path.stem)
        assert recipes, path.name
