"""Hyperparameter tuning on validation data only: each detector's declared search space, scored by the
mean AUROC of ID validation images against the validation OOD sets. Test sets are never loaded here.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from oodforge.data.benchmarks import Benchmark
from oodforge.detectors import Detector, ModelOutputs
from oodforge.evaluate import build_detector, input_scores
from oodforge.features import OutputCache, image_loader
from oodforge.metrics import ood_metrics
from oodforge.progress import progress_bar

MAX_TRIALS = 64  # a search space larger than this is cut to its first MAX_TRIALS combinations


@dataclass
class Tuning:
    """What tuning chose: per detector label, the space, the trials and the chosen values."""

    validation: dict  # {"id": ..., "ood": {name: description}}
    detectors: dict[str, dict] = field(default_factory=dict)
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
        return {"validation": self.validation, "detectors": self.detectors, "seconds": self.seconds}


def grid(space: dict[str, list], fixed: dict) -> list[dict]:
    """Every combination of the space's values, leaving out parameters the user fixed."""
    free = {k: v for k, v in space.items() if k not in fixed}
    if not free:
        return []
    return [dict(zip(free, values, strict=True)) for values in itertools.product(*free.values())][:MAX_TRIALS]


def tune(model: torch.nn.Module, benchmark: Benchmark, detectors: dict[str, dict], *,
         cache: OutputCache | None = None, device: torch.device | str = "cpu", batch_size: int = 500,
         quiet: bool = True, root: str | Path | None = None, precision: str = "32-true") -> Tuning:
    """Choose each tunable detector's parameters by mean validation AUROC; test sets are not opened.

    Detectors fit on the training split minus the ID validation hold-out (``Benchmark.split_train``);
    each candidate scores the ID validation images against every validation OOD set.
    """
    tic = time.perf_counter()
    cache = cache or OutputCache()
    model = model.to(device).eval()
    fit_images, val_id = benchmark.split_train(root)
    val_ood = benchmark.val_ood_sets(root)
    sets = {"id": val_id, **val_ood}
    outputs = {n: cache.outputs(model, s, device, batch_size, quiet, precision=precision) for n, s in sets.items()}
    train: ModelOutputs | None = None
    tuning = Tuning({"id": f"{val_id.name} ({len(val_id)} images)",
                     "ood": {n: f"{benchmark.val['ood'][n]['data']}:{benchmark.val['ood'][n].get('split', 'test')} "
                                f"({len(s)} images)" for n, s in val_ood.items()}})
    with progress_bar(quiet) as bar:
        task = bar.add_task("tuning", total=len(detectors))
        for label, options in detectors.items():
            bar.update(task, status=label)
            default = build_detector(label, options)
            trials = grid(type(default).search_space, options) if default.supports(model) else []
            if trials:
                if default.needs_fit and train is None:
                    train = cache.outputs(model, fit_images, device, batch_size, quiet, precision=precision)
                tuning.detectors[label] = _search(label, options, trials, model, train, outputs, sets, device,
                                                  batch_size, precision)
            bar.advance(task)
    tuning.seconds = time.perf_counter() - tic
    return tuning


def _search(label: str, options: dict, trials: list[dict], model, train, outputs, sets, device,
            batch_size: int, precision: str) -> dict:
    """Score every trial on the validation sets; the best mean AUROC wins (ties: the earlier trial)."""
    results = []
    for params in trials:
        detector = build_detector(label, {**options, **params})
        try:
            auroc = _validation_auroc(detector, model, train, outputs, sets, device, batch_size, precision)
            results.append({"params": params, "val_auroc": auroc})
        except ValueError as exc:  # values that do not fit this model (e.g. a ViM dim >= the feature size)
            results.append({"params": params, "val_auroc": float("nan"), "error": str(exc).splitlines()[0]})
    finite = [r for r in results if np.isfinite(r["val_auroc"])]
    if not finite:
        raise ValueError(f"tuning {label}: every trial gave non-finite validation scores")
    best = max(finite, key=lambda r: r["val_auroc"])
    space = {k: v for k, v in type(build_detector(label, options)).search_space.items() if k in trials[0]}
    return {"space": space, "chosen": best["params"], "val_auroc": best["val_auroc"], "trials": results}


def _validation_auroc(detector: Detector, model, train, outputs, sets, device, batch_size: int,
                      precision: str = "32-true") -> float:
    """Mean AUROC of the ID validation set against each validation OOD set."""
    detector.prepare(train, model)
    scores = {}
    for name in outputs:
        if detector.needs_inputs:
            scores[name] = input_scores(detector, model, image_loader(sets[name], batch_size), device,
                                        precision).numpy()
        else:
            scores[name] = detector.score_outputs(outputs[name]).numpy()
    if not all(np.isfinite(s).all() for s in scores.values()):
        return float("nan")
    return float(np.mean([ood_metrics(scores["id"], s)["auroc"] for n, s in scores.items() if n != "id"]))
