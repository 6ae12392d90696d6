"""KNN, Mahalanobis and ViM fitted and scored on memory-mapped ImageNet-sized outputs: time, peak memory, AUROC.

Run (full size, ~10.5 GB of features and 5 GB of logits written to --workdir):
    OMP_NUM_THREADS=1 python benchmarks/chunked_fit.py --rows 1280000 --dim 2048 --classes 1000 \
        --queries 10000 --workdir /tmp/oodforge-chunked --keep
Synthetic data: class means ~ N(0, 1) per unit, features = relu(mean[y] + noise), logits = features @ W.T + b
for a random linear head (W, b), written chunk by chunk with ``open_memmap`` (never whole in RAM). Each
detector then runs in a fresh subprocess that maps the arrays with ``np.load(mmap_mode="c")``, fits, and
scores ``--queries`` outputs (half drawn like the training data, half from unseen class means). Peak memory:
``ru_maxrss`` and ``VmHWM`` (both count the file-backed mapped pages it touched, which the kernel can reclaim)
and the peak of ``RssAnon`` (private memory only) sampled every 0.2 s. The data are written by a subprocess
too: a child's ``ru_maxrss`` starts at its parent's peak RSS, so the parent stays small.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap

DETECTOR_NAMES = ("knn", "mahalanobis", "vim")
WRITE_ROWS = 32768  # rows generated per chunk when writing the training arrays


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_280_000, help="training rows")
    parser.add_argument("--dim", type=int, default=2048, help="feature width")
    parser.add_argument("--classes", type=int, default=1000, help="ID classes (and head outputs)")
    parser.add_argument("--queries", type=int, default=10_000, help="scored outputs, half ID and half OOD")
    parser.add_argument("--noise", type=float, default=1.0, help="std of the per-unit noise around a class mean")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/oodforge-chunked"))
    parser.add_argument("--keep", action="store_true", help="keep (and reuse) the arrays in --workdir")
    parser.add_argument("--detectors", default=",".join(DETECTOR_NAMES), help="comma-separated subset")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every step")
    parser.add_argument("--knn-score-threads", type=int, default=None, help="threads of KNN scoring only")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/chunked_fit.json"))
    parser.add_argument("--worker", choices=("generate", *DETECTOR_NAMES), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def write_data(args: argparse.Namespace) -> dict:
    """Training features/logits/labels and query outputs as .npy files in ``args.workdir``; reused when
    ``meta.json`` there records the same sizes and seed."""
    import torch

    meta_path = args.workdir / "meta.json"
    wanted = {"rows": args.rows, "dim": args.dim, "classes": args.classes, "queries": args.queries,
              "noise": args.noise, "seed": args.seed}
    if meta_path.is_file() and {k: v for k, v in json.loads(meta_path.read_text()).items() if k in wanted} == wanted:
        return json.loads(meta_path.read_text())
    args.workdir.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    means = rng.standard_normal((args.classes, args.dim), dtype=np.float32)
    unseen = rng.standard_normal((args.classes, args.dim), dtype=np.float32)
    weight = rng.standard_normal((args.classes, args.dim), dtype=np.float32) / np.float32(np.sqrt(args.dim))
    weight = torch.from_numpy(weight)
    bias = torch.from_numpy(rng.standard_normal(args.classes, dtype=np.float32))
    np.save(args.workdir / "head_weight.npy", weight.numpy())
    np.save(args.workdir / "head_bias.npy", bias.numpy())
    labels = rng.integers(args.classes, size=args.rows)
    np.save(args.workdir / "labels.npy", labels)
    features = open_memmap(args.workdir / "features.npy", "w+", np.float32, (args.rows, args.dim))
    logits = open_memmap(args.workdir / "logits.npy", "w+", np.float32, (args.rows, args.classes))
    for start in range(0, args.rows, WRITE_ROWS):
        stop = min(start + WRITE_ROWS, args.rows)
        chunk = sample_features(rng, means, labels[start:stop], args.noise)
        features[start:stop] = chunk
        logits[start:stop] = (torch.from_numpy(chunk) @ weight.T + bias).numpy()
    features.flush()
    logits.flush()
    del features, logits
    half = args.queries // 2
    known = sample_features(rng, means, rng.integers(args.classes, size=half), args.noise)
    novel = sample_features(rng, unseen, rng.integers(args.classes, size=args.queries - half), args.noise)
    queries = np.concatenate([known, novel])
    np.save(args.workdir / "query_features.npy", queries)
    np.save(args.workdir / "query_logits.npy", (torch.from_numpy(queries) @ weight.T + bias).numpy())
    np.save(args.workdir / "query_is_id.npy", np.arange(args.queries) < half)
    meta = {**wanted, "generate_s": time.perf_counter() - tic,
            "features_gb": args.rows * args.dim * 4 / 1e9, "logits_gb": args.rows * args.classes * 4 / 1e9}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def sample_features(rng: np.random.Generator, means: np.ndarray, labels: np.ndarray, noise: float) -> np.ndarray:
    """relu(means[labels] + noise * N(0, 1)), float32."""
    chunk = rng.standard_normal((len(labels), means.shape[1]), dtype=np.float32)
    chunk *= noise
    chunk += means[labels]
    return np.maximum(chunk, 0.0, out=chunk)


class MemorySampler(threading.Thread):
    """Peak of RssAnon and VmRSS (bytes) from /proc/self/status, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = {"RssAnon": 0, "VmRSS": 0}
        self.stopped = threading.Event()

    def sample(self) -> dict[str, int]:
        values = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in self.peak:
                values[key] = int(rest.split()[0]) * 1024
                self.peak[key] = max(self.peak[key], values[key])
        return values

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.sample()


