"""Streaming evidence: score a generated folder of 20,000 512x512 JPEGs (``image_size: 64``, torchvision ResNet-18).

1. Writes the folder (10 class folders of smooth random images) plus small ID train/test folders.
2. Runs ``oodforge score --benchmark stream.yaml --model torchvision:resnet18`` in a subprocess with an
   empty cache and samples the resident memory of its whole process tree (main process + DataLoader
   workers) every 0.2 s.
3. Times oodforge's extraction of the big folder (streamed, outputs written in chunks) against a bare
   ``DataLoader(ImageFolder) + forward`` loop with the same transform, batch size and workers.

    OMP_NUM_THREADS=2 python benchmarks/streaming_folder.py --workdir /tmp/oodforge-stream

Writes ``benchmarks/results/streaming_folder.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results"


def write_images(job: tuple[Path, int, int, int]) -> None:
    """Write ``count`` smooth random JPEGs of ``size`` x ``size`` into ``folder`` (seeded by ``seed``)."""
    folder, count, size, seed = job
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        if (folder / f"{i:05d}.jpg").exists():
            continue
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
        image.save(folder / f"{i:05d}.jpg", quality=90)


def make_folders(workdir: Path, count: int, size: int, classes: int = 10) -> None:
    """The big OOD folder and small ID train/test folders, written by two processes."""
    jobs = [(workdir / "big" / f"c{c}", count // classes, size, c) for c in range(classes)]
    jobs += [(workdir / "id" / split / f"c{c}", n, size, 1000 * (s + 1) + c)
             for s, (split, n) in enumerate((("train", 100), ("test", 50))) for c in range(classes)]
    with multiprocessing.Pool(2) as pool:
        pool.map(write_images, jobs)


def tree_rss(pid: int) -> tuple[int, int]:
    """(sum of VmRSS over ``pid`` and its descendants, largest single VmRSS), in bytes."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {pid}, [pid]
    while frontier:
        current = frontier.pop()
        children = [p for p, parent in parents.items() if parent == current and p not in tree]
        tree.update(children)
        frontier.extend(children)
    sizes = []
    for member in tree:
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    sizes.append(int(line.split()[1]) * 1024)
        except OSError:
            continue
    return sum(sizes), max(sizes, default=0)


def score_run(workdir: Path, config: Path) -> dict:
    """Run ``oodforge score`` on the streamed benchmark; peak memory of its process tree and wall time."""
    cache = workdir / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    command = [sys.executable, "-m", "oodforge", "score", "--benchmark", str(config), "--model",
               "torchvision:resnet18", "--detectors", "msp,energy,knn,mahalanobis,vim", "--out",
               str(workdir / "run"), "--quiet"]
    env = {**os.environ, "OODFORGE_CACHE": str(cache)}
    tic = time.perf_counter()
    process = subprocess.Popen(command, env=env)
    peak_sum = peak_single = 0
    while process.poll() is None:
        total, single = tree_rss(process.pid)
        peak_sum, peak_single = max(peak_sum, total), max(peak_single, single)
        time.sleep(0.2)
    if process.returncode != 0:
        raise SystemExit(f"oodforge score failed with exit code {process.returncode}")
    results = json.loads((workdir / "run" / "results.json").read_text())
    return {"command": " ".join(command[1:]), "wall_s": time.perf_counter() - tic,
            "peak_rss_tree_gib": peak_sum / 2**30, "peak_rss_largest_process_gib": peak_single / 2**30,
            "timings": results["timings"], "rows": len(results["results"])}


