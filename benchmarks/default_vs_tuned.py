"""Table of every detector with default and tuned parameters, from the results.json of a ``--tune`` run.

    oodforge score --benchmark cifar10 --model resnet20 --weights $OODFORGE_DATA/weights/resnet20-12fca82f.th \\
        --detectors all --tune --out runs/r20-tuned
    python benchmarks/default_vs_tuned.py runs/r20-tuned/results.json benchmarks/results/cifar10_resnet20_tuned

Writes ``<prefix>.md`` (near/far AUROC and mean FPR95 %, default -> tuned, chosen values) and
``<prefix>.json`` (the same numbers, the validation sets and the timings).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def group_means(rows: list[dict], detector: str) -> dict[str, float]:
    """Mean near and far AUROC and mean FPR95 over the OOD sets of one detector row set."""
    mine = [r for r in rows if r["detector"] == detector]
    out = {g: float(np.mean([r["auroc"] for r in mine if r["group"] == g])) if any(r["group"] == g for r in mine)
           else float("nan") for g in ("near", "far")}
    out["fpr95"] = float(np.mean([r["fpr95"] for r in mine]))
    return out


def main() -> None:
    source, prefix = Path(sys.argv[1]), Path(sys.argv[2])
    payload = json.loads(source.read_text())
    rows, tuning = payload["results"], payload.get("tuning", {"detectors": {}, "validation": {}})
    labels = [d for d in dict.fromkeys(r["detector"] for r in rows) if not d.endswith("[tuned]")]
    table = []
    for label in labels:
        entry = {"detector": label, "default": group_means(rows, label),
                 "requires": payload["detectors"][label]["requires"]}
        if label in tuning["detectors"]:
            entry["tuned"] = group_means(rows, f"{label}[tuned]")
            entry["chosen"] = tuning["detectors"][label]["chosen"]
            entry["val_auroc"] = tuning["detectors"][label]["val_auroc"]
        table.append(entry)

    def cell(entry: dict, key: str) -> str:
        default = entry["default"][key]
        text = "–" if np.isnan(default) else f"{100 * default:.2f}"
        if "tuned" in entry and not np.isnan(entry["tuned"][key]):
            text += f" → {100 * entry['tuned'][key]:.2f}"
        return text

    lines = [f"ID accuracy {100 * payload['id_accuracy']:.2f}%; AUROC and FPR95 in %, default → tuned "
             f"(tuned on validation data only: {', '.join(tuning['validation'].get('ood', {}))}; "
             f"ID validation {tuning['validation'].get('id', '-')})", "",
             "| detector | needs | near AUROC | far AUROC | FPR95 | chosen |", "|---|---|---|---|---|---|"]
    for entry in table:
        chosen = ", ".join(f"{k}={v}" for k, v in entry.get("chosen", {}).items()) or "–"
        lines.append(f"| {entry['detector']} | {', '.join(entry['requires'])} | {cell(entry, 'near')} | "
                     f"{cell(entry, 'far')} | {cell(entry, 'fpr95')} | {chosen} |")
    prefix.with_suffix(".md").write_text("\n".join(lines) + "\n")
    prefix.with_suffix(".json").write_text(json.dumps({"source": str(source), "id_accuracy": payload["id_accuracy"],
                                                       "validation": tuning["validation"], "detectors": table,
                                                       "timings": payload.get("timings", {})}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
