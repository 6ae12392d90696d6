"""Leaderboard of every detector, defaults and tuned, ranked by near-OOD AUROC, with the validation AUROC beside it.

    # the public ResNet-20, every detector, defaults and tuned on validation data
    oodforge score --benchmark cifar10 --model resnet20 --weights $OODFORGE_DATA/weights/resnet20-12fca82f.th \\
        --detectors all --tune --out runs/r20-all
    # ResNet-20 trained from scratch with cross-entropy, 3 seeds (benchmarks/configs/cifar10_scratch.yaml)
    oodforge bench benchmarks/configs/cifar10_scratch.yaml --runs ce --out runs/cifar10_scratch
    python benchmarks/leaderboard.py benchmarks/results/cifar10_leaderboard runs/r20-all/results.json \\
        [runs/cifar10_scratch/summary.json]

Writes ``<prefix>.md`` (one table per model, ranked by near AUROC; AUROC and FPR95 in %, mean ± sd over seeds for
the scratch models) and ``<prefix>.json`` (the same rows).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def pretrained_rows(payload: dict) -> list[dict]:
    """One row per detector label (``[tuned]`` variants included) of a ``score --tune`` results.json."""
    rows, validation = payload["results"], payload.get("tuning", {}).get("validation_auroc", {})
    out = []
    for label in dict.fromkeys(r["detector"] for r in rows):
        mine = [r for r in rows if r["detector"] == label]
        near = [r["auroc"] for r in mine if r["group"] == "near"]
        far = [r["auroc"] for r in mine if r["group"] == "far"]
        out.append({"model": "pretrained ResNet-20", "detector": label, "seeds": 1,
                    "near_auroc": float(np.mean(near)), "near_auroc_sd": None,
                    "far_auroc": float(np.mean(far)), "far_auroc_sd": None,
                    "fpr95": float(np.mean([r["fpr95"] for r in mine])), "fpr95_sd": None,
                    "val_auroc": validation.get(label, {}).get("mean"), "id_accuracy": payload["id_accuracy"]})
    return out


def scratch_rows(summary: list[dict], run: str) -> list[dict]:
    """One row per detector label of a bench summary's ``run``."""
    return [{"model": f"ResNet-20 from scratch ({run}, {row['seeds']} seeds)", "detector": row["detector"],
             "seeds": row["seeds"], "near_auroc": row["near_auroc_mean"], "near_auroc_sd": row["near_auroc_std"],
             "far_auroc": row["far_auroc_mean"], "far_auroc_sd": row["far_auroc_std"], "fpr95": row["fpr95_mean"],
             "fpr95_sd": row["fpr95_std"], "val_auroc": row.get("val_auroc_mean"),
             "id_accuracy": row["id_accuracy_mean"]} for row in summary if row["run"] == run]


def cell(value: float | None, sd: float | None = None) -> str:
    if value is None or not np.isfinite(value):
        return "–"
    return f"{100 * value:.2f}" + (f" ± {100 * sd:.2f}" if sd is not None and np.isfinite(sd) else "")


def table(rows: list[dict]) -> list[str]:
    ranked = sorted(rows, key=lambda r: -r["near_auroc"] if np.isfinite(r["near_auroc"]) else np.inf)
    lines = ["| rank | detector | near AUROC | far AUROC | FPR95 | val AUROC |", "|---:|---|---|---|---|---|"]
    for rank, row in enumerate(ranked, 1):
        lines.append(f"| {rank} | {row['detector']} | {cell(row['near_auroc'], row['near_auroc_sd'])} | "
                     f"{cell(row['far_auroc'], row['far_auroc_sd'])} | {cell(row['fpr95'], row['fpr95_sd'])} | "
                     f"{cell(row['val_auroc'])} |")
    return lines


def main() -> None:
    prefix, pretrained = Path(sys.argv[1]), Path(sys.argv[2])
    summary = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    rows = pretrained_rows(json.loads(pretrained.read_text()))
    if summary is not None:
        rows += scratch_rows(json.loads(summary.read_text()), "ce")
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        lines += [f"**{model}**, ID accuracy {100 * mine[0]['id_accuracy']:.2f}%", "", *table(mine), ""]
    prefix.with_suffix(".md").write_text("\n".join(lines))
    sources = [str(pretrained)] + ([str(summary)] if summary is not None else [])
    prefix.with_suffix(".json").write_text(json.dumps({"sources": sources, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
