"""The benchmark runner: outputs once per dataset, every detector on every OOD set, metrics, files."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

from oodforge.data.benchmarks import Benchmark
from oodforge.data.imageset import ImageSet
from oodforge.detectors import DETECTORS, Detector, ModelOutputs, create_detector
from oodforge.diagnostics import tolerance, uniformity
from oodforge.features import OutputCache
from oodforge.io import atomic_json, atomic_npz
from oodforge.metrics import accuracy, ood_metrics
from oodforge.progress import progress_bar


def parse_detector_spec(spec: str) -> dict[str, dict]:
    """``"msp,energy:temperature=2,knn:k=10;use_faiss=true"`` or ``"all"`` -> {name: options} (YAML values)."""
    detectors: dict[str, dict] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, rest = item.partition(":")
        if name == "all":
            detectors.update({n: {} for n in DETECTORS.names() if n not in detectors})
            continue
        DETECTORS.get(name)  # fails early with the list of known names
        options = {}
        for pair in filter(None, rest.split(";")):
            key, sep, value = pair.partition("=")
            if not sep:
                raise ValueError(f"detector option {pair!r} of {name!r} must look like key=value")
            options[key] = yaml.safe_load(value)
        detectors[name] = options
    if not detectors:
        raise ValueError("no detector named")
    return detectors


def applicable(name: str, model: torch.nn.Module) -> bool:
    """Whether detector ``name`` can run on ``model`` (``cosine`` needs a cosine head)."""
    return name != "cosine" or hasattr(model.head, "cosine")


@dataclass
class Evaluation:
    """Everything one model's evaluation on a benchmark produced."""

    id_accuracy: float
    results: list[dict] = field(default_factory=list)
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    detectors: dict[str, Detector] = field(default_factory=dict)


def input_scores(detector: Detector, model: torch.nn.Module, images: ImageSet, device: torch.device | str,
                 batch_size: int) -> torch.Tensor:
    """Scores of a detector that needs the inputs themselves (ODIN), batch by batch."""
    model.eval()
    loader = DataLoader(images.torch_dataset(), batch_size=batch_size, shuffle=False)
    return torch.cat([detector.score(model, x.to(device)).float().cpu() for x, _ in loader])


def evaluate(model: torch.nn.Module, benchmark: Benchmark, detectors: dict[str, dict], *,
             method: str | None = None, device: torch.device | str = "cpu", batch_size: int = 500,
             cache: OutputCache | None = None, quiet: bool = False, root: str | Path | None = None,
             fitted: dict[str, Detector] | None = None, train_subset: int | None = None) -> Evaluation:
    """Score the ID test set and every OOD set of ``benchmark`` with each detector in ``detectors``.

    Detectors in ``fitted`` (e.g. a flow reloaded from an earlier run) are used as they are; the
    others fit on the ID training set (``train_subset`` class-balanced images if given, as in training).
    """
    cache = cache or OutputCache()
    fitted = fitted or {}
    model = model.to(device).eval()
    names = [n for n in detectors if applicable(n, model)]
    built = {n: fitted.get(n) or create_detector(n, **detectors[n]) for n in names}
    start = time.perf_counter()
    test = benchmark.id_set("test", root)
    sets = {benchmark.id_dataset: test} | {n: benchmark.ood_set(n, root) for n in benchmark.ood}
    outputs = {n: cache.outputs(model, s, device, batch_size, quiet) for n, s in sets.items()}
    train_outputs = None
    if any(d.needs_fit and n not in fitted for n, d in built.items()):
        train_images = benchmark.id_set("train", root)
        if train_subset:
            train_images = train_images.balanced_head(train_subset)
        train_outputs = cache.outputs(model, train_images, device, batch_size, quiet)
    timings = {"outputs_s": time.perf_counter() - start}
    evaluation = Evaluation(accuracy(outputs[benchmark.id_dataset].logits.numpy(), test.labels),
                            diagnostics=feature_diagnostics(outputs[benchmark.id_dataset]), timings=timings)
    prefix = f"{method}/" if method else ""
    with progress_bar(quiet) as bar:
        task = bar.add_task("detectors", total=len(built))
        for name, detector in built.items():
            bar.update(task, status=name)
            tic = time.perf_counter()
            if detector.needs_fit and name not in fitted:
                detector.fit(train_outputs, model)
            for dataset, images in sets.items():
                scores = (input_scores(detector, model, images, device, batch_size) if detector.needs_inputs
                          else detector.score_outputs(outputs[dataset]))
                evaluation.scores[f"{prefix}{name}/{dataset}"] = scores.numpy().astype(np.float64)
            timings[f"{name}_s"] = time.perf_counter() - tic
            evaluation.detectors[name] = detector
            bar.advance(task)
    evaluation.results = results_table(evaluation.scores, benchmark, names, method)
    return evaluation


def results_table(scores: dict[str, np.ndarray], benchmark: Benchmark, detectors: list[str],
                  method: str | None) -> list[dict]:
    """One metrics row per (detector, OOD set), computed from the raw ``scores``."""
    prefix = f"{method}/" if method else ""
    rows = []
    for name in detectors:
        id_scores = scores[f"{prefix}{name}/{benchmark.id_dataset}"]
        for dataset, group in benchmark.ood.items():
            metrics = ood_metrics(id_scores, scores[f"{prefix}{name}/{dataset}"])
            rows.append({"method": method or "model", "detector": name, "ood_dataset": dataset,
                         "group": group, **metrics})
    return rows


def feature_diagnostics(outputs: ModelOutputs) -> dict[str, float]:
    """Uniformity and tolerance of the L2-normalized ID test features (design.md §3)."""
    return {"uniformity": uniformity(outputs.features), "tolerance": tolerance(outputs.features, outputs.labels)}


def write_run(out_dir: Path, payload: dict, scores: dict[str, np.ndarray]) -> None:
    """Write ``results.json`` and ``scores.npz`` atomically into ``out_dir``."""
    atomic_npz(scores, out_dir / "scores.npz")
    atomic_json(payload, out_dir / "results.json")


def mean_auroc(results: list[dict], detector: str, group: str, method: str | None = None) -> float:
    """Mean AUROC of ``detector`` over the OOD sets of ``group``."""
    values = [r["auroc"] for r in results if r["detector"] == detector and r["group"] == group
              and (method is None or r["method"] == method)]
    return float(np.mean(values)) if values else float("nan")


def load_fitted_detectors(folder: Path, names: list[str]) -> dict[str, Detector]:
    """Detectors saved by an earlier run (``<folder>/<name>.pt``, e.g. the flow) that can be reloaded."""
    fitted = {}
    for name in names:
        path = folder / f"{name}.pt"
        loader = getattr(DETECTORS.get(name), "load", None)
        if path.is_file() and loader is not None:
            fitted[name] = loader(path)
    return fitted
