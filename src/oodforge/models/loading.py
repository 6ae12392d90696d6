"""Turn a ``--model`` value (checkpoint, backbone + weights, torchvision:/timm:/module: spec) into a
classifier, checked against the benchmark it will be scored on before any forward pass."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from oodforge.data.benchmark import Benchmark
from oodforge.models.adapters import ModelSpecError, build_model, one_line_cause, wrap_model
from oodforge.models.backbones import BACKBONES
from oodforge.models.classifier import CheckpointError, ModelConfig, load_classifier, read_checkpoint
from oodforge.util.errors import ConfigError

SPEC_PREFIXES = ("torchvision:", "timm:", "module:")
CIFAR_RESNETS = ("resnet20", "resnet32", "resnet44", "resnet56")
PROBE_IMAGES = 2  # the zero batch every loaded model is run on once, before any data


def load_model(spec: str, weights: str | Path | None, benchmark: Benchmark, head: str | None = None
               ) -> tuple[nn.Module, str | None]:
    """(classifier, checkpoint path) for ``--model spec [--weights FILE]``, with the class count checked.

    ``spec`` is an oodforge checkpoint file, a registered backbone (needs ``weights``),
    ``torchvision:NAME`` or ``timm:NAME`` (weights optional: random init without), or
    ``module:pkg.mod:factory``. Networks from specs see inputs normalized with the benchmark's mean/std;
    ``head`` names their final linear layer when it is not found by itself.
    """
    if Path(spec).is_file():
        model, checkpoint = load_classifier(spec), spec
    elif spec.startswith(SPEC_PREFIXES):
        net = build_model(spec, weights, num_classes=benchmark.num_classes())
        model = wrap_model(net, head=head, mean=benchmark.mean, std=benchmark.std)
        checkpoint = None if weights is None else str(weights)
    elif spec in BACKBONES:
        if weights is None:
            raise ConfigError(f"--model {spec!r} is a backbone name; give its --weights too")
        config = external_config(spec, weights, benchmark)
        model, checkpoint = load_classifier(weights, config, source=f"--weights {weights}"), str(weights)
    else:
        raise ConfigError(f"--model {spec!r} is neither a checkpoint file, a backbone ({', '.join(BACKBONES.names())})"
                         f" nor a spec ({', '.join(p + '...' for p in SPEC_PREFIXES)})")
    check_model_fits(model, benchmark, what=f"--model {spec}")
    return model, checkpoint


def external_config(backbone: str, weights: str | Path, benchmark: Benchmark) -> ModelConfig:
    """The config to load external ``weights`` into ``backbone``; the public CIFAR ResNet checkpoints
    (``resnet20-*.th`` ...) use ImageNet statistics, and their file name must agree with ``backbone``."""
    name = Path(weights).name
    arch = next((a for a in CIFAR_RESNETS if name.startswith(a + "-")), None)
    if arch is not None and arch != backbone:
        raise ConfigError(f"--model {backbone} contradicts --weights {name}, a {arch} checkpoint")
    mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if arch else (benchmark.mean, benchmark.std)
    return ModelConfig(backbone=backbone, num_classes=benchmark.num_classes(), in_channels=benchmark.image_shape[2],
                       mean=mean, std=std)


def check_model_fits(model: nn.Module, benchmark: Benchmark, what: str = "the model") -> None:
    """Refuse a model whose class count, input channels or outputs on a zero batch do not fit the benchmark."""
    classes = getattr(model, "num_classes", None)
    expected = benchmark.num_classes()
    if classes is not None and classes != expected:
        raise ConfigError(f"{what} predicts {classes} classes but benchmark {benchmark.name!r} has {expected}")
    channels = getattr(getattr(model, "config", None), "in_channels", None)
    if channels is not None and channels != benchmark.image_shape[2]:
        raise ConfigError(f"{what} takes {channels}-channel images but benchmark {benchmark.name!r} has "
                         f"{benchmark.image_shape[2]}-channel images")
    check_model_runs(model, benchmark, expected, what)


def check_model_runs(model: nn.Module, benchmark: Benchmark, classes: int, what: str = "the model") -> None:
    """Run ``model`` once on 2 zero images of the benchmark's shape; refuse it when it raises or returns other than
    (N, D) features and (N, ``classes``) float logits.

    Eval mode and no gradients; the model's mode is restored. Errors are ``ModelSpecError`` naming ``what``.
    """
    height, width, channels = benchmark.image_shape
    parameter = next(model.parameters(), None)
    x = torch.zeros(PROBE_IMAGES, channels, height, width, device=None if parameter is None else parameter.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            features, logits = model.features_and_logits(x)
    except Exception as exc:  # a user's network may raise anything
        raise ModelSpecError(f"{what}: forward raised {one_line_cause(exc)}") from exc
    finally:
        model.train(was_training)
    if not isinstance(logits, Tensor):
        raise ModelSpecError(f"{what}: forward returns a {type(logits).__name__}, expected a Tensor of logits")
    if logits.dim() != 2 or logits.shape[0] != PROBE_IMAGES or not logits.is_floating_point():
        raise ModelSpecError(f"{what}: forward returns {logits.dtype} logits of shape {tuple(logits.shape)} for "
                             f"{PROBE_IMAGES} images, expected float logits of shape ({PROBE_IMAGES}, {classes})")
    if logits.shape[1] != classes:
        raise ModelSpecError(f"{what}: forward returns {logits.shape[1]} logit columns but benchmark "
                             f"{benchmark.name!r} has {classes} classes")
    if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[0] != PROBE_IMAGES:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ModelSpecError(f"{what}: its features (the final layer's input) are {shape} for {PROBE_IMAGES} "
                             f"images, expected shape ({PROBE_IMAGES}, D)")


def training_outliers(checkpoint: str | Path | None) -> str | None:
    """The training-outlier source an oodforge checkpoint records (``model.ckpt`` or ``last.ckpt``), else None."""
    recipe = _recorded(checkpoint, "train_config")
    return recipe.get("outliers") if isinstance(recipe, dict) else None


def held_out_record(checkpoint: str | Path | None) -> dict | None:
    """The ``held_out`` record of an oodforge checkpoint (``model.ckpt`` or ``last.ckpt``): which ID training images
    its training left out for validation; None for other files and for checkpoints written without one."""
    record = _recorded(checkpoint, "held_out")
    return record if isinstance(record, dict) else None


def _recorded(checkpoint: str | Path | None, key: str) -> object:
    """``key`` of an oodforge checkpoint: at its top (``last.ckpt``) or in its ``extra`` (``model.ckpt``); else None."""
    if checkpoint is None or not Path(checkpoint).is_file():
        return None
    try:
        state = read_checkpoint(checkpoint)
    except CheckpointError:  # loadable by its own library (e.g. safetensors) but no oodforge checkpoint
        return None
    extra = state.get("extra")
    value = state.get(key)
    return extra.get(key) if value is None and isinstance(extra, dict) else value
