"""Timing: scoring with every cached-output detector vs the bare forward passes.

Run: OODFORGE_DATA=... python benchmarks/cifar10_scoring_time.py [--out benchmarks/results/cifar10_scoring_time.json]
Measures (1) bare float32 forward passes of the pretrained ResNet-20 over the CIFAR-10 test set and all its
OOD sets, (2) `evaluate` with every detector that works from cached outputs (intermediate layers included), cache
warm: fitting on the cached training outputs and scoring every set, (3) apart: the detectors that run the network
themselves (input gradients, dropout passes), and the intermediate-layer extraction of `gram` and
`multi_mahalanobis` (one forward pass with hooks over the training and scored sets, into an empty cache).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from oodforge.data.benchmarks import get_benchmark
from oodforge.detectors import DETECTORS, create_detector
from oodforge.evaluation.cache import OutputCache
from oodforge.evaluation.extraction import compute_outputs
from oodforge.evaluation.runner import evaluate
from oodforge.evaluation.specs import parse_detector_spec
from oodforge.models.classifier import ModelConfig, load_classifier
from oodforge.training.loop import pretrained_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cifar10_scoring_time.json"))
    args = parser.parse_args()
    weights = Path(os.environ["OODFORGE_DATA"]) / "weights" / "resnet20-12fca82f.th"
    bench = get_benchmark("cifar10")
    model = load_classifier(weights, pretrained_config(ModelConfig(num_classes=10), weights)).eval()
    sets = [bench.id_set("test")] + [bench.ood_set(n) for n in bench.ood]
    images = sum(len(s) for s in sets)
    tic = time.perf_counter()
    for s in sets:
        compute_outputs(model, s)
    forward_s = time.perf_counter() - tic
    every = parse_detector_spec("all")
    apart = [name for name in every if DETECTORS.get(name).needs_inputs or DETECTORS.get(name).fits_on_inputs]
    detectors = {k: v for k, v in every.items() if k not in (*apart, "cosine")}
    cache = OutputCache()
    evaluate(model, bench, detectors, cache=cache, quiet=True)  # warm the cache (train + test outputs)
    tic = time.perf_counter()
    warm = evaluate(model, bench, detectors, cache=cache, quiet=True)
    scoring_s = time.perf_counter() - tic
    timed_apart = {}
    for name in apart:
        tic = time.perf_counter()
        evaluate(model, bench, {name: {}}, cache=cache, quiet=True)
        timed_apart[f"{name}_s"] = time.perf_counter() - tic
    layers = {}
    for name in ("gram", "multi_mahalanobis"):
        with tempfile.TemporaryDirectory() as folder:
            fresh = OutputCache(Path(folder))
            keys = create_detector(name).layer_keys(model)
            tic = time.perf_counter()
            for images_set in [bench.id_set("train"), *sets]:
                fresh.layer_outputs(model, images_set, keys)
            layers[f"{name}_layer_extraction_s"] = time.perf_counter() - tic
    record = {"images": images, "threads": torch.get_num_threads(), "bare_forward_s": forward_s,
              "scoring_all_cached_detectors_s": scoring_s, "ratio": scoring_s / forward_s,
              "detectors": sorted(detectors), "per_detector_s": warm.timings, "apart_s": timed_apart,
              "layer_extraction_s": layers}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
