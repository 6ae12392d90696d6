"""The guard on real data: the public ResNet-20 on CIFAR-10 with energy, ViM and KNN (all 50,000 training images
as its bank), at alpha 0.01, 0.05 and 0.1.

Run: OODFORGE_DATA=... python benchmarks/guard_cifar10.py [--splits 20] [--out benchmarks/results/guard_cifar10]

1. Guarantee: over ``--splits`` random splits of the ID test set into 1,000 calibration and 9,000 test images, the
   false-alarm rate on the 9,000 (mean, spread, share of splits above alpha) and the share flagged on each OOD set.
2. Overhead: in one process, the bare network vs the guard (network + detector + p-value + decision, the exported
   graph's module), eager PyTorch float32 and ONNX Runtime, latency at batch 1 (median of 200 calls) and throughput
   at batch 256 (median of 15 calls), the calls of the two alternating so that load on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from oodforge.data.benchmarks import get_benchmark
from oodforge.deploy.export import GuardGraph, export_guard
from oodforge.deploy.guard import Guard
from oodforge.deploy.inputs import Preprocessing
from oodforge.detectors import create_detector
from oodforge.evaluation.cache import OutputCache
from oodforge.models.loading import load_model

ALPHAS = (0.01, 0.05, 0.1)
DETECTORS = ("energy", "vim", "knn")
CALIBRATION = 1000


def guarantee(guard: Guard, id_scores: torch.Tensor, ood_scores: dict[str, torch.Tensor], splits: int) -> dict:
    """False-alarm rates and flagged shares over random calibration/test splits of the ID test scores."""
    rng = np.random.default_rng(0)
    rows = {alpha: {"far": [], "ood": {name: [] for name in ood_scores}} for alpha in ALPHAS}
    for _ in range(splits):
        order = rng.permutation(len(id_scores))
        guard.calibrate((torch.zeros(CALIBRATION, 1), id_scores[order[:CALIBRATION]]))
        p_id = guard.p_values(id_scores[order[CALIBRATION:]])
        p_ood = {name: guard.p_values(s) for name, s in ood_scores.items()}
        for alpha in ALPHAS:
            rows[alpha]["far"].append(float((p_id <= alpha).double().mean()))
            for name, p in p_ood.items():
                rows[alpha]["ood"][name].append(float((p <= alpha).double().mean()))
    return {str(alpha): {"far_mean": float(np.mean(r["far"])), "far_sd": float(np.std(r["far"], ddof=1)),
                         "splits_above_alpha": float(np.mean(np.array(r["far"]) > alpha)),
                         "flagged": {n: float(np.mean(v)) for n, v in r["ood"].items()}} for alpha, r in rows.items()}


def paired_median(first, second, x: torch.Tensor, calls: int) -> tuple[float, float]:
    """Median seconds of ``first(x)`` and ``second(x)``, called alternately ``calls`` times after warm-up."""
    for _ in range(3):
        first(x), second(x)
    times = ([], [])
    for _ in range(calls):
        for i, fn in enumerate((first, second)):
            tic = time.perf_counter()
            fn(x)
            times[i].append(time.perf_counter() - tic)
    return statistics.median(times[0]), statistics.median(times[1])


class Bare(torch.nn.Module):
    """The network alone: logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.logits(x)


def timing_row(b1: float, g1: float, b256: float, g256: float) -> dict:
    """Milliseconds at batch 1, images per second at batch 256, and guard/bare ratios of time."""
    return {"bare_batch1_ms": 1e3 * b1, "guard_batch1_ms": 1e3 * g1, "ratio_batch1": g1 / b1,
            "bare_batch256_img_s": 256 / b256, "guard_batch256_img_s": 256 / g256, "ratio_batch256": g256 / b256}


