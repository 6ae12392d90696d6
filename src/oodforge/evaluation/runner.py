"""The benchmark runner: outputs once per dataset, every detector on every OOD set, metrics, files."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch

from oodforge.data.benchmark import Benchmark
from oodforge.data.overlap import warn_shared
from oodforge.detectors import Detector, ModelOutputs
from oodforge.evaluation.cache import OutputCache
from oodforge.evaluation.extraction import as_classifier, image_loader
from oodforge.evaluation.result import Evaluation
from oodforge.evaluation.scoring import score_sets
from oodforge.evaluation.sets import fit_images, scored_sets
from oodforge.evaluation.tuning import tune as tune_detectors
from oodforge.util.precision import resolve_precision


def evaluate(model: torch.nn.Module, benchmark: Benchmark, detectors: dict[str, dict], *,
             method: str | None = None, device: torch.device | str = "cpu", batch_size: int = 500,
             cache: OutputCache | None = None, quiet: bool = False, root: str | Path | None = None,
             fitted: dict[str, Detector] | None = None, train_subset: int | None = None,
             tune: bool = False, precision: str = "32-true", outliers: str | None = None) -> Evaluation:
    """Score the ID test set and every OOD set of ``benchmark`` with each detector in ``detectors``.

    Detectors in ``fitted`` (e.g. a flow reloaded from an earlier run) are used as they are; the
    others fit on the ID training set (``train_subset`` class-balanced images if given, as in training).
    With ``tune``, each tunable detector's parameters are first chosen on the benchmark's validation
    data (``oodforge.evaluation.tuning``; no test set is loaded until then) and scored as ``<label>[tuned]``
    beside its defaults; every detector then fits on the training split minus the ID validation images.
    ``outliers``: the dataset spec the model was trained against as outliers; validation sets from that
    source are left out of tuning.
    The network runs under ``precision`` (``auto``: bf16 autocast where the hardware has it natively;
    ``oodforge.util.precision``); outputs, detectors and metrics stay float32.
    """
    precision = resolve_precision(precision, device)
    cache = cache or OutputCache()
    model = as_classifier(model).to(device).eval()
    tuning = None
    if tune:
        tuning = tune_detectors(model, benchmark, detectors, cache=cache, device=device, batch_size=batch_size,
                                quiet=quiet, root=root, precision=precision, outliers=outliers)
        detectors = tuning.tuned_spec(detectors)
    start, key_seconds = time.perf_counter(), cache.key_seconds
    sets = scored_sets(benchmark, root)
    ood_sets = {n: s for n, s in sets.items() if n != benchmark.id_dataset}
    warn_shared(ood_sets, sets[benchmark.id_dataset], "test", benchmark.id_dataset)
    outputs = {n: cache.outputs(model, s, device, batch_size, quiet, precision=precision) for n, s in sets.items()}

    def train_outputs(layers: list[str]) -> ModelOutputs:
        fit = fit_images(benchmark, root, train_subset, tune)
        warn_shared(ood_sets, fit, "training", benchmark.id_dataset)
        return cache.outputs(model, fit, device, batch_size, quiet, precision=precision, layers=layers)

    def layer_source(name: str, layers: list[str]) -> dict[str, torch.Tensor]:
        return cache.layer_outputs(model, sets[name], layers, device, batch_size, quiet, precision=precision)

    loaders = {n: functools.partial(image_loader, s, batch_size) for n, s in sets.items()}
    evaluation = score_sets(model, detectors, outputs, loaders, benchmark.id_dataset, benchmark.ood, train_outputs,
                            method=method, fitted=fitted, quiet=quiet, device=device,
                            timings={"outputs_s": time.perf_counter() - start}, precision=precision,
                            layer_source=layer_source,
                            train_inputs=lambda: image_loader(fit_images(benchmark, root, train_subset, tune),
                                                              batch_size))
    evaluation.timings["cache_keys_s"] = cache.key_seconds - key_seconds
    if tuning is not None:
        evaluation.tuning = tuning.record()
        evaluation.timings["tuning_s"] = tuning.seconds
    return evaluation


