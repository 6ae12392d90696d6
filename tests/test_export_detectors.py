"""Every tensor-algebra detector exports to ONNX and TorchScript with a dynamic batch size: the exported file
reproduces the Python guard's logits, scores, p-values and decisions on batches it was not traced with."""

from __future__ import annotations

import warnings

import pytest
import torch

from oodforge.deploy.export import ExportError, export_guard, run_export
from oodforge.deploy.guard import Guard
from oodforge.deploy.inputs import Preprocessing
from oodforge.detectors import create_detector
from oodforge.detectors.base import outputs_of
from oodforge.models.classifier import ModelConfig, build_classifier

pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

EXPORTED = ["msp", "maxlogit", "energy", "entropy", "gen", "temperature", "klm", "mahalanobis", "rmds", "knn", "vim",
            "react", "ash", "scale", "dice", "fdbd", "nci", "residual", "she", "nnguide", "relation",
            "semantic_energy", "representation", "flow"]
OPTIONS = {"flow": {"blocks": 2, "quiet": True, "device": "cpu"}}  # a small flow: its fit dominates otherwise
SIZE, CLASSES, TOLERANCE = 28, 10, 1e-4


def images(count: int, seed: int) -> torch.Tensor:
    """``count`` random RGB images in [0, 1], seeded."""
    return torch.rand(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def classifier(head: str):
    """A small CNN with random weights (seeded) and its outputs on 400 labelled random training images."""
    torch.manual_seed(0)
    model = build_classifier(ModelConfig(backbone="small_cnn", num_classes=CLASSES, in_channels=3, mean=(0.5,) * 3,
                                         std=(0.5,) * 3, head=head)).eval()
    x, y = images(400, 1), torch.arange(400) % CLASSES
    return model, outputs_of(model, [(x[i:i + 100], y[i:i + 100]) for i in range(0, 400, 100)])


@pytest.fixture(scope="module")
def linear():
    return classifier("linear")


@pytest.fixture(scope="module")
def cosine():
    return classifier("cosface")


def guard_of(name: str, model, train, class_conditional: bool = False) -> Guard:
    """A guard with detector ``name`` fitted on ``train``, calibrated on 200 random images, alpha 0.3 (so that
    random inputs get both decisions)."""
    with warnings.catch_warnings():  # clamped defaults (knn's k), classes with few calibration images
        warnings.simplefilter("ignore")
        detector = create_detector(name, **OPTIONS.get(name, {})).fit(train, model)
        guard = Guard(model, detector, classes=[str(c) for c in range(CLASSES)], alpha=0.3,
                      preprocessing=Preprocessing((SIZE, SIZE, 3)), class_conditional=class_conditional)
        return guard.calibrate(images(200, 2))


def gap(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference relative to max(1, |want|)."""
    got, want = got.double().reshape(-1), want.double().reshape(-1)
    assert got.shape == want.shape
    return float(((got - want).abs() / want.abs().clamp(min=1.0)).max())


def check_both_formats(guard: Guard, folder) -> None:
    """Export to ONNX and TorchScript, then run both files on batches of 1 and 7 against the guard."""
    files = [export_guard(guard, folder / fmt, fmt) for fmt in ("onnx", "torchscript")]
    for batch, seed in ((1, 3), (7, 4)):
        x = images(batch, seed)
        logits, scores = guard.outputs(x)
        p = guard.p_values(scores, logits.argmax(1))
        decisions = guard.decide(p)
        for path in files:
            got = run_export(path, x)
            for key, want in (("logits", logits), ("score", scores), ("p_value", p)):
                assert gap(got[key], want) <= TOLERANCE, (path.name, batch, key)
            assert got["out"].tolist() == decisions.long().tolist(), (path.name, batch)


@pytest.mark.parametrize("name", EXPORTED)
def test_exports_match_guard(linear, name, tmp_path):
    check_both_formats(guard_of(name, *linear), tmp_path)


def test_cosine_head_exports(cosine, tmp_path):
    check_both_formats(guard_of("cosine", *cosine), tmp_path)


def test_class_conditional_exports(linear, tmp_path):
    guard = guard_of("energy", *linear, class_conditional=True)
    check_both_formats(guard, tmp_path)


def test_decisions_are_mixed(linear):
    """The comparison above means something: on random inputs the guard flags some and passes others."""
    guard = guard_of("energy", *linear)
    logits, scores = guard.outputs(images(50, 5))
    flagged = guard.decide(guard.p_values(scores, logits.argmax(1)))
    assert 0 < int(flagged.sum()) < 50


@pytest.mark.parametrize("name", ["odin", "gradnorm"])
def test_input_gradient_detectors_refused(linear, name, tmp_path):
    guard = guard_of(name, *linear)
    for fmt in ("onnx", "torchscript"):
        with pytest.raises(ExportError, match="input gradients"):
            export_guard(guard, tmp_path, fmt)
    assert not list(tmp_path.iterdir())