def overhead(guard: Guard, folder: Path) -> dict:
    """Bare network vs guard, eager and ONNX Runtime, batch 1 latency and batch 256 throughput."""
    import onnxruntime

    bare, graph = Bare(guard.model).eval(), GuardGraph(guard).eval()
    x1, x256 = torch.rand(1, 3, 32, 32), torch.rand(256, 3, 32, 32)
    out = {}
    with torch.inference_mode():
        b1, g1 = paired_median(bare, graph, x1, 200)
        b256, g256 = paired_median(bare, graph, x256, 15)
    out["eager"] = timing_row(b1, g1, b256, g256)
    export_guard(guard, folder, "onnx")
    torch.onnx.export(bare, (x1,), dynamo=True, input_names=["input"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},)).save(str(folder / "bare.onnx"))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    sessions = [onnxruntime.InferenceSession(str(folder / name), options, providers=["CPUExecutionProvider"])
                for name in ("bare.onnx", "guard.onnx")]
    runs = [lambda x, s=s: s.run(None, {"input": x}) for s in sessions]
    b1, g1 = paired_median(runs[0], runs[1], x1.numpy(), 200)
    b256, g256 = paired_median(runs[0], runs[1], x256.numpy(), 15)
    out["onnxruntime"] = timing_row(b1, g1, b256, g256)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--splits", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/guard_cifar10"))
    args = parser.parse_args()
    weights = Path(os.environ["OODFORGE_DATA"]) / "weights" / "resnet20-12fca82f.th"
    bench = get_benchmark("cifar10")
    model, _ = load_model("resnet20", weights, bench)
    cache = OutputCache()
    outputs = {name: cache.outputs(model, images, "cpu", 500, True, precision="32-true")
               for name, images in [("train", bench.id_set("train")), ("test", bench.id_set("test")),
                                    *[(n, bench.ood_set(n)) for n in bench.ood]]}
    test = bench.id_set("test")
    record = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"{torch.get_num_threads()} torch threads", "precision": "float32 (32-true)",
              "calibration": CALIBRATION, "splits": args.splits, "detectors": {}}
    scratch = tempfile.TemporaryDirectory()  # the exported files are timed, not kept
    folder = Path(scratch.name)
    for name in DETECTORS:
        detector = create_detector(name)._ready(outputs["train"], model)
        guard = Guard(model, detector, classes=test.classes, preprocessing=Preprocessing(bench.image_shape))
        scores = {n: detector.score_outputs(o) for n, o in outputs.items() if n != "train"}
        entry = {"guarantee": guarantee(guard, scores.pop("test"), scores, args.splits)}
        guard.calibrate((outputs["test"].logits[:CALIBRATION], detector.score_outputs(outputs["test"])[:CALIBRATION]))
        entry["overhead"] = overhead(guard, folder / name)
        record["detectors"][name] = entry
        print(name, json.dumps(entry, indent=1))
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    args.out.with_suffix(".md").write_text(markdown(record))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")


def markdown(record: dict) -> str:
    """The two tables of the docs page."""
    ood = list(next(iter(record["detectors"].values()))["guarantee"]["0.05"]["flagged"])
    lines = [f"Machine: {record['machine']}; {record['precision']}; {record['splits']} random splits of the CIFAR-10 "
             f"test set into {record['calibration']} calibration and "
             f"{10000 - record['calibration']} test images.", "",
             "| detector | alpha | false alarms (mean ± sd) | splits above alpha | " + " | ".join(ood) + " |",
             "|---|---|---|---|" + "---|" * len(ood)]
    for name, entry in record["detectors"].items():
        for alpha, row in entry["guarantee"].items():
            lines.append(f"| {name} | {alpha} | {100 * row['far_mean']:.2f}% ± {100 * row['far_sd']:.2f} | "
                         f"{100 * row['splits_above_alpha']:.0f}% | "
                         + " | ".join(f"{100 * row['flagged'][n]:.1f}%" for n in ood) + " |")
    lines += ["", "| detector | engine | bare batch 1 (ms) | guard batch 1 (ms) | ratio | bare batch 256 (img/s) | "
                  "guard batch 256 (img/s) | ratio |", "|---|---|---|---|---|---|---|---|"]
    for name, entry in record["detectors"].items():
        for engine, row in entry["overhead"].items():
            lines.append(f"| {name} | {engine} | {row['bare_batch1_ms']:.2f} | {row['guard_batch1_ms']:.2f} | "
                         f"{row['ratio_batch1']:.2f}x | {row['bare_batch256_img_s']:.0f} | "
                         f"{row['guard_batch256_img_s']:.0f} | {row['ratio_batch256']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
