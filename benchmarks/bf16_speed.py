"""bf16 against float32 : extraction, ODIN, training epochs and every detector's AUROC, in one process.

Run: OODFORGE_DATA=... python benchmarks/bf16_speed.py [--out benchmarks/results/bf16_speed.json] [--skip-training]
Extraction: the pretrained ResNet-20 over the `cifar10` test set and its OOD sets (41,200 images), each
precision twice, alternating; the faster run of each counts. AUROC: every detector (ODIN and GradNorm
included) on float32 outputs vs bf16 outputs (training features extracted in the same precision). ODIN
is timed apart on the same sets. Training: one epoch of the small CNN on Fashion-MNIST and of ResNet-20
on a 10,000-image class-balanced CIFAR-10 subset, each precision (two epochs, the faster counts). All on
this machine's threads (torch.get_num_threads()).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from oodforge.data.benchmarks import get_benchmark
from oodforge.evaluation.cache import OutputCache
from oodforge.evaluation.extraction import compute_outputs
from oodforge.evaluation.runner import evaluate
from oodforge.evaluation.specs import parse_detector_spec
from oodforge.models.classifier import ModelConfig, load_classifier
from oodforge.training.config import TrainConfig
from oodforge.training.loop import pretrained_config, train

PRECISIONS = ("32-true", "bf16-mixed")


def extraction_seconds(model, sets) -> dict[str, float]:
    """The faster of two timed passes over every set, per precision (alternating)."""
    best = {p: float("inf") for p in PRECISIONS}
    for _ in range(2):
        for precision in PRECISIONS:
            tic = time.perf_counter()
            for images in sets:
                compute_outputs(model, images, precision=precision)
            best[precision] = min(best[precision], time.perf_counter() - tic)
    return best


def aurocs(evaluation) -> dict[str, float]:
    return {f"{r['detector']}/{r['ood_dataset']}": 100 * r["auroc"] for r in evaluation.results}


def training_epoch_seconds(benchmark: str, subset: int | None, folder: Path) -> dict[str, dict]:
    """Two training epochs per precision: the faster epoch's seconds (the first warms up kernels), and the
    train accuracy after the first epoch."""
    record = {}
    for precision in PRECISIONS:
        config = TrainConfig(benchmark=benchmark, epochs=2, lr=0.05, train_subset=subset, precision=precision)
        model = train(config, folder / f"{benchmark}-{precision}", resume=False, quiet=True)
        record[precision] = {"seconds": min(e["seconds"] for e in model.history),
                             "epoch_seconds": [e["seconds"] for e in model.history],
                             "train_accuracy": model.history[0]["train_accuracy"]}
    record["ratio"] = record["bf16-mixed"]["seconds"] / record["32-true"]["seconds"]
    return record


def training_epochs() -> dict[str, dict]:
    """One epoch per precision of the small CNN (Fashion-MNIST) and ResNet-20 (10,000 CIFAR-10 images)."""
    with tempfile.TemporaryDirectory() as folder:
        return {"small_cnn/fashion_mnist": training_epoch_seconds("fashion_mnist", None, Path(folder)),
                "resnet20/cifar10 (10,000-image subset)": training_epoch_seconds("cifar10", 10000, Path(folder))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bf16_speed.json"))
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--only-training", action="store_true", help="re-measure the training epochs only, "
                        "updating the record in --out")
    args = parser.parse_args()
    if args.only_training:
        record = json.loads(args.out.read_text())
        record["training_epoch"] = training_epochs()
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(record["training_epoch"], indent=2))
        return
    weights = Path(os.environ["OODFORGE_DATA"]) / "weights" / "resnet20-12fca82f.th"
    bench = get_benchmark("cifar10")
    model = load_classifier(weights, pretrained_config(ModelConfig(num_classes=10), weights)).eval()
    sets = [bench.id_set("test")] + [bench.ood_set(n) for n in bench.ood]
    record: dict = {"threads": torch.get_num_threads(), "images": sum(len(s) for s in sets)}
    extraction = extraction_seconds(model, sets)
    record["extraction_s"] = extraction
    record["extraction_ratio"] = extraction["bf16-mixed"] / extraction["32-true"]
    print(json.dumps(record, indent=2), flush=True)

    cache = OutputCache()
    apart = ("odin", "gradnorm")
    cached = {k: v for k, v in parse_detector_spec("all").items() if k not in (*apart, "cosine")}
    rows, odin = {}, {}
    for precision in PRECISIONS:
        rows[precision] = aurocs(evaluate(model, bench, cached, cache=cache, quiet=True, precision=precision))
        for name in apart:
            tic = time.perf_counter()
            rows[precision].update(aurocs(evaluate(model, bench, {name: {}}, cache=cache, quiet=True,
                                                   precision=precision)))
            odin[f"{name}/{precision}_s"] = time.perf_counter() - tic
    differences = {key: rows["bf16-mixed"][key] - rows["32-true"][key] for key in rows["32-true"]}
    record["auroc"] = rows
    record["auroc_difference_max_abs"] = max(abs(d) for d in differences.values())
    record["auroc_difference_by_detector"] = {
        name: max(abs(d) for k, d in differences.items() if k.split("/")[0] == name)
        for name in dict.fromkeys(k.split("/")[0] for k in differences)}
    record["timed_apart_s"] = odin
    record["odin_ratio"] = odin["odin/bf16-mixed_s"] / odin["odin/32-true_s"]
    record["gradnorm_ratio"] = odin["gradnorm/bf16-mixed_s"] / odin["gradnorm/32-true_s"]
    print(json.dumps({k: v for k, v in record.items() if k != "auroc"}, indent=2), flush=True)

    if not args.skip_training:
        record["training_epoch"] = training_epochs()
        print(json.dumps(record["training_epoch"], indent=2), flush=True)
    record["max_abs_auroc_difference_points"] = float(np.round(record["auroc_difference_max_abs"], 4))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
