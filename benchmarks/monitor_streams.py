"""The drift monitor on real streams: the public ResNet-20 with the energy detector as a guard at alpha 0.05,
calibrated on 1,000 random CIFAR-10 test images; the stream is the other 9,000 CIFAR-10 test images in random
order, then the 10,000 Tiny ImageNet validation images, then the 9,000 CIFAR-10 images again in a new order, fed
to a ``DriftMonitor`` (window 500 by default) in updates of 10, once with the plain window tests (p-values taken
as uniform) and once with the calibration-aware ones (``calibration_size=1000``).

Run: OODFORGE_DATA=... python benchmarks/monitor_streams.py [--seeds 20] [--window 500] [--page /tmp/monitor_page]

Per seed (a calibration draw and stream orders) it records:
- the share of CIFAR-10 windows without alarm: consecutive blocks of ``window`` images of the first CIFAR-10
  stretch, and of the second one from two windows after the switch back on, during which the alarm was never on;
- images from the switch to Tiny ImageNet until the alarm is on, and which test raised it;
- images from the switch back to CIFAR-10 until the alarm clears.
The guard scores each set once; the seeds redraw calibration and order. ``--page`` writes the monitor page of
seed 0's stream (plain tests). Results: benchmarks/results/monitor_streams.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from oodforge.data.benchmarks import get_benchmark
from oodforge.deploy.guard import Guard
from oodforge.deploy.inputs import Preprocessing
from oodforge.detectors import create_detector
from oodforge.evaluation.extraction import image_loader
from oodforge.models.loading import load_model
from oodforge.serve.monitor import DriftMonitor
from oodforge.serve.monitor_page import write_monitor_page

ALPHA = 0.05
CALIBRATION = 1000
CHUNK = 10


def scored_sets() -> tuple[Guard, torch.Tensor, torch.Tensor]:
    """The energy guard (not yet calibrated) and its scores of the CIFAR-10 test and Tiny ImageNet images."""
    benchmark = get_benchmark("cifar10")
    weights = Path(os.environ["OODFORGE_DATA"]) / "weights" / "resnet20-12fca82f.th"
    model, _ = load_model("resnet20", weights, benchmark)
    test = benchmark.id_set("test")
    guard = Guard(model, create_detector("energy"), classes=test.classes, alpha=ALPHA,
                  preprocessing=Preprocessing(benchmark.image_shape, benchmark.resize))
    logits, cifar = guard.score_batches(image_loader(test, 500))
    guard.calibrate((logits[:CALIBRATION], cifar[:CALIBRATION]))  # replaced per seed
    _, tiny = guard.score_batches(image_loader(benchmark.ood_set("tiny_imagenet"), 500))
    return guard, cifar, tiny


def run_seed(guard: Guard, cifar: torch.Tensor, tiny: torch.Tensor, seed: int, window: int,
             calibration_size: int | None = None, log_path: Path | None = None) -> dict:
    """One calibration draw and stream: the monitor's measures."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(cifar))
    guard.calibrate((torch.zeros(CALIBRATION, 1), cifar[order[:CALIBRATION]]))
    rest = cifar[order[CALIBRATION:]]
    segments = [rest, tiny[rng.permutation(len(tiny))], rest[rng.permutation(len(rest))]]
    p = torch.cat([guard.p_values(s) for s in segments]).numpy()
    monitor = DriftMonitor(ALPHA, window=window, log_path=log_path, calibration_size=calibration_size)
    states = [monitor.update(part, part <= ALPHA) for part in np.array_split(p, len(p) // CHUNK)]
    switch, back, end = len(rest), len(rest) + len(tiny), len(p)
    quiet = blocks(states, 0, switch, window) + blocks(states, back + 2 * window, end, window)
    raised = next((s for s in states if s["seen"] > switch and s["alarm"]), None)
    on_at_back = next(s for s in states if s["seen"] >= back)["alarm"]
    cleared = next((s["seen"] for s in states if s["seen"] > back and not s["alarm"]), None)
    return {"seed": seed, "cifar_windows": len(quiet), "cifar_windows_without_alarm": 1 - float(np.mean(quiet)),
            "cifar_false_raises": count_raises(states, 0, switch) + count_raises(states, back + 2 * window, end),
            "flagged_cifar": float(np.mean(p[:switch] <= ALPHA)),
            "flagged_tiny": float(np.mean(p[switch:back] <= ALPHA)),
            "switch_to_alarm": None if raised is None else raised["seen"] - switch,
            "raised_by": None if raised is None else raised_by(raised, monitor),
            "on_at_switch_back": on_at_back, "switch_back_to_clear": None if cleared is None else cleared - back}


def blocks(states: list[dict], start: int, stop: int, size: int) -> list[bool]:
    """For each block of ``size`` images in [start, stop): whether the alarm was on after any update in it."""
    return [any(s["alarm"] for s in states if begin < s["seen"] <= begin + size)
            for begin in range(start, stop - size + 1, size)]


def count_raises(states: list[dict], start: int, stop: int) -> int:
    """Alarms raised at an update in (start, stop]."""
    return sum(b["alarms"] - a["alarms"] for a, b in zip(states, states[1:], strict=False)
               if start < b["seen"] <= stop)


def raised_by(state: dict, monitor: DriftMonitor) -> str:
    """Which window tests were below their level when the alarm was raised."""
    tests = [name for name, value, level in (("binomial", state["binomial_p"], monitor.significance),
                                             ("uniformity", state["uniformity_p"], monitor.uniformity))
             if value < level]
    return "+".join(tests)


def summary(rows: list[dict]) -> dict:
    """Mean, min and max of each measure over the seeds."""
    out = {}
    for key in ("cifar_windows_without_alarm", "cifar_false_raises", "flagged_cifar", "flagged_tiny",
                "switch_to_alarm", "switch_back_to_clear"):
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values)),
                    "missing": len(rows) - len(values)}
    out["raised_by"] = {name: sum(r["raised_by"] == name for r in rows) for name in
                        sorted({r["raised_by"] for r in rows if r["raised_by"]})}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--page", type=Path, default=None, help="Write seed 0's monitor page to this folder.")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/monitor_streams.json"))
    args = parser.parse_args()
    tic = time.perf_counter()
    guard, cifar, tiny = scored_sets()
    scoring_s = time.perf_counter() - tic
    rows = {}
    for variant, calibration_size in (("plain", None), ("calibration_aware", CALIBRATION)):
        rows[variant] = []
        for seed in range(args.seeds):
            log = None
            if seed == 0 and variant == "plain" and args.page is not None:
                args.page.mkdir(parents=True, exist_ok=True)
                log = args.page / "monitor.jsonl"
                log.unlink(missing_ok=True)
            rows[variant].append(run_seed(guard, cifar, tiny, seed, args.window, calibration_size, log))
            print(variant, json.dumps(rows[variant][-1]))
            if log is not None:
                records = [json.loads(line) for line in log.read_text().splitlines()]
                print("wrote", write_monitor_page(records, args.page, ALPHA))
    record = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"{torch.get_num_threads()} torch threads",
              "setup": {"model": "resnet20 (public weights)", "detector": "energy", "alpha": ALPHA,
                        "calibration": f"{CALIBRATION} random CIFAR-10 test images",
                        "stream": "9,000 other CIFAR-10 test images (random order), 10,000 Tiny ImageNet validation "
                                  "images (random order), the 9,000 CIFAR-10 images again (new order)",
                        "window": args.window, "update_size": CHUNK, "significance": 1e-3, "uniformity": 1e-3,
                        "clear_level": 0.05, "seeds": args.seeds},
              "scoring_s": round(scoring_s, 1), "summary": {k: summary(v) for k, v in rows.items()}, "seeds": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["summary"], indent=1))


if __name__ == "__main__":
    main()
