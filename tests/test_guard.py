"""The guard: conformal p-values and decisions, inputs, the artifact (round trip, tampering), the CLI's refusals,
and an end-to-end build on a model oodforge trained (calibrated on the images its training held out)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from oodforge.cli import app
from oodforge.deploy.artifact import ArtifactError
from oodforge.deploy.conformal import benjamini_hochberg, check_alpha, clopper_pearson, p_values, threshold
from oodforge.deploy.guard import Guard, load_guard
from oodforge.deploy.inputs import Preprocessing
from oodforge.detectors import create_detector
from oodforge.detectors.base import outputs_of
from oodforge.models.classifier import ModelConfig, build_classifier
from oodforge.util.errors import ConfigError
from test_train_holdout import tiny_benchmark

runner = CliRunner()


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OODFORGE_CACHE", str(tmp_path / "cache"))


# ---------------------------------------------------------------- conformal math
def test_p_values_match_the_definition_with_ties():
    calibration = torch.tensor([1.0, 2.0, 2.0, 3.0, 5.0])
    scores = torch.tensor([0.5, 1.0, 2.0, 2.5, 5.0, 9.0])
    # p = (1 + #{cal <= s}) / (n + 1), by hand
    expected = [1 / 6, 2 / 6, 4 / 6, 4 / 6, 6 / 6, 6 / 6]
    assert p_values(calibration, scores).tolist() == pytest.approx(expected)


def test_threshold_flags_exactly_the_inputs_with_p_at_most_alpha():
    rng = np.random.default_rng(0)
    for n, alpha in [(999, 0.05), (1000, 0.05), (100, 0.1), (57, 0.01), (200, 0.3)]:
        calibration = torch.sort(torch.from_numpy(rng.integers(0, 40, n).astype(np.float64))).values  # many ties
        scores = torch.from_numpy(rng.integers(-5, 45, 3000).astype(np.float64))
        flagged = p_values(calibration, scores) <= alpha
        assert torch.equal(flagged, scores < threshold(calibration, alpha)), (n, alpha)


def test_benjamini_hochberg_by_hand():
    p = torch.tensor([0.01, 0.04, 0.03, 0.20, 0.005], dtype=torch.float64)
    # sorted: 0.005, 0.01, 0.03, 0.04, 0.20 against 0.05 * k / 5 = 0.01, 0.02, 0.03, 0.04, 0.05: the first 4 pass
    assert benjamini_hochberg(p, 0.05).tolist() == [True, True, True, False, True]
    assert benjamini_hochberg(torch.tensor([0.5, 0.9], dtype=torch.float64), 0.05).tolist() == [False, False]


def test_clopper_pearson_matches_scipy():
    from scipy.stats import binomtest

    for k, n in [(0, 50), (7, 100), (450, 9000), (50, 50)]:
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert clopper_pearson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


@pytest.mark.parametrize("alpha", [0, 1, -0.1, 1.5, float("nan"), "0.1", True])
def test_alpha_outside_the_open_unit_interval_is_refused(alpha):
    with pytest.raises(ConfigError, match="alpha must lie in"):
        check_alpha(alpha)


# ---------------------------------------------------------------- a small guard
@pytest.fixture(scope="module")
def small_guard() -> Guard:
    torch.manual_seed(0)
    model = build_classifier(ModelConfig(backbone="small_cnn", num_classes=3, in_channels=3, mean=(0.5,) * 3,
                                         std=(0.25,) * 3)).eval()
    x = torch.rand(120, 3, 16, 16)
    train = outputs_of(model, [(x, torch.arange(120) % 3)])
    detector = create_detector("knn", k=5)._ready(train, model)
    guard = Guard(model, detector, classes=["ash", "elm", "oak"], preprocessing=Preprocessing((16, 16, 3)),
                  alpha=0.1)
    return guard.calibrate(torch.rand(99, 3, 16, 16))


def test_decisions_follow_the_threshold(small_guard):
    x = torch.rand(64, 3, 16, 16)
    logits, scores = small_guard.outputs(x)
    predictions = small_guard.predict(x)
    assert [p.decision for p in predictions] == ["out" if s < small_guard.threshold else "in" for s in scores]
    assert [p.label for p in predictions] == [small_guard.classes[i] for i in logits.argmax(1)]
    assert predictions.flagged == sum(s < small_guard.threshold for s in scores.tolist())
    frame = predictions.to_frame()
    assert list(frame.columns) == ["name", "label", "probability", "score", "p_value", "decision", "error"]


def test_inputs_of_every_kind_give_the_same_answer(small_guard, tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    expected = small_guard.predict(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    for value in [str(tmp_path / "a.png"), tmp_path / "a.png", Image.fromarray(pixels), pixels,
                  torch.from_numpy(pixels).permute(2, 0, 1)]:
        got = small_guard.predict(value)
        assert got.score == pytest.approx(expected.score, abs=1e-6) and got.decision == expected.decision
    batch = small_guard.predict(np.stack([pixels, pixels]))
    assert len(batch) == 2 and batch[0].score == pytest.approx(expected.score, abs=1e-6)


def test_gray_and_larger_images_are_converted_as_the_benchmark_does(small_guard):
    gray = Image.fromarray(np.full((40, 30), 128, np.uint8), "L")
    prediction = small_guard.predict(gray)
    same = small_guard.predict(torch.full((3, 16, 16), 128 / 255))
    assert prediction.score == pytest.approx(same.score, abs=1e-5)


def test_a_preprocessed_tensor_of_the_wrong_shape_is_refused(small_guard):
    with pytest.raises(ConfigError, match=r"must have shape \(N, 3, 16, 16\)"):
        small_guard.predict(torch.rand(2, 3, 32, 32))


def test_class_conditional_p_values_use_the_predicted_class():
    calibration_scores = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    predicted = torch.tensor([0, 0, 0, 1, 1, 1])
    from oodforge.deploy.guard import calibration_of

    calibration = calibration_of(calibration_scores, predicted)
    assert calibration.by_class[0].tolist() == [1, 2, 3] and calibration.by_class[1].tolist() == [10, 20, 30]
    guard = object.__new__(Guard)
    guard.calibration, guard.class_conditional = calibration, True
    p = Guard.p_values(guard, torch.tensor([2.5, 2.5]), torch.tensor([0, 1]))
    assert p.tolist() == pytest.approx([3 / 4, 1 / 4])  # the same score is typical of class 0, unusual for 1


def test_batch_fdr_decision(small_guard):
    x = torch.rand(50, 3, 16, 16)
    plain = small_guard.predict(x)
    fdr = small_guard.predict(x, fdr=True)
    expected = benjamini_hochberg(torch.tensor([p.p_value for p in plain], dtype=torch.float64), small_guard.alpha)
    assert [p.decision == "out" for p in fdr] == expected.tolist()


# ---------------------------------------------------------------- the artifact
def test_save_load_in_a_fresh_process_gives_the_same_scores(small_guard, tmp_path):
    small_guard.save(tmp_path / "g")
    x = torch.rand(20, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    torch.save(x, tmp_path / "x.pt")
    code = ("import json, sys, torch; from oodforge.deploy.guard import load_guard; "
            f"g = load_guard({str(tmp_path / 'g')!r}); p = g.predict(torch.load({str(tmp_path / 'x.pt')!r})); "
            "print(json.dumps([[r.score, r.p_value, r.decision, r.label] for r in p]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    fresh = json.loads(out.strip().splitlines()[-1])
    here = small_guard.predict(x)
    assert [r[2] for r in fresh] == [p.decision for p in here]
    assert [r[3] for r in fresh] == [p.label for p in here]
    assert np.allclose([r[0] for r in fresh], [p.score for p in here], atol=1e-6, rtol=0)
    assert [r[1] for r in fresh] == [p.p_value for p in here]


def test_artifact_holds_no_pickle(small_guard, tmp_path):
    path = small_guard.save(tmp_path / "g")
    data = path.read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    guard = json.loads(header["__metadata__"]["oodforge_guard"])
    assert guard["detector"]["name"] == "knn" and guard["alpha"] == 0.1 and len(guard["sha256"]) == 64
    assert guard["model"]["kind"] == "oodforge" and guard["classes"] == ["ash", "elm", "oak"]
    assert b"\x80\x04" not in data[:16]  # not a pickle stream


def test_tampered_truncated_and_future_artifacts_are_one_error(small_guard, tmp_path, monkeypatch):
    path = small_guard.save(tmp_path / "g")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a bit of the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="content hash"):
        load_guard(tmp_path / "g")
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ArtifactError, match="truncated|damaged"):
        load_guard(tmp_path / "g")
    import oodforge.deploy.artifact as artifact

    monkeypatch.setattr(artifact, "FORMAT_VERSION", 99)
    small_guard.save(tmp_path / "future")
    monkeypatch.setattr(artifact, "FORMAT_VERSION", 1)
    with pytest.raises(ArtifactError, match="format version 99"):
        load_guard(tmp_path / "future")
    result = runner.invoke(app, ["guard", "info", str(tmp_path / "g")])
    assert result.exit_code == 2 and result.output.count("error:") == 1, result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["predict", str(tmp_path / "empty"), str(tmp_path)])
    assert result.exit_code == 2 and "is not a guard folder" in result.output


def test_a_detector_that_needs_input_gradients_cannot_export(small_guard, tmp_path):
    odin = create_detector("odin")
    guard = Guard(small_guard.model, odin, classes=small_guard.classes, preprocessing=small_guard.preprocessing)
    guard.calibrate(torch.rand(30, 3, 16, 16)).save(tmp_path / "odin")
    result = runner.invoke(app, ["guard", "export", str(tmp_path / "odin"), "--format", "onnx"])
    assert result.exit_code == 2 and "input gradients" in result.output and result.output.count("\n") <= 3


# ---------------------------------------------------------------- the command line, end to end
def test_cli_refuses_bad_alpha_before_any_work(tmp_path):
    result = runner.invoke(app, ["guard", "build", "--benchmark", "cifar10", "--model", "resnet20", "--alpha", "1.5",
                                 "--out", str(tmp_path / "g")])
    assert result.exit_code == 2 and "--alpha must lie in (0, 1)" in result.output
    assert not (tmp_path / "g").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny YAML benchmark and a small CNN trained on it for one epoch with `oodforge train`."""
    root = tmp_path_factory.mktemp("tiny")
    bench = tiny_benchmark(root)
    result = runner.invoke(app, ["train", "--benchmark", str(bench), "--epochs", "1", "--batch-size", "8",
                                 "--out", str(root / "run"), "--detectors", "energy", "--quiet",
                                 "--precision", "32-true"])
    assert result.exit_code == 0, result.output
    return bench, root / "run" / "model.ckpt"


