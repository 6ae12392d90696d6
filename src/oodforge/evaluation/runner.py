"""The benchmark runner: outputs once per dataset, every detector on every OOD set, metrics, files."""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from oodforge.data.benchmark import Benchmark
from oodforge.data.overlap import warn_shared
from oodforge.detectors import DETECTORS, Detector, ModelOutputs, create_detector
from oodforge.detectors.base import registered_name
from oodforge.evaluation.diagnostics import tolerance, uniformity
from oodforge.evaluation.extraction import (
    Data,
    Images,
    OutputCache,
    as_classifier,
    as_loader,
    extract_outputs,
    image_loader,
    model_device,
    split_batch,
)
from oodforge.evaluation.metrics import accuracy, ood_metrics
from oodforge.runs.results import OODResults
from oodforge.util.precision import autocast, resolve_precision
from oodforge.util.progress import progress_bar
from oodforge.util.validation import parse_options


def parse_detector_spec(spec: str) -> dict[str, dict]:
    """``"msp,energy:temperature=2,knn:k=10;use_faiss=true"`` or ``"all"`` -> {label: options} (YAML values).

    Every detector is built once here, so an unknown name or option, a wrong type or a value out of
    range fails before any work. A name given twice with different options gives named variants,
    ``knn:k=10,knn:k=50`` -> labels ``knn[k=10]`` and ``knn[k=50]``, whose options carry
    ``detector: knn``; ``all`` adds every registered detector with its defaults.
    """
    items: list[tuple[str, dict, bool]] = []  # (name, options, came from "all")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, rest = item.partition(":")
        if name == "all":
            items.extend((n, {}, True) for n in DETECTORS.names())
            continue
        options = parse_options(filter(None, rest.split(";")), f"detector {item!r}: option")
        create_detector(name, **options)
        items.append((name, options, False))
    explicit = Counter(name for name, _, from_all in items if not from_all)
    detectors: dict[str, dict] = {}
    for name, options, from_all in items:
        if from_all and explicit[name]:
            continue  # an explicit entry replaces the default that "all" adds
        if explicit[name] > 1 and options:
            detectors[f"{name}[{_options_text(options)}]"] = {"detector": name, **options}
        else:
            detectors[name] = options
    if not detectors:
        raise ValueError("no detector named")
    return detectors


def _options_text(options: dict) -> str:
    return ";".join(f"{k}={v}" for k, v in options.items())


def build_detector(label: str, options: dict) -> Detector:
    """The detector behind one entry of a parsed spec (``options["detector"]`` names it for variants)."""
    options = dict(options)
    return create_detector(options.pop("detector", label), **options)


def detector_record(detector: Detector) -> dict:
    """What results.json says of a detector: its registered name, parameters, what it reads and, where a default
    was clamped to the data (``size_within``), the values used (``params_used``)."""
    params = {k: v if isinstance(v, bool | int | float | str | type(None)) else repr(v)
              for k, v in detector.get_params().items()}
    used = getattr(detector, "params_used_", None)
    return {"detector": registered_name(detector) or type(detector).__name__, "params": params,
            **({"params_used": dict(used)} if used else {}), "requires": list(detector.requires)}


@dataclass
class Evaluation:
    """Everything one model's evaluation on a benchmark produced."""

    id_accuracy: float | None
    results: list[dict] = field(default_factory=list)
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    detectors: dict[str, Detector] = field(default_factory=dict)
    tuning: dict | None = None
    failed: dict[str, dict] = field(default_factory=dict)  # detectors dropped for non-finite scores
    precision: str = "32-true"  # of the network's passes (outputs, detectors and metrics are float32)
    records: dict[str, dict] | None = None  # detector records of a stored evaluation (no fitted detectors kept)

    def detector_records(self) -> dict[str, dict]:
        """{label: name, parameters and needs} of every detector scored, for results.json."""
        if self.records is not None:
            return dict(self.records)
        return {label: detector_record(d) for label, d in self.detectors.items()}


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
        from oodforge.evaluation.tuning import tune as tune_detectors

        tuning = tune_detectors(model, benchmark, detectors, cache=cache, device=device, batch_size=batch_size,
                                quiet=quiet, root=root, precision=precision, outliers=outliers)
        detectors = tuning.tuned_spec(detectors)
    start, key_seconds = time.perf_counter(), cache.key_seconds
    sets = scored_sets(benchmark, root)
    ood_sets = {n: s for n, s in sets.items() if n != benchmark.id_dataset}
    warn_shared(ood_sets, sets[benchmark.id_dataset], "test", benchmark.id_dataset)
    outputs = {n: cache.outputs(model, s, device, batch_size, quiet, precision=precision) for n, s in sets.items()}

    def train_outputs() -> ModelOutputs:
        fit = fit_images(benchmark, root, train_subset, tune)
        warn_shared(ood_sets, fit, "training", benchmark.id_dataset)
        return cache.outputs(model, fit, device, batch_size, quiet, precision=precision)

    loaders = {n: functools.partial(image_loader, s, batch_size) for n, s in sets.items()}
    evaluation = score_sets(model, detectors, outputs, loaders, benchmark.id_dataset, benchmark.ood, train_outputs,
                            method=method, fitted=fitted, quiet=quiet, device=device,
                            timings={"outputs_s": time.perf_counter() - start}, precision=precision)
    evaluation.timings["cache_keys_s"] = cache.key_seconds - key_seconds
    if tuning is not None:
        evaluation.tuning = tuning.record()
        evaluation.timings["tuning_s"] = tuning.seconds
    return evaluation


def scored_sets(benchmark: Benchmark, root: str | Path | None = None) -> dict[str, Images]:
    """The ID test set and every OOD test set of ``benchmark``, by name."""
    return {benchmark.id_dataset: benchmark.id_set("test", root)} | {n: benchmark.ood_set(n, root)
                                                                     for n in benchmark.ood}


