"""The benchmark runner: outputs once per dataset, every detector on every OOD set, metrics, files."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader

from oodforge.detectors import Detector, ModelOutputs
from oodforge.evaluation.diagnostics import tolerance, uniformity
from oodforge.evaluation.extraction import split_batch
from oodforge.evaluation.metrics import accuracy, ood_metrics
from oodforge.evaluation.result import Evaluation
from oodforge.evaluation.specs import build_detector
from oodforge.util.errors import ConfigError, DivergedError
from oodforge.util.precision import autocast, resolve_precision
from oodforge.util.progress import progress_bar


def input_scores(detector: Detector, model: torch.nn.Module, loader: DataLoader, device: torch.device | str,
                 precision: str = "32-true") -> torch.Tensor:
    """Scores of a detector that needs the inputs themselves (ODIN), batch by batch; the network's passes
    (forward and input gradients) run under ``precision``'s autocast, the scores come back float32."""
    was_training = model.training
    model.eval()
    try:
        parts = []
        for batch in loader:
            with autocast(precision, device):
                parts.append(detector.score(model, split_batch(batch)[0].to(device)).float().cpu())
        return torch.cat(parts)
    finally:
        model.train(was_training)


def id_accuracy(outputs: ModelOutputs) -> float | None:
    """Top-1 accuracy of the ID test outputs, or None when they are not all labelled or the logits are not finite."""
    labels = outputs.labels
    if labels is None or len(labels) == 0 or bool((labels < 0).any()):
        return None
    if float((~torch.isfinite(outputs.logits)).any(dim=1).float().mean()) > NONFINITE_LIMIT:
        return None  # an accuracy built on NaN logits is no number
    return accuracy(outputs.logits.numpy(), labels.numpy())


def layer_keys_of(detectors: Iterable[Detector], model: torch.nn.Module) -> list[str]:
    """Every intermediate layer key (``<layer>@<reduction>``) the ``detectors`` that run on ``model`` read."""
    keys = [key for detector in detectors if detector.supports(model) for key in detector.layer_keys(model)]
    return list(dict.fromkeys(keys))


def score_sets(model: torch.nn.Module, detectors: dict[str, dict], outputs: dict[str, ModelOutputs],
               loaders: dict[str, Callable[[], DataLoader]], id_name: str, groups: dict[str, str],
               train_outputs: Callable[[list[str]], ModelOutputs], *, method: str | None = None,
               fitted: dict[str, Detector] | None = None, quiet: bool = False, device: torch.device | str = "cpu",
               timings: dict | None = None, precision: str = "32-true",
               layer_source: Callable[[str, list[str]], dict[str, torch.Tensor]] | None = None,
               train_inputs: Callable[[], DataLoader] | None = None) -> Evaluation:
    """Fit each detector once and score the ID set ``id_name`` and every OOD set of ``groups`` with it.

    ``outputs`` holds every set's model outputs; detectors that need the inputs (ODIN) read them
    from ``loaders``; ``train_outputs(layer keys)`` is called only when some detector must be fitted.
    When some detector reads intermediate layers, ``layer_source(set name, keys)`` gives them for each scored set;
    detectors that fit on the training inputs themselves read ``train_inputs()``.
    """
    fitted = fitted or {}
    candidates = {n: fitted.get(n) or build_detector(n, detectors[n]) for n in detectors}
    built = {n: d for n, d in candidates.items() if d.supports(model)}
    names = list(built)
    for name in fitted:
        if name in built and getattr(built[name], "model_", None) is None:
            built[name].model_ = model
    layers = layer_keys_of(built.values(), model)
    if layers:
        if layer_source is None:
            raise ConfigError(f"{', '.join(n for n, d in built.items() if d.layer_keys(model))} read intermediate "
                              "layers, which this pipeline cannot extract")
        outputs = {**outputs, **{d: outputs[d].with_layers(layer_source(d, layers)) for d in [id_name, *groups]}}
    train = train_outputs(layers) if any(d.needs_fit and not d.fits_on_inputs and n not in fitted
                                         for n, d in built.items()) else None
    timings = {**(timings or {})}
    evaluation = Evaluation(id_accuracy(outputs[id_name]), diagnostics=feature_diagnostics(outputs[id_name]),
                            timings=timings, precision=resolve_precision(precision, device))
    prefix = f"{method}/" if method else ""
    with progress_bar(quiet) as bar:
        task = bar.add_task("detectors", total=len(built))
        for name, detector in built.items():
            bar.update(task, status=name)
            tic = time.perf_counter()
            if name not in fitted:
                detector._ready(train, model, train_inputs)
            scores = {dataset: (input_scores(detector, model, loaders[dataset](), device, precision)
                                if detector.needs_inputs else detector.score_outputs(outputs[dataset])
                                ).numpy().astype(np.float64)
                      for dataset in [id_name, *groups]}
            problem = nonfinite_problem(name, scores)
            if problem is not None:
                evaluation.failed[name] = problem
            else:
                evaluation.scores.update({f"{prefix}{name}/{d}": v for d, v in scores.items()})
            timings[f"{name}_s"] = time.perf_counter() - tic
            evaluation.detectors[name] = detector
            bar.advance(task)
    names = [n for n in names if n not in evaluation.failed]
    if not names and evaluation.failed:
        raise DivergedError("no detector gave finite scores: " + next(iter(evaluation.failed.values()))["error"])
    evaluation.results = results_table(evaluation.scores, id_name, groups, names, method)
    for detector in list(evaluation.detectors):
        if detector in evaluation.failed:
            del evaluation.detectors[detector]
    return evaluation


