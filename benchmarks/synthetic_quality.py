"""How good are the generated sets (Fashion-MNIST, CIFAR-10)? Classifiers trained on real data judge them.

    python benchmarks/synthetic_quality.py \
        --models runs/bench-fmnist_sio/ce/seed{0,1,2}/model.ckpt \
        --id-set runs/synthetic/fmnist-id --interp-set runs/synthetic/fmnist-interp
    python benchmarks/synthetic_quality.py --benchmark cifar10 \
        --models runs/cifar10_scratch/ce/seed{0,1,2}/model.ckpt \
        --id-set runs/synthetic/cifar10-id --interp-set runs/synthetic/cifar10-interp \
        --out benchmarks/results/cifar10_synthetic_quality

For each classifier (trained on real images only): accuracy on the real test set and on the synthetic
ID set (the generator's class-conditional quality), and on the label-interpolated set the share of
images predicted as one of their two source classes and the mean max-softmax, next to the same on
the real test set. Writes ``benchmarks/results/synthetic_quality.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from oodforge.data.benchmarks import get_benchmark
from oodforge.data.datasets import load_dataset
from oodforge.evaluation.extraction import compute_outputs
from oodforge.models.classifier import load_classifier
from oodforge.util.atomic import atomic_json, atomic_write

ROOT = Path(__file__).resolve().parents[1]


def judge(model_path: Path, real, synthetic_id, interpolated) -> dict:
    """Accuracy / confidence numbers of one classifier on the three sets."""
    model = load_classifier(model_path)
    row = {"model": str(model_path)}
    for name, images in (("real_test", real), ("synthetic_id", synthetic_id)):
        outputs = compute_outputs(model, images)
        probs = torch.softmax(outputs.logits, dim=1)
        row[f"{name}_accuracy"] = float((probs.argmax(1) == outputs.labels).float().mean())
        row[f"{name}_max_softmax"] = float(probs.max(1).values.mean())
    outputs = compute_outputs(model, interpolated)
    probs = torch.softmax(outputs.logits, dim=1)
    predicted = probs.argmax(1).numpy()
    pairs = interpolated.extra["pairs"]
    row["interp_predicted_as_a_source"] = float(np.mean((predicted == pairs[:, 0]) | (predicted == pairs[:, 1])))
    row["interp_max_softmax"] = float(probs.max(1).values.mean())
    return row


def markdown(rows: list[dict], manifests: dict) -> str:
    """The rows as a Markdown table, mean ± std over classifiers in the last line."""
    keys = ["real_test_accuracy", "synthetic_id_accuracy", "interp_predicted_as_a_source",
            "real_test_max_softmax", "synthetic_id_max_softmax", "interp_max_softmax"]
    lines = ["| classifier | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for row in rows:
        lines.append(f"| {row['model']} | " + " | ".join(f"{100 * row[k]:.2f}" for k in keys) + " |")
    lines.append("| mean ± std | " + " | ".join(
        f"{100 * np.mean([r[k] for r in rows]):.2f} ± {100 * np.std([r[k] for r in rows]):.2f}" for k in keys) + " |")
    sets = "\n".join(f"- {name}: {json.dumps(m)}" for name, m in manifests.items())
    return "\n".join(lines) + "\n\nGenerated sets (manifests without class names):\n" + sets + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", default="fashion_mnist", help="whose real test set the classifiers judge")
    parser.add_argument("--models", type=Path, nargs="+", required=True)
    parser.add_argument("--id-set", type=Path, required=True)
    parser.add_argument("--interp-set", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "synthetic_quality")
    args = parser.parse_args()
    real = get_benchmark(args.benchmark).id_set("test")
    synthetic_id = load_dataset(f"synthetic:{args.id_set}")
    interpolated = load_dataset(f"synthetic:{args.interp_set}")
    rows = [judge(path, real, synthetic_id, interpolated) for path in args.models]
    manifests = {}
    for path in (args.id_set, args.interp_set):
        manifest = json.loads((path / "manifest.json").read_text())
        manifest.pop("classes", None)
        manifests[str(path)] = manifest
    atomic_json({"rows": rows, "sets": manifests}, args.out.with_suffix(".json"))
    atomic_write(args.out.with_suffix(".md"), lambda tmp: tmp.write_text(markdown(rows, manifests)))
    print(markdown(rows, manifests))


if __name__ == "__main__":
    main()