def fit_images(benchmark: Benchmark, root: str | Path | None = None, train_subset: int | None = None,
               tune: bool = False) -> Images:
    """The ID training images detectors fit on: the training split (less the ID validation hold-out when
    tuning), ``train_subset`` class-balanced images of it if given (as in training)."""
    images = benchmark.split_train(root)[0] if tune else benchmark.id_set("train", root)
    return images.balanced_head(train_subset) if train_subset else images


def evaluated_sets(benchmark: Benchmark, root: str | Path | None = None, train_subset: int | None = None,
                   tune: bool = False) -> dict[str, Images]:
    """Every set an evaluation reads: the scored test sets, the images detectors fit on and, when tuning,
    the ID and OOD validation sets (keys ``test:<name>``, ``fit``, ``val:id``, ``val:<name>``)."""
    sets = {f"test:{name}": images for name, images in scored_sets(benchmark, root).items()}
    sets["fit"] = fit_images(benchmark, root, train_subset, tune)
    if tune:
        sets["val:id"] = benchmark.split_train(root)[1]
        sets |= {f"val:{name}": images for name, images in benchmark.val_ood_sets(root).items()}
    return sets


def score_sets(model: torch.nn.Module, detectors: dict[str, dict], outputs: dict[str, ModelOutputs],
               loaders: dict[str, Callable[[], DataLoader]], id_name: str, groups: dict[str, str],
               train_outputs: Callable[[], ModelOutputs], *, method: str | None = None,
               fitted: dict[str, Detector] | None = None, quiet: bool = False, device: torch.device | str = "cpu",
               timings: dict | None = None, precision: str = "32-true") -> Evaluation:
    """Fit each detector once and score the ID set ``id_name`` and every OOD set of ``groups`` with it.

    ``outputs`` holds every set's model outputs; detectors that need the inputs (ODIN) read them
    from ``loaders``; ``train_outputs`` is called only when some detector must be fitted.
    """
    fitted = fitted or {}
    candidates = {n: fitted.get(n) or build_detector(n, detectors[n]) for n in detectors}
    built = {n: d for n, d in candidates.items() if d.supports(model)}
    names = list(built)
    for name in fitted:
        if name in built and getattr(built[name], "model_", None) is None:
            built[name].model_ = model
    train = train_outputs() if any(d.needs_fit and n not in fitted for n, d in built.items()) else None
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
                detector.prepare(train, model)
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
        raise FloatingPointError("no detector gave finite scores: " + next(iter(evaluation.failed.values()))["error"])
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


def mean_auroc(results: list[dict], detector: str, group: str, method: str | None = None) -> float:
    """Mean AUROC of ``detector`` over the OOD sets of ``group``."""
    values = [r["auroc"] for r in results if r["detector"] == detector and r["group"] == group
              and (method is None or r["method"] == method)]
    return float(np.mean(values)) if values else float("nan")


def load_fitted_detectors(folder: Path, detectors: dict[str, dict]) -> dict[str, Detector]:
    """Detectors saved by an earlier run (``<folder>/<label>.pt``, e.g. the flow), reloaded."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--detector-dir {folder} is not a folder")
    fitted = {}
    for label, options in detectors.items():
        path = folder / f"{label}.pt"
        if path.is_file():
            fitted[label] = DETECTORS.get(options.get("detector", label)).load(path)
    return fitted


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
    from oodforge.data.benchmark import Benchmark
    from oodforge.runs.payload import run_payload, save_run

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

    def train_outputs() -> ModelOutputs:
        if id_train is None:
            raise ValueError("id_train is needed to fit " + ", ".join(
                n for n, o in spec.items() if build_detector(n, o).needs_fit))
        return extract_outputs(model, as_loader(id_train, batch_size, num_workers), device, quiet=quiet,
                               precision=precision)

    evaluation = score_sets(model, spec, outputs, {n: (lambda lo=lo: lo) for n, lo in loaders.items()}, id_name,
                            groups, train_outputs, quiet=quiet, device=device,
                            timings={"outputs_s": time.perf_counter() - start}, precision=precision)
    benchmark = Benchmark(name, id_name, groups, (0, 0, 0), (), ())
    payload, scores = run_payload(benchmark, {"model": (model, evaluation, {}, None)})
    if out is not None:
        save_run(Path(out), payload, scores)
    return OODResults(payload, scores, evaluation.detectors)


def detector_options(detectors: str | list[str] | dict[str, dict]) -> dict[str, dict]:
    """A ``--detectors`` string, a list of such items, or {label: options} -> {label: options}, checked."""
    if isinstance(detectors, str):
        return parse_detector_spec(detectors)
    if isinstance(detectors, dict):
        for label, options in detectors.items():
            build_detector(label, options or {})
        return {n: dict(o or {}) for n, o in detectors.items()}
    return parse_detector_spec(",".join(detectors))


def _ood_groups(ood: dict[str, object], id_name: str) -> tuple[dict[str, str], dict[str, object]]:
    """{name: data or (data, group)} -> ({name: group}, {name: data})."""
    if not isinstance(ood, dict) or not ood:
        raise ValueError("ood must map at least one OOD set name to data or (data, 'near' | 'far')")
    groups, data = {}, {}
    for name, entry in ood.items():
        if name == id_name:
            raise ValueError(f"OOD set {name!r} has the ID set's name; pass id_name= or rename it")
        if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], str):
            entry, group = entry
            if group not in ("near", "far"):
                raise ValueError(f"group of OOD set {name!r} must be 'near' or 'far', got {group!r}")
        else:
            group = "far"
        groups[name], data[name] = group, entry
    return groups, data