def test_build_on_a_trained_model_calibrates_on_its_held_out_images(trained, tmp_path):
    bench, checkpoint = trained
    result = runner.invoke(app, ["guard", "build", "--benchmark", str(bench), "--model", str(checkpoint),
                                 "--detector", "knn:k=3", "--alpha", "0.2", "--out", str(tmp_path / "g"), "--quiet"])
    assert result.exit_code == 0, result.output
    report = load_guard(tmp_path / "g").info["build"]
    assert report["calibration"]["kind"] == "held_out" and report["calibration"]["images"] == 6
    assert report["fit_images"] == 24  # the 30 training images less the 6 held out
    assert report["id_test"]["images"] == 9  # the whole ID test split is left for reporting


def test_calibration_that_overlaps_the_fitting_images_is_refused(trained, tmp_path):
    bench, checkpoint = trained
    result = runner.invoke(app, ["guard", "build", "--benchmark", str(bench), "--model", str(checkpoint),
                                 "--detector", "knn:k=3", "--calibration", f"folder:{bench.parent / 'id' / 'train'}",
                                 "--out", str(tmp_path / "g"), "--quiet"])
    assert result.exit_code == 2 and "shares 24 of its 30 images" in result.output, result.output


def test_predict_streams_rows_counts_unreadable_images_and_sets_the_exit_code(trained, tmp_path):
    bench, checkpoint = trained
    assert runner.invoke(app, ["guard", "build", "--benchmark", str(bench), "--model", str(checkpoint),
                               "--detector", "energy", "--alpha", "0.2", "--out", str(tmp_path / "g"),
                               "--quiet"]).exit_code == 0
    images = bench.parent / "ood"
    (tmp_path / "in").mkdir()
    for i, file in enumerate(sorted(images.rglob("*.png"))[:3]):
        (tmp_path / "in" / f"{i}.png").write_bytes(file.read_bytes())
    (tmp_path / "in" / "broken.png").write_bytes(b"not an image")
    for fmt in ("csv", "jsonl"):
        out = tmp_path / f"rows.{fmt}"
        result = runner.invoke(app, ["predict", str(tmp_path / "g"), str(tmp_path / "in"), "--format", fmt,
                                     "--output", str(out), "--quiet"])
        assert result.exit_code == 1, result.output
        assert "4 images" in result.output and "1 unreadable" in result.output
        text = out.read_text()
        rows = ([json.loads(line) for line in text.splitlines()] if fmt == "jsonl"
                else [dict(zip(text.splitlines()[0].split(","), line.split(","), strict=False))
                      for line in text.splitlines()[1:]])
        assert len(rows) == 4 and {r["decision"] for r in rows[:3]} <= {"in", "out"}
        broken = [r for r in rows if r["name"].endswith("broken.png")][0]
        assert broken["error"] and not broken["decision"]
    guard = load_guard(tmp_path / "g")
    direct = guard.predict(tmp_path / "in")
    assert [p.decision for p in direct] == [r["decision"] or None for r in rows]
    (tmp_path / "in" / "broken.png").unlink()
    result = runner.invoke(app, ["predict", str(tmp_path / "g"), str(tmp_path / "in"), "--quiet"])
    assert result.exit_code == 0 and "0 unreadable" in result.output


