"""Without -> with outlier exposure, per run, as a Markdown table (the docs' second-set heads table).

    R=benchmarks/results; python benchmarks/oe_gain_table.py --with $R/cifar10_synthetic2_oe_summary.json \
        --without $R/cifar10_scratch_heads_summary.json $R/cifar10_scratch_summary.json \
        --picks $R/cifar10_synthetic2_per_run_pick.json

Each OE run ``<name>_oe`` is matched with the run ``<name>`` of the summaries without outliers (softmax with ``ce``).
The headline score is energy for softmax and the max cosine for the heads; the last column is the run's own
validation pick from ``best_pipeline.py``'s ``pick_per_run``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from oodforge.bench.jobs import pm_cell

# OE run -> (run without outliers, headline detector, its label); any other "<name>_oe": ("<name>", max cosine)
HEADLINE = {"softmax_oe": ("ce", "energy", "energy")}


def cell(row: dict, key: str, std: bool = True) -> str:
    """A percentage mean, as ``pm_cell`` (with ± std) when the row has several seeds and ``std``."""
    return pm_cell(row, key) if std and row["seeds"] > 1 else f"{100 * row[key + '_mean']:.2f}"


def rows(with_oe: list[dict], without: list[dict], picks: list[dict]) -> list[str]:
    """The Markdown lines: header, then one line per OE run that has a baseline."""
    oe = {(r["run"], r["detector"]): r for r in with_oe}
    base = {(r["run"], r["detector"]): r for r in without}
    pick = {r["run"]: r for r in picks}
    lines = ["| run | seeds | ID acc, without → with | score | near AUROC, without → with | near FPR95 | "
             "far AUROC, without → with | MSP near | own validation pick: near / FPR95 / far |", "|" + "---|" * 9]
    for run in dict.fromkeys(r["run"] for r in with_oe):
        baseline, detector, label = HEADLINE.get(run, (run.removesuffix("_oe"), "cosine", "max cosine"))
        if (baseline, detector) not in base or not {(run, detector), (run, "msp")} <= oe.keys() or run not in pick:
            continue
        r, w, p = oe[(run, detector)], base[(baseline, detector)], pick[run]
        lines.append(
            f"| {run.removesuffix('_oe')} | {r['seeds']} | {cell(w, 'id_accuracy')} → {cell(r, 'id_accuracy')} | "
            f"{label} | {cell(w, 'near_auroc')} → "
            f"**{cell(r, 'near_auroc')}** | {cell(r, 'near_fpr95')} | {cell(w, 'far_auroc')} → "
            f"{cell(r, 'far_auroc')} | "
            f"{cell(oe[(run, 'msp')], 'near_auroc')} | {p['detector'].replace('_', ' ')}: "
            f"{cell(p, 'near_auroc', False)} / {cell(p, 'near_fpr95', False)} / {cell(p, 'far_auroc', False)} |")
    return lines


def main() -> None:
    """Read the summaries and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--with", dest="with_oe", type=Path, required=True, help="summary.json of the OE runs")
    parser.add_argument("--without", type=Path, nargs="+", required=True, help="summary.json files without OE")
    parser.add_argument("--picks", type=Path, required=True, help="best_pipeline.py JSON with pick_per_run")
    args = parser.parse_args()
    try:
        with_oe = json.loads(args.with_oe.read_text())
        without = [row for path in args.without for row in json.loads(path.read_text())]
        picks = json.loads(args.picks.read_text())["pick_per_run"]
    except (OSError, ValueError, KeyError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print("\n".join(rows(with_oe, without, picks)))


if __name__ == "__main__":
    main()