def throughput(workdir: Path, image_size: int, batch_size: int, repeats: int) -> dict:
    """Seconds for oodforge's streamed extraction vs a bare DataLoader + forward loop over the big folder."""
    import torch
    import torchvision
    from torchvision import transforms as T

    import oodforge
    from oodforge.data.datasets import load_dataset
    from oodforge.evaluation.cache import OutputCache
    from oodforge.evaluation.extraction import loader_workers

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    net = torchvision.models.resnet18(num_classes=10).eval()
    images = load_dataset(f"folder:{workdir / 'big'}", streaming="always", image_shape=(image_size, image_size, 3),
                          resize="shorter_crop")
    workers = loader_workers(images)
    transform = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor(), T.Normalize(mean, std)])
    loader = torch.utils.data.DataLoader(torchvision.datasets.ImageFolder(str(workdir / "big"), transform),
                                         batch_size=batch_size, num_workers=workers)

    def bare() -> float:
        tic = time.perf_counter()
        with torch.inference_mode():
            for x, _ in loader:
                net(x)
        return time.perf_counter() - tic

    def ours() -> float:
        folder = workdir / "throughput-cache"
        shutil.rmtree(folder, ignore_errors=True)
        model = oodforge.wrap_model(net, mean=mean, std=std)
        tic = time.perf_counter()
        OutputCache(folder).outputs(model, images, batch_size=batch_size)
        return time.perf_counter() - tic

    times: dict[str, list[float]] = {"bare_s": [], "oodforge_s": []}
    for _ in range(repeats):  # alternate, so both see the same page cache and machine state
        times["bare_s"].append(bare())
        times["oodforge_s"].append(ours())
    best = {k: min(v) for k, v in times.items()}
    return {"images": len(images), "workers": workers, "batch_size": batch_size, "runs": times, **best,
            "ratio_oodforge_over_bare": best["oodforge_s"] / best["bare_s"],
            "images_per_s_oodforge": len(images) / best["oodforge_s"],
            "images_per_s_bare": len(images) / best["bare_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/oodforge-stream"))
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="Keep the generated folders.")
    parser.add_argument("--skip-score", action="store_true",
                        help="Keep the recorded 'score' part (peak memory) and time the throughput again.")
    args = parser.parse_args()
    tic = time.perf_counter()
    make_folders(args.workdir, args.count, args.size)
    generate_s = time.perf_counter() - tic
    config = args.workdir / "stream.yaml"
    config.write_text(json.dumps({
        "name": "streamed", "id": {"train": f"folder:{args.workdir / 'id' / 'train'}",
                                   "test": f"folder:{args.workdir / 'id' / 'test'}"},
        "ood": {"big": {"data": f"folder:{args.workdir / 'big'}", "group": "far"}},
        "image_size": args.image_size, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "streaming": "always"}))  # auto would decode these 20k images at 64x64 into memory (235 MiB)
    file_bytes = sum(p.stat().st_size for p in (args.workdir / "big").rglob("*.jpg"))
    record = {"machine": {"cpus": os.cpu_count(), "omp_threads": os.environ.get("OMP_NUM_THREADS")},
              "folder": {"images": args.count, "size": args.size, "jpeg_bytes": file_bytes,
                         "decoded_uint8_gib": args.count * args.size * args.size * 3 / 2**30,
                         "generate_s": generate_s},
              "score": (json.loads((RESULTS / "streaming_folder.json").read_text())["score"] if args.skip_score
                        else score_run(args.workdir, config)),
              "throughput": throughput(args.workdir, args.image_size, args.batch_size, args.repeats),
              "command": " ".join(sys.argv)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "streaming_folder.json").write_text(json.dumps(record, indent=2) + "\n")
    score, speed = record["score"], record["throughput"]
    (RESULTS / "streaming_folder.md").write_text(
        f"# Streaming a folder of {args.count} JPEGs of {args.size}x{args.size} (image_size {args.image_size})\n\n"
        f"`{record['command']}` on {os.cpu_count()} CPU cores, float32, torchvision ResNet-18 (random init).\n\n"
        f"| measure | value |\n|---|---|\n"
        f"| decoding everything into memory would take | {record['folder']['decoded_uint8_gib']:.1f} GiB |\n"
        f"| `oodforge score` peak RSS, whole process tree | {score['peak_rss_tree_gib']:.2f} GiB |\n"
        f"| `oodforge score` peak RSS, largest process | {score['peak_rss_largest_process_gib']:.2f} GiB |\n"
        f"| `oodforge score` wall time | {score['wall_s']:.1f} s |\n"
        f"| extraction, oodforge (streamed, chunked cache) | {speed['oodforge_s']:.1f} s "
        f"({speed['images_per_s_oodforge']:.0f} images/s) |\n"
        f"| bare DataLoader(ImageFolder) + forward | {speed['bare_s']:.1f} s "
        f"({speed['images_per_s_bare']:.0f} images/s) |\n"
        f"| ratio oodforge / bare | {speed['ratio_oodforge_over_bare']:.2f} |\n")
    print(json.dumps(record, indent=2))
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
