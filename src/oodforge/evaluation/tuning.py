"""Hyperparameter tuning on validation data only: each detector's declared search space, scored by the
mean AUROC of ID validation images against the validation OOD sets. Test sets are never loaded here.

Validation OOD sets drawn from the same source as the model's training outliers are left out (a model
trained to reject those images would make any choice look good on them). Every detector's validation
AUROC with its default parameters is recorded too, per set, so that pipelines (model + detector) can be
compared on validation data alone (``validation_auroc`` in the ``tuning`` block).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from oodforge.data.benchmark import Benchmark, Images
from oodforge.data.datasets import overlaps
from oodforge.detectors import Detector, ModelOutputs
from oodforge.evaluation.cache import OutputCache
from oodforge.evaluation.extraction import image_loader
from oodforge.evaluation.metrics import ood_metrics
from oodforge.evaluation.scoring import input_scores, layer_keys_of
from oodforge.evaluation.specs import build_detector
from oodforge.util.errors import ConfigError
from oodforge.util.progress import progress_bar

MAX_TRIALS = 64  # a search space larger than this is cut to its first MAX_TRIALS combinations


@dataclass
class Tuning:
    """What tuning chose: per detector label, the space, the trials and the chosen values."""

    validation: dict  # {"id": ..., "ood": {name: description}, "excluded": {name: reason}}
    detectors: dict[str, dict] = field(default_factory=dict)
    validation_auroc: dict[str, dict] = field(default_factory=dict)  # label -> {"mean": ..., "by_set": {...}}
    seconds: float = 0.0

    def tuned_spec(self, detectors: dict[str, dict]) -> dict[str, dict]:
        """``detectors`` plus a ``<label>[tuned]`` variant with the chosen values for each tuned detector."""
        spec = dict(detectors)
        for label, record in self.detectors.items():
            options = dict(detectors[label])
            spec[f"{label}[tuned]"] = {"detector": options.pop("detector", label), **options, **record["chosen"]}
        return spec

    def record(self) -> dict:
        """The ``tuning`` block of results.json."""
        return {"validation": self.validation, "detectors": self.detectors,
                "validation_auroc": self.validation_auroc, "seconds": self.seconds}


def grid(space: dict[str, list], fixed: dict) -> list[dict]:
    """Every combination of the space's values, leaving out parameters the user fixed."""
    free = {k: v for k, v in space.items() if k not in fixed}
    if not free:
        return []
    return [dict(zip(free, values, strict=True)) for values in itertools.product(*free.values())][:MAX_TRIALS]


def validation_sets_apart(benchmark: Benchmark, outliers: str | None) -> dict[str, str]:
    """The validation OOD sets that share a source with the training outliers ``outliers``: name -> reason."""
    if not outliers:
        return {}
    return {name: f"same source as the training outliers ({outliers})"
            for name, entry in benchmark.val.get("ood", {}).items() if overlaps(outliers, entry["data"])}


def tune(model: torch.nn.Module, benchmark: Benchmark, detectors: dict[str, dict], *,
         cache: OutputCache | None = None, device: torch.device | str = "cpu", batch_size: int = 500,
         quiet: bool = True, root: str | Path | None = None, precision: str = "32-true",
         outliers: str | None = None) -> Tuning:
    """Choose each tunable detector's parameters by mean validation AUROC; test sets are not opened.

    Detectors fit on the training split minus the ID validation hold-out (``Benchmark.split_train``: without a
    ``val.id`` set, min(1000, 20% of the training split) class-balanced images, recorded as ``id_holdout``);
    each candidate scores the ID validation images against every validation OOD set except those from
    the source of the model's training ``outliers`` (a dataset spec, e.g. ``natural_patches``).
    """
    tic = time.perf_counter()
    cache = cache or OutputCache()
    model = model.to(device).eval()
    apart = validation_sets_apart(benchmark, outliers)
    if apart and set(apart) >= set(benchmark.val.get("ood", {})):
        raise ConfigError(f"every validation OOD set of benchmark {benchmark.name!r} shares its source with the "
                         f"training outliers {outliers!r}; tune on a benchmark with other validation sets")
    fit_images, val_id = benchmark.split_train(root)
    val_ood = {n: s for n, s in benchmark.val_ood_sets(root).items() if n not in apart}
    sets = {"id": val_id, **val_ood}
    layers = layer_keys_of((build_detector(label, options) for label, options in detectors.items()), model)
    outputs = {n: cache.outputs(model, s, device, batch_size, quiet, precision=precision, layers=layers)
               for n, s in sets.items()}
    train: ModelOutputs | None = None

    def train_inputs() -> Iterable:
        return image_loader(fit_images, batch_size)

    tuning = Tuning({"id": f"{val_id.name} ({len(val_id)} images)", **_holdout_record(benchmark, fit_images, val_id),
                     "ood": {n: f"{benchmark.val['ood'][n]['data']}:{benchmark.val['ood'][n].get('split', 'test')} "
                                f"({len(s)} images)" for n, s in val_ood.items()},
                     **({"excluded": apart} if apart else {})})
    with progress_bar(quiet) as bar:
        task = bar.add_task("tuning", total=len(detectors))
        for label, options in detectors.items():
            bar.update(task, status=label)
            default = build_detector(label, options)
            if not default.supports(model):
                bar.advance(task)
                continue
            if default.needs_fit and not default.fits_on_inputs and train is None:
                train = cache.outputs(model, fit_images, device, batch_size, quiet, precision=precision,
                                      layers=layers)
            outcome = _try_validation(default, model, train, outputs, sets, device, batch_size, precision,
                                      train_inputs)
            tuning.validation_auroc[label] = _auroc_record(outcome)
            trials = grid(type(default).search_space, options)
            if trials:  # the trial with the default values reuses the default's scores
                defaults = {k: getattr(default, k) for k in trials[0] if hasattr(default, k)}
                record, by_set = _search(label, options, trials, model, train, outputs, sets, device, batch_size,
                                         precision, known=(defaults, outcome), train_inputs=train_inputs)
                tuning.detectors[label] = record
                tuning.validation_auroc[f"{label}[tuned]"] = {"mean": record["val_auroc"], "by_set": by_set}
            bar.advance(task)
    tuning.seconds = time.perf_counter() - tic
    return tuning


