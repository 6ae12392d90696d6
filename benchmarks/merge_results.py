"""Merge bench outputs of the same benchmark (e.g. seed 0 from one call, seeds 1-2 from others) into one summary.

Usage (the cosine heads: seed 0 was scored in an earlier session, seeds 1 and 2 in two parallel calls):

    python benchmarks/merge_results.py benchmarks/results/cifar10_scratch_heads_results.json \
        runs/heads_s1/results.json runs/heads_s2/results.json --out benchmarks/results/cifar10_scratch_heads

writes ``<out>_results.json``, ``<out>_results.md``, ``<out>_summary.json`` and ``<out>_summary.md``, the files a
single ``oodforge bench`` call over all seeds writes as results.json / results.md / summary.json / summary.md
(``oodforge.bench.jobs.merge_payloads`` + ``summarize``; a method found in two inputs must have the same results).
An input may be the results.json of a bench of one run and one seed, which keeps its method's block at the top level.
Every input is read and checked before anything is written.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from oodforge.bench.jobs import load_payloads, merge_payloads, summarize, summary_markdown
from oodforge.runs.payload import results_markdown
from oodforge.util.atomic import atomic_write


def merged_outputs(payloads: list[dict], names: list[str]) -> dict[str, str]:
    """Suffix -> file text of the merged results and summary (JSON + Markdown)."""
    payload = merge_payloads(payloads)
    payload.pop("bench_config", None)  # each input ran its own part of the config: keep them all below
    payload["merged_from"] = [{"file": name, "bench_config": p.get("bench_config")}
                              for name, p in zip(names, payloads, strict=True)]
    summary = summarize(payload)
    return {"_results.json": json.dumps(payload, indent=2) + "\n", "_results.md": results_markdown(payload),
            "_summary.json": json.dumps(summary, indent=2) + "\n", "_summary.md": summary_markdown(summary, payload)}


def main() -> None:
    """Parse the arguments, merge, write the four files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="bench results.json files (same benchmark)")
    parser.add_argument("--out", type=Path, required=True, help="output prefix (_results.json etc. are added)")
    args = parser.parse_args()
    if not args.out.parent.is_dir():
        parser.exit(2, f"error: --out {args.out}: folder {args.out.parent} does not exist\n")
    try:
        texts = merged_outputs(load_payloads(args.results), [str(p) for p in args.results])
    except (ValueError, KeyError) as exc:
        parser.exit(2, f"error: {exc}\n")
    for suffix, text in texts.items():
        path = args.out.with_name(args.out.name + suffix)
        atomic_write(path, lambda tmp, text=text: tmp.write_text(text))
        print(path)


if __name__ == "__main__":
    main()
