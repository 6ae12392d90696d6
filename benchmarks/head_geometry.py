"""Where a trained cosine head's class weights sit relative to the features (ArcFace's degenerate solution).

    python benchmarks/head_geometry.py --models runs/heads_s{1,2}/{sphereface,cosface,arcface,adacos}/seed*/model.ckpt \
        --out benchmarks/results/cifar10_scratch_heads_geometry

For each checkpoint, on the benchmark's 1,000 ID validation images (held out of detector fitting, not of training),
float32: the mean cosine to the true class's weight, the mean largest cosine to another class, the share of images
whose margin target (the head's ``target_cosine``: cos - m for CosFace, cos(theta + m) or its fallback for ArcFace)
still beats every other class, accuracy, and for ArcFace the share in the fallback branch (theta_y + m > pi).
Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from oodforge.data.benchmarks import get_benchmark
from oodforge.evaluation.extraction import compute_outputs
from oodforge.models.classifier import CheckpointError, load_classifier
from oodforge.models.heads import ArcFace, CosineHead
from oodforge.util.atomic import atomic_json, atomic_write

KEYS = ["accuracy", "mean_cos_y", "mean_max_other_cos", "margin_met", "fallback_branch"]
RATES = {"accuracy", "margin_met", "fallback_branch"}  # shown in %


def geometry(model_path: Path, images) -> dict:
    """The geometry numbers of one cosine-head checkpoint on ``images``."""
    model = load_classifier(model_path).eval()
    head = model.head
    if not isinstance(head, CosineHead):
        raise ValueError(f"{model_path}: head {type(head).__name__} is not a cosine head")
    outputs = compute_outputs(model, images, precision="32-true")
    with torch.no_grad():
        cos = head.cosine(outputs.features.float())
        labels = outputs.labels.view(-1, 1)
        cos_y = cos.gather(1, labels)
        max_other = cos.scatter(1, labels, -2.0).max(1).values
        row = {"model": str(model_path), "head": type(head).__name__,
               "accuracy": float((cos.argmax(1) == labels.squeeze(1)).float().mean()),
               "mean_cos_y": float(cos_y.mean()), "mean_max_other_cos": float(max_other.mean()),
               "margin_met": float((head.target_cosine(cos_y).squeeze(1) > max_other).float().mean())}
        if isinstance(head, ArcFace) and not head.easy_margin:
            row["fallback_branch"] = float(head.in_fallback(cos_y).float().mean())
    return row


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table (rates in %, cosines as they are)."""
    lines = ["| checkpoint | head | " + " | ".join(KEYS) + " |", "|---|---|" + "---|" * len(KEYS)]
    for row in rows:
        cells = ["–" if k not in row else f"{100 * row[k]:.1f}" if k in RATES else f"{row[k]:.3f}" for k in KEYS]
        lines.append(f"| {row['model']} | {row['head']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", default="cifar10", help="whose ID validation images are used")
    parser.add_argument("--models", type=Path, nargs="+", required=True, help="cosine-head checkpoints")
    parser.add_argument("--out", type=Path, required=True, help="output prefix (.json and .md are added)")
    args = parser.parse_args()
    for path in args.models:
        if not path.is_file():
            parser.exit(2, f"error: --models {path}: no such file\n")
    _, images = get_benchmark(args.benchmark).split_train()
    try:
        rows = [geometry(path, images) for path in args.models]
    except (ValueError, CheckpointError) as exc:
        parser.exit(2, f"error: {exc}\n")
    atomic_json({"benchmark": args.benchmark, "images": len(images), "rows": rows}, args.out.with_suffix(".json"))
    atomic_write(args.out.with_suffix(".md"), lambda tmp: tmp.write_text(markdown(rows)))
    print(markdown(rows))


if __name__ == "__main__":
    main()
