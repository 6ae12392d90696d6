"""Build a guard for a benchmark: load the classifier, fit (or choose) the detector on training images, calibrate
on ID images neither learned from, and report the false-alarm rate and flagged shares it will give.

Which images calibrate (``calibration_plan``):

1. ``calibration=`` (``--calibration DATA``) or the benchmark's ``calibration:`` key: that dataset.
2. A model oodforge trained, whose checkpoint records the ID validation images held out of its training
   (``held_out``), with a named detector: those images (detectors fit on the rest of the training split).
3. Otherwise (any other model, or ``detector="auto"``, whose choice is made on the held-out images): a seeded random
   ``CALIBRATION_SHARE`` of the ID test split, at most ``CALIBRATION_IMAGES`` images; the reported false-alarm
   rate then comes from the remaining test images only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from oodforge.data.benchmark import Benchmark, Images
from oodforge.data.overlap import shared_count
from oodforge.deploy.conformal import check_alpha
from oodforge.deploy.guard import GUARD_PRECISIONS, Guard
from oodforge.deploy.inputs import Preprocessing
from oodforge.detectors import Detector
from oodforge.evaluation.cache import OutputCache
from oodforge.evaluation.specs import build_detector, parse_detector_spec
from oodforge.evaluation.tuning import tune
from oodforge.models.loading import held_out_record, load_model
from oodforge.util.errors import ConfigError
from oodforge.util.precision import check_precision

CALIBRATION_IMAGES = 1000  # the default calibration set of other models: this many ID test images ...
CALIBRATION_SHARE = 0.2  # ... but at most this share of the ID test split
AUTO_CANDIDATES = ("msp", "maxlogit", "energy", "gen", "mahalanobis", "rmds", "knn", "vim", "react", "ash", "scale",
                   "nci", "fdbd")  # detector="auto" chooses among these: every one exports to ONNX


@dataclass
class CalibrationPlan:
    """Which images calibrate, which the detector fits on, and which test images stay for reporting."""

    calibration: Images
    fit: Images
    report_id: Images
    rule: str
    details: dict = field(default_factory=dict)


def calibration_plan(benchmark: Benchmark, checkpoint: str | None, auto: bool, spec: str | None = None,
                     root: str | Path | None = None, seed: int = 0, size: int | None = None) -> CalibrationPlan:
    """Choose the calibration images by the rules in this module's docstring; refuse a calibration set that shares
    images with the images the detector fits on."""
    fit, held = benchmark.split_train(root)
    test = benchmark.id_set("test", root)
    named = spec or benchmark.calibration
    if named is not None:
        images = benchmark.calibration_set(named, root)
        shared = shared_count(images, fit)
        if shared:
            flag = "--calibration" if spec else f"benchmark {benchmark.name!r} calibration:"
            raise ConfigError(f"{flag} {named} shares {shared} of its {len(images)} images with the ID training images "
                              "the detector fits on; calibrate on images neither the classifier nor the detector saw")
        return CalibrationPlan(images, fit, test, "given", {"spec": named})
    record = held_out_record(checkpoint)
    if record is not None and not auto and _holds_out(benchmark, record, root):
        return CalibrationPlan(held, fit, test, "held_out", {"held_out": record})
    count = min(size or CALIBRATION_IMAGES, int(len(test) * CALIBRATION_SHARE))
    if count < 1:
        raise ConfigError(f"benchmark {benchmark.name!r}: its ID test split has {len(test)} images, too few to "
                          "calibrate on a share of it; give --calibration")
    order = np.random.default_rng(seed).permutation(len(test))
    chosen, rest = np.sort(order[:count]), np.sort(order[count:])
    return CalibrationPlan(test.subset(chosen, f"{test.name}-calibration"), fit, test.subset(rest, test.name),
                           "test_share", {"images": count, "of_test": len(test), "seed": seed,
                                          "rule": f"min({CALIBRATION_IMAGES}, {CALIBRATION_SHARE:.0%} of the ID test "
                                                  "split), drawn at random"})


def _holds_out(benchmark: Benchmark, record: dict, root: str | Path | None) -> bool:
    """Whether the checkpoint's held-out record names the images this benchmark holds out now."""
    from oodforge.data.benchmark import holdout_record

    return record == holdout_record(benchmark, root)


@dataclass
class GuardBuild:
    """A built guard and what building it measured."""

    guard: Guard
    report: dict


