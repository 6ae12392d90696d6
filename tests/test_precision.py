"""Issue 14, item 1: --precision auto picks bf16 autocast where the hardware runs it natively; outputs,
detectors and metrics stay float32; the precision is recorded."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import oodforge.util.precision as precision_module
from oodforge.cli import app
from oodforge.data.imageset import ImageSet
from oodforge.detectors import create_detector
from oodforge.evaluation.cache import OutputCache
from oodforge.evaluation.extraction import extract_outputs, image_loader
from oodforge.evaluation.scoring import input_scores
from oodforge.models.adapters import wrap_model
from oodforge.runs.pipeline import evaluate_ood
from oodforge.training.config import TrainConfig
from oodforge.util.precision import autocast, resolve_precision


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def tiny_images(seed: int = 0, n: int = 40) -> ImageSet:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 8, 8, 1), generator=generator, dtype=torch.uint8).numpy()
    return ImageSet(f"tiny{seed}", pixels, (torch.arange(n) % 3).numpy(), ["a", "b", "c"])


@pytest.mark.parametrize("native, expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_auto_follows_the_hardware(monkeypatch, native, expected):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("32-true", "cpu") == "32-true" and resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"


def test_autocast_runs_matmuls_in_bf16_only_when_asked():
    a = torch.randn(4, 4)
    with autocast("bf16-mixed", "cpu"):
        assert (a @ a).dtype == torch.bfloat16
    with autocast("32-true", "cpu"):
        assert (a @ a).dtype == torch.float32


def test_bf16_extraction_gives_float32_outputs_close_to_float32():
    model = wrap_model(tiny_net(), head="6")
    x = torch.randn(64, 1, 8, 8)
    full = extract_outputs(model, x, quiet=True, precision="32-true")
    half = extract_outputs(model, x, quiet=True, precision="bf16-mixed")
    assert half.logits.dtype == torch.float32 and half.features.dtype == torch.float32
    assert not torch.equal(full.logits, half.logits)  # really ran in bf16
    torch.testing.assert_close(half.logits, full.logits, rtol=0.05, atol=0.05)


def test_cache_keeps_float32_and_bf16_outputs_apart(tmp_path):
    model = wrap_model(tiny_net(), head="6")
    cache = OutputCache(tmp_path)
    images = tiny_images()
    full = cache.outputs(model, images, precision="32-true")
    half = cache.outputs(model, images, precision="bf16-mixed")
    entries = sorted(p.name for p in next(tmp_path.iterdir()).iterdir())
    assert len(entries) == 2 and entries[1] == entries[0] + "@bf16-mixed.head32"
    assert not torch.equal(full.logits, half.logits)
    assert torch.equal(cache.outputs(model, images, precision="bf16-mixed").logits, half.logits)


def test_odin_gradients_under_bf16_give_float32_scores():
    model = wrap_model(tiny_net(), head="6")
    odin = create_detector("odin")
    loader = image_loader(tiny_images(), 16)
    full = input_scores(odin, model, loader, "cpu", "32-true")
    half = input_scores(odin, model, loader, "cpu", "bf16-mixed")
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    torch.testing.assert_close(half, full, rtol=0.02, atol=0.02)


def test_results_record_the_precision(tmp_path):
    model = tiny_net()
    data = torch.randn(30, 1, 8, 8)
    for precision in ("32-true", "bf16-mixed"):
        results = evaluate_ood(wrap_model(model, head="6"), data, data[:20], {"noise": torch.rand(20, 1, 8, 8)},
                               "msp,knn", out=tmp_path / precision, quiet=True, precision=precision)
        assert json.loads((tmp_path / precision / "results.json").read_text())["precision"] == precision
        assert all(isinstance(r["auroc"], float) for r in results.rows)


def test_bad_precision_is_refused_at_the_door(tmp_path):
    result = CliRunner().invoke(app, ["score", "--benchmark", "fashion_mnist", "--model", "small_cnn",
                                      "--precision", "fp8", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.output.startswith("error:") and "--precision" in result.output
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="half").validate()
    assert TrainConfig().precision == "auto"


def test_cosine_head_logits_stay_float32_and_distinct_under_bf16():
    from oodforge.models.classifier import ModelConfig, build_classifier

    torch.manual_seed(0)
    model = build_classifier(ModelConfig(backbone="small_cnn", head="cosface", num_classes=10, in_channels=1,
                                         mean=(0.5,), std=(0.25,))).eval()
    x = torch.rand(64, 1, 28, 28)
    with torch.no_grad(), autocast("bf16-mixed", "cpu"):
        features, logits = model.features_and_logits(x)
        plain = model.logits(x)
    assert features.dtype == torch.bfloat16 and logits.dtype == torch.float32 and plain.dtype == torch.float32
    expected = model.head(features.float())  # the head's own float32 maths on the bf16 features
    torch.testing.assert_close(logits, expected)
    top = logits.max(dim=1).values
    assert len(torch.unique(top)) == len(top)  # a bf16 matmul gives s*cos (|s| = 30) in steps of 0.125: ties
    with torch.no_grad(), autocast("bf16-mixed", "cpu"):
        bf16_top = model.head.scale * torch.nn.functional.linear(
            torch.nn.functional.normalize(features, dim=1),
            torch.nn.functional.normalize(model.head.weight, dim=1).to(torch.bfloat16)).max(dim=1).values
    assert len(torch.unique(bf16_top)) < len(top)  # what the float32 head avoids
