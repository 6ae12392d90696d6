"""The guard on real data: the public ResNet-20 on CIFAR-10. The false-alarm rate on held-out ID test images stays
within alpha over random calibration/test splits; calibrating on the classifier's own training images breaks it;
the ONNX export, run where oodforge is not imported, gives the guard's numbers on CIFAR-10 and OOD images."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import real_root
from oodforge.data.benchmarks import get_benchmark
from oodforge.deploy.export import export_guard
from oodforge.deploy.guard import Guard
from oodforge.deploy.inputs import Preprocessing
from oodforge.detectors import create_detector
from oodforge.detectors.base import outputs_of
from oodforge.evaluation.extraction import image_loader
from oodforge.models.loading import load_model

ALPHAS = (0.01, 0.05, 0.1)
SPLITS = 20
CALIBRATION = 1000
FIT_IMAGES = 5000  # the detectors' bank here; the benchmark script uses all 50,000 training images


@pytest.fixture(scope="module")
def cifar():
    root = real_root("cifar10-jpeg.tar.gz", "weights/resnet20-12fca82f.th")
    benchmark = get_benchmark("cifar10")
    model, _ = load_model("resnet20", root / "weights" / "resnet20-12fca82f.th", benchmark)
    test = benchmark.id_set("test")
    every = benchmark.id_set("train")
    drawn = np.random.default_rng(0).choice(len(every), FIT_IMAGES, replace=False)
    train = every.subset(np.sort(drawn[:FIT_IMAGES]))  # the detectors' bank: 5,000 random training images
    prep = Preprocessing(benchmark.image_shape, benchmark.resize)
    train_outputs = outputs_of(model, image_loader(train, 500))
    guards = {name: Guard(model, create_detector(name)._ready(train_outputs, model), classes=test.classes,
                          preprocessing=prep) for name in ("energy", "knn", "vim")}
    scored = {name: guard.score_batches(image_loader(test, 500)) for name, guard in guards.items()}
    return benchmark, model, test, train, guards, scored


@pytest.mark.slow
@pytest.mark.parametrize("name", ["energy", "knn", "vim"])
def test_false_alarm_rate_stays_within_alpha_over_random_splits(cifar, name):
    _, _, test, _, guards, scored = cifar
    guard, (logits, scores) = guards[name], scored[name]
    rng = np.random.default_rng(0)
    rates = {alpha: [] for alpha in ALPHAS}
    for _ in range(SPLITS):
        order = rng.permutation(len(test))
        calibration, rest = order[:CALIBRATION], order[CALIBRATION:]
        guard.calibrate((logits[calibration], scores[calibration]))
        p = guard.p_values(scores[rest])
        for alpha in ALPHAS:
            rates[alpha].append(float((p <= alpha).double().mean()))
    for alpha, values in rates.items():
        mean, spread = float(np.mean(values)), float(np.std(values, ddof=1) / np.sqrt(SPLITS))
        # the 95% interval of the mean false-alarm rate reaches down to alpha or below (it is not above alpha) ...
        assert mean - 2.09 * spread <= alpha, (name, alpha, mean, spread)
        # ... and the guard is not trivially conservative either
        assert mean >= 0.6 * alpha, (name, alpha, mean)


@pytest.mark.slow
def test_calibrating_on_training_images_breaks_the_guarantee(cifar):
    """MSP calibrated on 1,000 of the classifier's own training images flags more than alpha of the ID test images
    (the mean over 20 draws is significantly above alpha); calibrated on held-out test images it does not."""
    _, model, test, trained_on, guards, scored = cifar
    guard = Guard(model, create_detector("msp"), classes=test.classes, preprocessing=guards["energy"].preprocessing)
    train_logits, train_scores = guard.score_batches(image_loader(trained_on, 500))  # 5,000 training images
    test_logits, test_scores = guard.score_batches(image_loader(test, 500))
    rng = np.random.default_rng(0)
    for alpha in (0.05, 0.1):
        from_train, from_test = [], []
        for _ in range(SPLITS):
            guard.calibrate((train_logits, train_scores[rng.choice(len(train_scores), CALIBRATION, replace=False)]))
            from_train.append(float((guard.p_values(test_scores) <= alpha).double().mean()))
            order = rng.permutation(len(test_scores))
            guard.calibrate((test_logits, test_scores[order[:CALIBRATION]]))
            from_test.append(float((guard.p_values(test_scores[order[CALIBRATION:]]) <= alpha).double().mean()))
        low = np.mean(from_train) - 2.09 * np.std(from_train, ddof=1) / np.sqrt(SPLITS)
        assert low > alpha and np.mean(from_train) > 1.1 * alpha, (alpha, np.mean(from_train))
        assert np.mean(from_test) - 2.09 * np.std(from_test, ddof=1) / np.sqrt(SPLITS) <= alpha


@pytest.mark.slow
@pytest.mark.parametrize("name", ["energy", "knn", "vim"])
def test_onnx_export_matches_the_guard_on_real_images_without_oodforge(cifar, name, tmp_path):
    benchmark, _, test, _, guards, scored = cifar
    guard = guards[name]
    logits, scores = scored[name]
    guard.calibrate((logits[:CALIBRATION], scores[:CALIBRATION]))
    path = export_guard(guard, tmp_path, "onnx")
    textures = benchmark.ood_set("textures") if "textures" in benchmark.ood else benchmark.ood_set(
        next(iter(benchmark.ood)))
    pick = np.linspace(0, len(test) - 1, 48).round().astype(int)
    x = torch.cat([torch.from_numpy(test.images[pick]), torch.from_numpy(textures.images[:16])])
    x = x.permute(0, 3, 1, 2).float().div(255).contiguous()
    np.save(tmp_path / "x.npy", x.numpy())
    code = ("import sys, numpy as np, onnxruntime as ort\n"
            f"s = ort.InferenceSession({str(path)!r}, providers=['CPUExecutionProvider'])\n"
            f"out = s.run(None, {{s.get_inputs()[0].name: np.load({str(tmp_path / 'x.npy')!r})}})\n"
            f"np.savez({str(tmp_path / 'out.npz')!r}, *out)\n"
            "assert 'oodforge' not in sys.modules and 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    got = np.load(tmp_path / "out.npz")
    expected_logits, expected_scores = guard.outputs(x)
    p = guard.p_values(expected_scores, expected_logits.argmax(1))
    scale = np.maximum(1.0, np.abs(expected_scores.numpy()))
    assert np.max(np.abs(got["arr_1"] - expected_scores.numpy()) / scale) <= 1e-4
    assert np.max(np.abs(got["arr_0"] - expected_logits.numpy())) <= 1e-4 * max(1.0, float(expected_logits.abs().max()))
    # the file's p-values and decisions are exactly the guard's for the file's scores ...
    p_of_file = guard.p_values(torch.from_numpy(got["arr_1"]), torch.from_numpy(got["arr_0"]).argmax(1))
    assert np.allclose(got["arr_2"], p_of_file.numpy(), rtol=0, atol=1e-12)
    assert np.array_equal(got["arr_3"].astype(bool), (p_of_file <= guard.alpha).numpy())
    # ... and the guard's own decisions, except where a score lies within the tolerance of the threshold
    near = np.abs(expected_scores.numpy() - guard.threshold) <= 1e-4 * scale
    assert np.array_equal(got["arr_3"].astype(bool)[~near], (p <= guard.alpha).numpy()[~near])
    assert near.sum() <= 1