def _holdout_record(benchmark: Benchmark, fit_images: Images, val_id: Images) -> dict:
    """``{"id_holdout": {...}}`` when the ID validation images were held out of the training split, else {}."""
    rule = benchmark.holdout_rule()
    if rule is None:
        return {}
    return {"id_holdout": {"images": len(val_id), "of_train": len(fit_images) + len(val_id), "rule": rule}}


def _search(label: str, options: dict, trials: list[dict], model, train, outputs, sets, device,
            batch_size: int, precision: str, known: tuple[dict, dict | str] | None = None,
            train_inputs: Callable[[], Iterable] | None = None) -> tuple[dict, dict]:
    """Score every trial on the validation sets; the best mean AUROC wins (ties: the earlier trial).

    ``known``: (params, outcome) already scored, reused for the trial with those params. Returns the
    record and the chosen trial's AUROC per validation set.
    """
    results, by_set = [], []
    for params in trials:
        if known is not None and params == known[0]:
            outcome = known[1]
        else:
            detector = build_detector(label, {**options, **params})
            outcome = _try_validation(detector, model, train, outputs, sets, device, batch_size, precision,
                                      train_inputs)
        record = _auroc_record(outcome)
        by_set.append(record["by_set"])
        results.append({"params": params, "val_auroc": record["mean"],
                        **({"error": record["error"]} if "error" in record else {})})
    finite = [i for i, r in enumerate(results) if np.isfinite(r["val_auroc"])]
    if not finite:
        raise ConfigError(f"tuning {label}: every trial gave non-finite validation scores")
    best = max(finite, key=lambda i: results[i]["val_auroc"])
    space = {k: v for k, v in type(build_detector(label, options)).search_space.items() if k in trials[0]}
    return ({"space": space, "chosen": results[best]["params"], "val_auroc": results[best]["val_auroc"],
             "trials": results}, by_set[best])


def _try_validation(detector: Detector, model, train, outputs, sets, device, batch_size: int,
                    precision: str, train_inputs: Callable[[], Iterable] | None = None) -> dict[str, float] | str:
    """AUROC per validation set, or the first line of the error of values that do not fit this model
    (e.g. a ViM dim >= the feature size)."""
    try:
        return _validation_aurocs(detector, model, train, outputs, sets, device, batch_size, precision, train_inputs)
    except ValueError as exc:
        return str(exc).splitlines()[0]


def _auroc_record(outcome: dict[str, float] | str) -> dict:
    """{"mean", "by_set"} of a validation outcome, with "error" (and a NaN mean) when it failed."""
    if isinstance(outcome, str):
        return {"mean": float("nan"), "by_set": {}, "error": outcome}
    return {"mean": _mean(outcome), "by_set": outcome}


def _mean(by_set: dict[str, float]) -> float:
    return float(np.mean(list(by_set.values()))) if by_set else float("nan")


def _validation_aurocs(detector: Detector, model, train, outputs, sets, device, batch_size: int,
                       precision: str = "32-true", train_inputs: Callable[[], Iterable] | None = None
                       ) -> dict[str, float]:
    """AUROC of the ID validation set against each validation OOD set (NaN for all if a score is not finite)."""
    detector._ready(train, model, train_inputs)
    scores = {}
    for name in outputs:
        if detector.needs_inputs:
            scores[name] = input_scores(detector, model, image_loader(sets[name], batch_size), device,
                                        precision).numpy()
        else:
            scores[name] = detector.score_outputs(outputs[name]).numpy()
    finite = all(np.isfinite(s).all() for s in scores.values())
    return {n: float(ood_metrics(scores["id"], s)["auroc"]) if finite else float("nan")
            for n, s in scores.items() if n != "id"}
