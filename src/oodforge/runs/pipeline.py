"""The one score-and-save pipeline: ``write_run`` saves what an evaluation gave as a run folder, for the command
line, ``oodforge bench`` and the Python API alike; ``score_and_save`` scores a model on a benchmark and writes it;
``evaluate_ood`` does the same for any classifier and data."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from oodforge.data.benchmark import Benchmark
from oodforge.detectors import ModelOutputs
from oodforge.evaluation.cache import OutputCache
from oodforge.evaluation.extraction import (
    Data,
    as_classifier,
    as_loader,
    default_device,
    extract_outputs,
    model_device,
)
from oodforge.evaluation.runner import evaluate
from oodforge.evaluation.scoring import score_sets
from oodforge.evaluation.specs import build_detector, detector_options
from oodforge.runs.payload import MethodRun, run_payload, save_run
from oodforge.runs.results import OODResults
from oodforge.util.errors import ConfigError
from oodforge.util.precision import resolve_precision


def evaluate_ood(model: torch.nn.Module, id_train: Data | None, id_test: Data, ood: dict[str, object],
                 detectors: str | list[str] | dict[str, dict] = "all", *, out: str | Path | None = None,
                 device: torch.device | str | None = None, batch_size: int = 256, num_workers: int = 0,
                 quiet: bool = False, id_name: str = "id", name: str = "custom",
                 precision: str = "32-true") -> OODResults:
    """Evaluate detectors on any classifier and data: fit on ``id_train``, score ``id_test`` and each OOD set.

    ``ood`` maps a name to data or to ``(data, "near" | "far")`` (plain data counts as far); data are
    DataLoaders, Datasets or tensors with batches ``x`` or ``(x, y)``. With ``out``, the usual run
    folder (results.json, scores.npz, report.html) is written there. ``precision="auto"`` runs the network
    under bf16 autocast where the hardware has it natively (``oodforge.util.precision``).
    """
    spec = detector_options(detectors)
    model = as_classifier(model)
    device = model_device(model) if device is None else torch.device(device)
    precision = resolve_precision(precision, device)
    groups, data = _ood_groups(ood, id_name)
    sets = {id_name: id_test, **data}
    loaders = {n: as_loader(d, batch_size, num_workers) for n, d in sets.items()}
    start = time.perf_counter()
    outputs = {n: extract_outputs(model, loader, device, quiet=quiet, precision=precision)
               for n, loader in loaders.items()}

    def train_outputs(layers: list[str]) -> ModelOutputs:
        if id_train is None:
            raise ConfigError("id_train is needed to fit " + ", ".join(
                n for n, o in spec.items() if build_detector(n, o).needs_fit))
        return extract_outputs(model, as_loader(id_train, batch_size, num_workers), device, quiet=quiet,
                               precision=precision, layers=layers)

    def layer_source(name: str, layers: list[str]) -> dict[str, torch.Tensor]:
        return extract_outputs(model, loaders[name], device, quiet=quiet, precision=precision, layers=layers).layers

    evaluation = score_sets(model, spec, outputs, {n: (lambda lo=lo: lo) for n, lo in loaders.items()}, id_name,
                            groups, train_outputs, quiet=quiet, device=device,
                            timings={"outputs_s": time.perf_counter() - start}, precision=precision,
                            layer_source=layer_source,
                            train_inputs=None if id_train is None
                            else lambda: as_loader(id_train, batch_size, num_workers))
    benchmark = Benchmark(name, id_name, groups, (0, 0, 0), (), ())
    return write_run(None if out is None else Path(out), benchmark, {"model": MethodRun.of(model, evaluation)})


def write_run(out: Path | None, benchmark: Benchmark, runs: dict[str, MethodRun], *, fields: dict | None = None,
              extra_files: Callable[[dict], dict[str, str]] | None = None, save_detectors: bool = True
              ) -> OODResults:
    """Save the runs of one benchmark as a run folder in ``out``: results.json (with ``fields`` added),
    scores.npz, results.md, report.html and the text files ``extra_files(payload)`` gives, changed together;
    detectors whose fitted state is costly to rebuild (the flow) are saved under ``out/detectors`` (unless
    ``save_detectors`` is False). With ``out`` None nothing is written. The first run's evaluation (with every
    run's rows) comes back."""
    payload, scores = run_payload(benchmark, runs)
    payload.update(fields or {})
    first = next(iter(runs.values())).evaluation
    if out is not None:
        for run in runs.values() if save_detectors else ():
            for label, detector in run.evaluation.detectors.items():
                if getattr(detector, "save_with_run", False):
                    detector.save(out / "detectors" / f"{label}.pt")
        save_run(out, payload, scores, extra=extra_files(payload) if extra_files else None)
    return OODResults.of(replace(first, scores=scores), payload)


def score_and_save(model: torch.nn.Module, benchmark: Benchmark, detectors: str | dict[str, dict], out: Path, *,
                   method: str | None = None, train: dict | None = None, checkpoint: str | None = None,
                   cache: OutputCache | None = None, device: torch.device | str | None = None,
                   batch_size: int = 500, quiet: bool = False, fitted: dict | None = None,
                   train_subset: int | None = None, tune: bool = False, precision: str = "auto",
                   outliers: str | None = None) -> OODResults:
    """Score ``model`` on ``benchmark`` with ``detectors`` (``evaluate``) and write the run folder ``out``."""
    evaluation = evaluate(model, benchmark, detector_options(detectors), method=method,
                          device=default_device() if device is None else device, batch_size=batch_size,
                          cache=cache, quiet=quiet, fitted=fitted, train_subset=train_subset, tune=tune,
                          precision=precision, outliers=outliers)
    return write_run(out, benchmark, {method or "model": MethodRun.of(model, evaluation, train, checkpoint)})


def _ood_groups(ood: dict[str, object], id_name: str) -> tuple[dict[str, str], dict[str, object]]:
    """{name: data or (data, group)} -> ({name: group}, {name: data})."""
    if not isinstance(ood, dict) or not ood:
        raise ConfigError("ood must map at least one OOD set name to data or (data, 'near' | 'far')")
    groups, data = {}, {}
    for name, entry in ood.items():
        if name == id_name:
            raise ConfigError(f"OOD set {name!r} has the ID set's name; pass id_name= or rename it")
        if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], str):
            entry, group = entry
            if group not in ("near", "far"):
                raise ConfigError(f"group of OOD set {name!r} must be 'near' or 'far', got {group!r}")
        else:
            group = "far"
        groups[name], data[name] = group, entry
    return groups, data