def build_guard(benchmark: Benchmark, model: str, weights: str | Path | None = None, *, detector: str = "auto",
                alpha: float = 0.05, calibration: str | None = None, class_conditional: bool = False,
                head: str | None = None, precision: str = "32-true", device: str = "cpu", batch_size: int = 500,
                cache: OutputCache | None = None, root: str | Path | None = None, seed: int = 0,
                calibration_size: int | None = None, quiet: bool = True) -> GuardBuild:
    """Build a guard for ``--model`` on ``benchmark`` (everything is checked before any forward pass)."""
    alpha = check_alpha(alpha, "--alpha")
    precision = check_precision(precision, GUARD_PRECISIONS)
    auto = detector == "auto"
    spec = {} if auto else parse_detector_spec(detector)
    if len(spec) > 1:
        raise ConfigError(f"--detector {detector!r} names {len(spec)} detectors; a guard uses one (or auto)")
    if not auto:
        _refuse_unsavable(build_detector(*next(iter(spec.items()))))
    if auto:
        benchmark.check_validation()
        benchmark.val_ood_sets(root)  # no validation sets: one error now, not after the forward passes
    classifier, checkpoint = load_model(model, weights, benchmark, head=head)
    plan = calibration_plan(benchmark, checkpoint, auto, calibration, root, seed, calibration_size)
    cache = cache or OutputCache()
    tic = time.perf_counter()
    choice = {}
    if auto:
        spec, choice = choose_detector(classifier, benchmark, cache, device, batch_size, precision, root, quiet)
    label, options = next(iter(spec.items()))
    fitted = build_detector(label, options)
    train = cache.outputs(classifier, plan.fit, device, batch_size, quiet, precision=precision,
                          layers=fitted.layer_keys(classifier)) if fitted.needs_fit and not fitted.fits_on_inputs \
        else None
    fitted._ready(train, classifier, lambda: _loader(plan.fit, batch_size))
    guard = Guard(classifier, fitted, classes=_classes(benchmark, root), alpha=alpha,
                  class_conditional=class_conditional, device=device, precision=precision,
                  preprocessing=Preprocessing(benchmark.image_shape, benchmark.resize),
                  model_spec=_model_spec(model, classifier))
    guard.calibrate(_scores(guard, plan.calibration, cache, device, batch_size, quiet), source=plan.calibration.name)
    report = {"benchmark": benchmark.name, "detector": guard.detector_name, "params": fitted.get_params(),
              "alpha": alpha, "threshold": guard.threshold, "calibration": {"images": len(plan.calibration),
              "source": plan.calibration.name, "kind": plan.rule, **plan.details},
              "fit_images": len(plan.fit) if fitted.needs_fit else 0, **({"auto": choice} if choice else {})}
    report["id_test"] = _flagged(guard, plan.report_id, cache, device, batch_size, quiet)
    report["val_ood"] = {name: _flagged(guard, images, cache, device, batch_size, quiet)
                         for name, images in _val_sets(benchmark, root).items()}
    report["seconds"] = time.perf_counter() - tic
    guard.info = {"build": report}
    return GuardBuild(guard, report)


def choose_detector(model: torch.nn.Module, benchmark: Benchmark, cache: OutputCache, device: str, batch_size: int,
                    precision: str, root: str | Path | None, quiet: bool) -> tuple[dict, dict]:
    """({label: options} of the detector with the best mean validation AUROC, defaults or tuned, among
    ``AUTO_CANDIDATES``; the record of the choice). Only validation data are read."""
    candidates = {name: {"detector": name} for name in AUTO_CANDIDATES}
    tuning = tune(model, benchmark, candidates, cache=cache, device=device, batch_size=batch_size, quiet=quiet,
                  root=root, precision=precision)
    ranked = sorted(((r["mean"], label) for label, r in tuning.validation_auroc.items() if np.isfinite(r["mean"])),
                    reverse=True)
    if not ranked:
        raise ConfigError(f"benchmark {benchmark.name!r}: no candidate detector gave finite validation scores")
    best = ranked[0][1]
    options = tuning.tuned_spec(candidates)[best]
    return ({best.replace("[tuned]", ""): options},
            {"chosen": best, "val_auroc": ranked[0][0], "ranking": {label: auroc for auroc, label in ranked},
             "validation": tuning.validation})


def _scores(guard: Guard, images: Images, cache: OutputCache, device: str, batch_size: int, quiet: bool
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, scores) of ``images`` under the guard: cached outputs where the detector reads only outputs."""
    if guard.detector.needs_inputs:
        return guard.score_batches(_loader(images, batch_size))
    outputs = cache.outputs(guard.model, images, device, batch_size, quiet, precision=guard.precision,
                            layers=guard.detector.layer_keys(guard.model))
    with torch.inference_mode():
        return outputs.logits, guard.detector.score_outputs(outputs).float().cpu()


def _loader(images: Images, batch_size: int):
    from oodforge.evaluation.extraction import image_loader

    return image_loader(images, batch_size)


def _flagged(guard: Guard, images: Images, cache: OutputCache, device: str, batch_size: int, quiet: bool) -> dict:
    """{"images", "flagged"} of a set at the guard's level: the share of its images with p <= alpha."""
    logits, scores = _scores(guard, images, cache, device, batch_size, quiet)
    p = guard.p_values(scores, logits.argmax(1))
    return {"images": len(images), "flagged": float((p <= guard.alpha).double().mean())}


def _val_sets(benchmark: Benchmark, root: str | Path | None) -> dict[str, Images]:
    """The benchmark's validation OOD sets (none when it declares none)."""
    if not benchmark.val.get("ood"):
        return {}
    return benchmark.val_ood_sets(root)


def _classes(benchmark: Benchmark, root: str | Path | None) -> list[str]:
    return list(benchmark.classes) if benchmark.classes else list(benchmark.id_set("test", root).classes)


def _model_spec(model: str, classifier: torch.nn.Module) -> dict:
    """The architecture spec saved with the guard: the ``--model`` spec for torchvision:/timm:/module: networks."""
    from oodforge.deploy.artifact import model_spec_of

    return model_spec_of(classifier, model if model.startswith(("torchvision:", "timm:", "module:")) else None)


def _refuse_unsavable(detector: Detector) -> None:
    """Detectors whose learned state a guard artifact cannot hold are refused before any work."""
    if getattr(detector, "use_faiss", False):
        raise ConfigError(f"{detector!r}: a guard cannot store a faiss index; use use_faiss=false")


