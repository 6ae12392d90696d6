"""Train the 28x28 diffusion preset on Fashion-MNIST and sample ID + label-interpolated sets (CPU).

    python benchmarks/diffusion_fmnist.py train
    python benchmarks/diffusion_fmnist.py sample-id --per-class 600
    python benchmarks/diffusion_fmnist.py sample-interp --n 6000
    python benchmarks/diffusion_fmnist.py sweep        # alpha from 1 to 0 for a few class pairs

Wall times are appended to ``<run>/timings.jsonl``; a killed ``train`` resumes from its checkpoint.
OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE``): on 2 cores shared with other jobs the
default busy-waiting made sampling 3x and training even slower.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: busy-waiting threads starve on shared cores

import numpy as np
import torch
import torchvision

from oodforge.data.imageset import ImageSet
from oodforge.data.synthetic import SyntheticSet, sample_grid, write_synthetic
from oodforge.generate.diffusion import (
    CHECKPOINT_NAME,
    interpolate_embeddings,
    load_generator,
    preset_for,
    sample_embeddings,
    sample_id,
    sample_interpolated,
    train_diffusion,
)

SWEEP_PAIRS = [(0, 1), (0, 8), (1, 3), (2, 4), (3, 5), (5, 7), (7, 9), (8, 9)]

ROOT = Path(__file__).resolve().parents[1]


def fashion_mnist(root: str, limit: int | None) -> ImageSet:
    """Fashion-MNIST train as an ``ImageSet`` (first ``limit`` images if given)."""
    data = torchvision.datasets.FashionMNIST(root, train=True, download=False)
    images = data.data.numpy()[..., None][:limit]
    labels = data.targets.numpy().astype(np.int64)[:limit]
    return ImageSet("fashion_mnist", images, labels, list(data.classes))


def record(run: Path, entry: dict) -> None:
    """Append ``entry`` to ``run/timings.jsonl`` and print it."""
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "timings.jsonl", "a") as handle:
        handle.write(json.dumps(entry) + "\n")
    print(json.dumps(entry))


def train(args: argparse.Namespace) -> None:
    images = fashion_mnist(args.data, args.limit)
    config = preset_for(28, 1, 10)
    if args.epochs:
        config = replace(config, epochs=args.epochs)
    start = time.perf_counter()
    path = train_diffusion(images, config, args.run, resume=True, quiet=args.quiet,
                           checkpoint_every=args.checkpoint_every)
    history = torch.load(path, weights_only=True)["history"]
    seconds = round(time.perf_counter() - start, 1)
    record(args.run, {"command": "train", "seconds": seconds, "images": len(images), "config": asdict(config),
                      "history": history})


def sample(args: argparse.Namespace) -> None:
    generator = load_generator(args.run / CHECKPOINT_NAME)
    start = time.perf_counter()
    if args.command == "sample-id":
        images = sample_id(generator, per_class=args.per_class, seed=args.seed, guidance=args.guidance,
                           steps=args.steps, batch_size=args.batch_size, quiet=args.quiet)
    else:
        images = sample_interpolated(generator, n=args.n, alpha_range=tuple(args.alpha_range), seed=args.seed,
                                     guidance=args.guidance, steps=args.steps, batch_size=args.batch_size,
                                     quiet=args.quiet)
    seconds = time.perf_counter() - start
    write_synthetic(args.out, images, images.manifest, images.extra)
    record(args.run, {"command": args.command, "seconds": round(seconds, 1), "count": len(images),
                      "out": str(args.out), "manifest": images.manifest})


def sweep(args: argparse.Namespace) -> None:
    """One row per class pair, one column per alpha (1 -> 0), the same starting noise along a row."""
    generator = load_generator(args.run / CHECKPOINT_NAME)
    table = generator.model.label_embedding.weight
    first, second = (torch.tensor(side) for side in zip(*SWEEP_PAIRS, strict=True))
    start, images, alphas = time.perf_counter(), [], np.linspace(1.0, 0.0, 9)
    for alpha in alphas:
        with torch.no_grad():
            vectors = interpolate_embeddings(table, first, second, float(alpha))
        images.append(sample_embeddings(generator, vectors, seed=args.seed, guidance=args.guidance,
                                        steps=args.steps, quiet=True))
    count = len(alphas) * len(SWEEP_PAIRS)
    pairs = np.tile(np.array(SWEEP_PAIRS), (len(alphas), 1))
    swept = SyntheticSet("sweep", np.concatenate(images), np.full(count, -1), generator.classes,
                         extra={"pairs": pairs, "alphas": np.repeat(alphas, len(SWEEP_PAIRS))})
    out = args.out or ROOT / "runs" / "synthetic" / "fmnist-sweep.png"
    sample_grid(swept, out, columns=len(alphas), max_rows=len(SWEEP_PAIRS))
    record(args.run, {"command": "sweep", "seconds": round(time.perf_counter() - start, 1), "out": str(out),
                      "steps": args.steps, "guidance": args.guidance, "seed": args.seed})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["train", "sample-id", "sample-interp", "sweep"])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "diffusion-fmnist")
    parser.add_argument("--data", default=os.environ.get("OODFORGE_DATA", "data"))
    parser.add_argument("--limit", type=int, default=None, help="train on the first LIMIT images")
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--per-class", type=int, default=600)
    parser.add_argument("--n", type=int, default=6000)
    parser.add_argument("--alpha-range", type=float, nargs=2, default=(0.3, 0.7))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint-every", type=int, default=100, help="steps between mid-epoch checkpoints")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.command in ("train", "sweep"):
        {"train": train, "sweep": sweep}[args.command](args)
        return
    kind = "fmnist-id" if args.command == "sample-id" else "fmnist-interp"
    args.out = args.out or ROOT / "runs" / "synthetic" / kind
    sample(args)


if __name__ == "__main__":
    main()