def run_worker(args: argparse.Namespace) -> dict:
    """Fit and score one detector on the mapped arrays; the numbers for the report."""
    import torch
    from sklearn.metrics import roc_auc_score
    from torch import nn

    from oodforge.detectors.base import ModelOutputs, create_detector

    torch.set_num_threads(args.threads)
    sampler = MemorySampler()
    sampler.start()
    folder = args.workdir
    train = ModelOutputs(
        torch.from_numpy(np.load(folder / "logits.npy", mmap_mode="c")),
        torch.from_numpy(np.load(folder / "features.npy", mmap_mode="c")),
        torch.from_numpy(np.load(folder / "labels.npy")),
    )
    queries = ModelOutputs(torch.from_numpy(np.load(folder / "query_logits.npy")),
                           torch.from_numpy(np.load(folder / "query_features.npy")))
    is_id = np.load(folder / "query_is_id.npy")
    model = nn.Module()
    model.head = nn.Linear(train.features.shape[1], train.logits.shape[1])
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(np.load(folder / "head_weight.npy")))
        model.head.bias.copy_(torch.from_numpy(np.load(folder / "head_bias.npy")))
    before = sampler.sample()
    detector = create_detector(args.worker)
    tic = time.perf_counter()
    with torch.no_grad():
        detector.fit(train, model)
    fit_s = time.perf_counter() - tic
    after_fit = {**sampler.sample(), "peak_rss_anon": sampler.peak["RssAnon"]}
    score_threads = args.knn_score_threads if args.worker == "knn" and args.knn_score_threads else args.threads
    torch.set_num_threads(score_threads)
    tic = time.perf_counter()
    with torch.no_grad():
        scores = detector.score_outputs(queries)
    score_s = time.perf_counter() - tic
    sampler.stopped.set()
    sampler.sample()
    gib = 2**30
    return {
        "detector": args.worker, "fit_s": round(fit_s, 2), "score_s": round(score_s, 2),
        "fit_threads": args.threads, "score_threads": score_threads,
        "auroc_id_vs_ood": float(roc_auc_score(is_id, scores.double().numpy())),
        "scores_finite": bool(torch.isfinite(scores).all()),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib,
        "vm_hwm_gib": status_bytes("VmHWM") / gib,
        "peak_rss_anon_gib": sampler.peak["RssAnon"] / gib,
        "peak_rss_anon_during_fit_gib": after_fit["peak_rss_anon"] / gib,
        "rss_anon_before_fit_gib": before["RssAnon"] / gib,
        "rss_anon_after_fit_gib": after_fit["RssAnon"] / gib,
    }