def test_yaml_calibration_key_and_auto_detector(trained, tmp_path):
    """A benchmark's calibration: key names the calibration images; --detector auto picks on validation data only."""
    import yaml

    from oodforge.data.benchmarks import get_benchmark
    from oodforge.deploy.build import AUTO_CANDIDATES, build_guard
    from test_bring_your_own import make_folder

    bench, checkpoint = trained
    root = bench.parent
    make_folder(root / "cal", {"ash": 4, "elm": 4, "oak": 4}, seed=7)
    make_folder(root / "val_ood", {"x": 8}, seed=9)
    config = yaml.safe_load(bench.read_text())
    config |= {"calibration": "folder:cal", "val": {"ood": {"v": "folder:val_ood"}}}
    path = root / "with_calibration.yaml"
    path.write_text(yaml.safe_dump(config))
    benchmark = get_benchmark(str(path))
    built = build_guard(benchmark, str(checkpoint), detector="auto", alpha=0.2)
    report = built.report
    assert report["calibration"] == {"images": 12, "source": f"folder:{root / 'cal'}", "kind": "given",
                                     "spec": f"folder:{root / 'cal'}"}
    chosen = report["auto"]["chosen"]
    assert chosen.replace("[tuned]", "") in AUTO_CANDIDATES and report["detector"] == chosen.replace("[tuned]", "")
    best = max(report["auto"]["ranking"].values())
    assert report["auto"]["val_auroc"] == best
    assert set(report["val_ood"]) == {"v"}


def test_a_wrapped_torchvision_network_round_trips(tmp_path):
    import torchvision

    import oodforge

    torch.manual_seed(0)
    net = oodforge.wrap_model(torchvision.models.resnet18(num_classes=3), mean=[0.5] * 3, std=[0.25] * 3).eval()
    guard = Guard(net, create_detector("energy"), classes=["a", "b", "c"], preprocessing=Preprocessing((32, 32, 3)),
                  model_spec=None)
    guard.calibrate(torch.rand(40, 3, 32, 32))
    with pytest.raises(ConfigError, match="needs model_spec"):
        guard.save(tmp_path / "g")
    guard.model_spec = "torchvision:resnet18"
    guard.save(tmp_path / "g")
    loaded = oodforge.load_guard(tmp_path / "g")
    x = torch.rand(5, 3, 32, 32)
    assert torch.allclose(loaded.outputs(x)[1], guard.outputs(x)[1], atol=1e-6, rtol=0)
    assert loaded.describe()["model"]["spec"] == "torchvision:resnet18"
