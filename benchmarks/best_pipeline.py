"""Pick the best pipeline (run x detector) over several bench outputs on validation data only.

Usage (CIFAR-10 from scratch):

    python benchmarks/best_pipeline.py benchmarks/results/cifar10_scratch_results.json \
        benchmarks/results/cifar10_scratch_losses_results.json ... --out benchmarks/results/cifar10_best_pipeline

The rule is the bench's (``oodforge.bench.jobs.best_on_validation``): the highest mean validation AUROC over the
validation sets common to every run, or over ``--validation-set`` only. Test numbers of the pick are reported
next to the target (near AUROC, near FPR95, ID accuracy); each run's own pick by the same rule (to compare runs, such
as heads against softmax, each with the detector a user would choose without test data) follows; the best test row is
shown only for reference.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from oodforge.bench.jobs import (
    load_payloads,
    merge_payloads,
    payload_validation_sets,
    pm_cell,
    rank_on_validation,
    summarize,
)
from oodforge.util.atomic import atomic_json, atomic_write


def meets(row: dict, near_auroc: float, near_fpr95: float, accuracy: float) -> bool:
    """Whether a summary row's means reach the target."""
    return (row["near_auroc_mean"] >= near_auroc and row["near_fpr95_mean"] <= near_fpr95
            and row["id_accuracy_mean"] >= accuracy)


def pick_per_run(ranked: list[dict]) -> list[dict]:
    """The first row of each run in a validation ranking: every run's own validation pick, best run first."""
    picks: dict[str, dict] = {}
    for row in ranked:
        picks.setdefault(row["run"], row)
    return list(picks.values())


def table(rows: list[dict]) -> list[str]:
    """Markdown rows: run, detector, seeds, validation AUROC and the test metrics."""
    lines = ["| run | detector | seeds | val AUROC | near AUROC | near FPR95 | far AUROC | ID acc |", "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['run']} | {r['detector']} | {r['seeds']} | {pm_cell(r, 'val_auroc')} | "
                     f"{pm_cell(r, 'near_auroc')} | {pm_cell(r, 'near_fpr95')} | {pm_cell(r, 'far_auroc')} | "
                     f"{pm_cell(r, 'id_accuracy')} |")
    return lines


def main() -> None:
    """Parse the arguments, merge the payloads, rank on validation and write JSON + Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="bench results.json files (same benchmark)")
    parser.add_argument("--validation-set", action="append", default=None, help="rank on this set only")
    parser.add_argument("--min-seeds", type=int, default=1, help="leave out runs with fewer seeds")
    parser.add_argument("--min-accuracy", type=float, default=0.0,
                        help="leave out runs below this mean ID accuracy (the target's accuracy floor)")
    parser.add_argument("--target", default="0.87,0.317,0.85", help="near AUROC, near FPR95, ID accuracy")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True, help="output prefix (.json and .md are added)")
    args = parser.parse_args()
    try:
        target = [float(v) for v in args.target.split(",")]
    except ValueError:
        target = []
    if len(target) != 3:
        parser.exit(2, f"error: --target {args.target!r}: three numbers expected (near AUROC, near FPR95, "
                       "ID accuracy)\n")
    try:
        payload = merge_payloads(load_payloads(args.results))
        summary = [r for r in summarize(payload, args.validation_set) if r["seeds"] >= args.min_seeds
                   and r["id_accuracy_mean"] >= args.min_accuracy]
    except (ValueError, KeyError) as exc:
        parser.exit(2, f"error: {exc}\n")
    ranked = rank_on_validation(summary)
    top, per_run = ranked[:args.top], pick_per_run(ranked)
    if not top:
        parser.exit(2, "error: no run x detector with a validation AUROC passes --min-seeds / --min-accuracy\n")
    sets = args.validation_set or payload_validation_sets(payload)
    pick = top[0]
    best_test = max(summary, key=lambda r: r["near_auroc_mean"])
    result = {"inputs": [str(p) for p in args.results], "validation_sets": sets, "min_seeds": args.min_seeds,
              "min_accuracy": args.min_accuracy,
              "target": dict(zip(["near_auroc", "near_fpr95", "id_accuracy"], target, strict=True)),
              "pick": pick, "pick_meets_target": meets(pick, *target), "ranked": top, "pick_per_run": per_run,
              "best_test_near_auroc_for_reference": best_test,
              "rows_meeting_target_on_test": [r for r in summary if meets(r, *target)]}
    inputs = ", ".join(p.name for p in args.results)
    lines = [f"Ranked on validation data only (mean AUROC over {', '.join(sets)}; runs with >= {args.min_seeds} "
             f"seeds and >= {100 * args.min_accuracy:g}% ID accuracy; inputs: {inputs}).", ""] + table(top)
    lines += ["", f"Pick: **{pick['run']} + {pick['detector']}**; target (near AUROC >= {100 * target[0]:g}, near "
                  f"FPR95 <= {100 * target[1]:g}, ID acc >= {100 * target[2]:g}): "
                  f"**{'met' if result['pick_meets_target'] else 'not met'}**.",
              "", "Each run's own pick (same rule, validation only)", ""] + table(per_run)
    lines += ["", "For reference only (chosen on test data): best near AUROC", ""] + table([best_test])
    lines += ["", f"Rows meeting the whole target on test data: {len(result['rows_meeting_target_on_test'])}."]
    atomic_json(result, args.out.with_suffix(".json"))
    atomic_write(args.out.with_suffix(".md"), lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