NONFINITE_LIMIT = 0.01  # a detector whose scores are NaN/infinite on more than this share of a set fails


def nonfinite_problem(name: str, scores: dict[str, np.ndarray]) -> dict | None:
    """None when ``scores`` are finite enough; else the error and the non-finite share of every set."""
    shares = {dataset: float(np.mean(~np.isfinite(values))) if len(values) else 0.0
              for dataset, values in scores.items()}
    dataset, worst = max(shares.items(), key=lambda item: item[1])
    if worst <= NONFINITE_LIMIT:
        return None
    return {"error": f"{name}: {100 * worst:.1f}% of its scores on {dataset} are NaN or infinite (more than "
                     f"{100 * NONFINITE_LIMIT:.0f}%); no result is reported for it", "nonfinite_share": shares}


def results_table(scores: dict[str, np.ndarray], id_name: str, groups: dict[str, str], detectors: list[str],
                  method: str | None) -> list[dict]:
    """One metrics row per (detector, OOD set), computed from the raw ``scores``."""
    prefix = f"{method}/" if method else ""
    rows = []
    for name in detectors:
        id_scores = scores[f"{prefix}{name}/{id_name}"]
        for dataset, group in groups.items():
            ood_scores = scores[f"{prefix}{name}/{dataset}"]
            metrics = ood_metrics(id_scores, ood_scores)
            row = {"method": method or "model", "detector": name, "ood_dataset": dataset, "group": group, **metrics}
            share = float(np.mean(~np.isfinite(np.r_[id_scores, ood_scores])))
            if share > 0:  # at most NONFINITE_LIMIT: counted as the least in-distribution scores
                row["nonfinite_share"] = share
            rows.append(row)
    return rows


def feature_diagnostics(outputs: ModelOutputs) -> dict[str, float]:
    """Uniformity and tolerance of the L2-normalized ID test features (design.md §3)."""
    labelled = outputs.labels is not None and len(outputs.labels) and not bool((outputs.labels < 0).any())
    return {"uniformity": uniformity(outputs.features),
            "tolerance": tolerance(outputs.features, outputs.labels) if labelled else None}