def status_bytes(key: str) -> int:
    """One memory line of /proc/self/status (e.g. VmHWM, the peak RSS of this process), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def machine() -> dict:
    """Cores, memory, threads and versions of this machine."""
    import torch

    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {
        "nproc": len(os.sched_getaffinity(0)), "cpu": cpu,
        "ram_gib": int(meminfo["MemTotal"].split()[0]) / 2**20,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
    }


def markdown(record: dict) -> str:
    """A short table of the per-detector numbers."""
    meta = record["data"]
    lines = [
        "# Chunked fit on memory-mapped outputs",
        "",
        f"{meta['rows']:,} x {meta['dim']} float32 features ({meta['features_gb']:.1f} GB) and "
        f"{meta['rows']:,} x {meta['classes']} logits ({meta['logits_gb']:.1f} GB), mapped with "
        f"`np.load(mmap_mode=\"c\")`; {meta['queries']:,} queries (half ID, half from unseen class means). "
        f"{record['machine']['nproc']} cores, {record['machine']['ram_gib']:.0f} GiB RAM, "
        f"{record['machine']['cpu']}.",
        "",
        f"Command: `{record['command']}`",
        "",
        "| detector | fit s | score s | threads (fit/score) | peak RSS GiB (VmHWM) | peak RssAnon GiB "
        "| AUROC ID vs OOD |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["detectors"].values():
        lines.append(
            f"| {r['detector']} | {r['fit_s']:.1f} | {r['score_s']:.1f} | {r['fit_threads']}/{r['score_threads']} | "
            f"{r['vm_hwm_gib']:.2f} | {r['peak_rss_anon_gib']:.2f} | {r['auroc_id_vs_ood']:.4f} |"
        )
    lines += [
        "",
        "Peak RSS (`VmHWM`; `ru_maxrss` is in the JSON) counts the file-backed pages of the mapped arrays that a "
        "detector read, which the kernel can drop at any time. RssAnon (sampled every 0.2 s) is the private memory "
        "the detector allocated.",
    ]
    return "\n".join(lines) + "\n"


def run_subprocess(args: argparse.Namespace, worker: str, options: list) -> dict:
    """Run this script as ``--worker worker`` in a fresh process; the JSON it prints last."""
    command = [sys.executable, __file__, "--worker", worker, "--workdir", str(args.workdir), *map(str, options)]
    finished = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(finished.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(write_data(args) if args.worker == "generate" else run_worker(args)), flush=True)
        return
    sizes = ["--rows", args.rows, "--dim", args.dim, "--classes", args.classes, "--queries", args.queries,
             "--noise", args.noise, "--seed", args.seed]
    meta = run_subprocess(args, "generate", sizes)
    print(f"data ready in {args.workdir}: {json.dumps(meta)}", flush=True)
    results = {}
    for name in args.detectors.split(","):
        extra = ["--knn-score-threads", args.knn_score_threads] if args.knn_score_threads else []
        results[name] = run_subprocess(args, name, ["--threads", args.threads, *extra])
        print(json.dumps(results[name]), flush=True)
    record = {
        "command": " ".join(["OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", ""), "python", *sys.argv]),
        "machine": machine(), "data": meta, "detectors": results,
        "notes": "each detector fit and scored in a fresh subprocess with default options; the training "
                 "arrays were np.load(mmap_mode='c') memory maps",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(record))
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
