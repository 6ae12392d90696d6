"""Load test of a served guard on localhost: the public ResNet-20 CIFAR-10 guard (energy, alpha 0.05) behind
(a) uvicorn with the guard, (b) the same server with ``--bare`` (the network alone), (c) Ray Serve with 2 replicas.

Run: OODFORGE_DATA=... python benchmarks/serve_load.py [--seconds 30] [--memory-minutes 10] [--guard /tmp/guard-r20]

Each server is a subprocess (``oodforge serve GUARD --port P ...``) whose process tree's memory (RSS; PSS too where
readable) is sampled every 5 s. The images are ``--per-set`` CIFAR-10 test images, then as many Tiny ImageNet and
MNIST images (in the benchmark's 32 x 32 format), PNG-encoded once; requests send one image each, cycling through
them in that order. A bounded asyncio httpx client keeps ``concurrency`` requests in flight for ``--seconds`` per
(server, concurrency) cell, after a 2 s warm-up, and counts throughput (images/s), latency p50/p99, failed requests
(no answer or not 200) and mismatched ones: an answer whose request id, label or (guarded servers) decision differs
from what ``load_guard(...).predict`` gives for the same PNG bytes. Then one run of ``--memory-minutes`` at
concurrency 32 on (a) records its memory over time. The client shares the machine's cores with the servers.
Writes ``--out``.json and ``--out``.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GUARD = Path("/tmp/guard-r20")
SETS = ("cifar10", "tiny_imagenet", "mnist")
SERVERS = {"uvicorn guarded": [], "uvicorn bare": ["--bare"], "ray serve guarded (2 replicas)":
           ["--engine", "ray", "--replicas", "2"]}
CONCURRENCY = (1, 8, 32)
SAMPLE_S = 5.0


# ---------------------------------------------------------------------------------------------- guard and images
def ensure_guard(folder: Path) -> None:
    """Build the benchmark's guard into ``folder`` unless it is there."""
    if (folder / "guard.safetensors").is_file():
        return
    weights = Path(os.environ["OODFORGE_DATA"]) / "weights" / "resnet20-12fca82f.th"
    subprocess.run([sys.executable, "-m", "oodforge", "guard", "build", "--benchmark", "cifar10", "--model",
                    "resnet20", "--weights", str(weights), "--detector", "energy", "--alpha", "0.05", "--out",
                    str(folder), "--quiet"], check=True)


def png_images(per_set: int) -> tuple[list[bytes], list[str]]:
    """``per_set`` images of each of CIFAR-10 test, Tiny ImageNet and MNIST (spread over each set), as PNG bytes,
    with the set each came from."""
    from PIL import Image

    from oodforge.data.benchmarks import get_benchmark
    from oodforge.data.imageset import ImageSet

    bench = get_benchmark("cifar10")
    images, origin = [], []
    for name in SETS:
        found = bench.id_set("test") if name == "cifar10" else bench.ood_set(name)
        for i in np.linspace(0, len(found) - 1, min(per_set, len(found))).astype(int):
            pixels = found.images[i] if isinstance(found, ImageSet) else found.load(int(i))
            buffer = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(pixels).squeeze()).save(buffer, "PNG")
            images.append(buffer.getvalue())
            origin.append(name)
    return images, origin


def expected_answers(folder: Path, images: list[bytes]) -> list[tuple[str, str]]:
    """(label, decision) the guard gives each PNG directly."""
    from PIL import Image

    from oodforge.deploy.guard import load_guard

    guard = load_guard(folder)
    predictions = guard.predict([Image.open(io.BytesIO(b)) for b in images])
    return [(p.label, p.decision) for p in predictions]


# ---------------------------------------------------------------------------------------------- process memory
def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (psutil if installed, else /proc)."""
    try:
        import psutil

        root = psutil.Process(pid)
        return [pid] + [p.pid for p in root.children(recursive=True)]
    except ImportError:
        pass
    except Exception:  # the process is gone
        return []
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        stack.extend(children.get(current, []))
    return found


def memory_mb(pids: list[int]) -> tuple[float, float | None]:
    """(RSS, PSS) in MiB summed over ``pids``; PSS is None where smaps_rollup cannot be read."""
    rss, pss = 0, 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            rss += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
        if pss is not None:
            try:
                rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
                pss += next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:"))
            except (OSError, StopIteration):
                pss = None
    return rss / 1024, None if pss is None else pss / 1024


class Server:
    """``oodforge serve`` as a subprocess on a free port; its process tree sampled for memory."""

    def __init__(self, guard: Path, flags: list[str], threads: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.process = subprocess.Popen([sys.executable, "-m", "oodforge", "serve", str(guard), "--port",
                                         str(self.port), *flags], env=env, stdout=subprocess.DEVNULL,
                                        stderr=open(f"/tmp/serve_load_{self.port}.log", "w"))  # noqa: SIM115
        self.url = f"http://127.0.0.1:{self.port}"
        self.samples: list[tuple[float, float, float | None]] = []
        self.seen: set[int] = set()

    def wait_ready(self, timeout: float = 300) -> float:
        """Seconds until ``/health`` answers 200."""
        import httpx

        tic = time.perf_counter()
        while time.perf_counter() - tic < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}); see /tmp/serve_load_"
                                   f"{self.port}.log")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return time.perf_counter() - tic
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server on port {self.port} did not answer /health in {timeout} s")

    def sample(self, t0: float) -> tuple[float, float | None]:
        """Record the tree's memory now (seconds since ``t0``)."""
        pids = tree(self.process.pid)
        self.seen.update(pids)
        rss, pss = memory_mb(pids)
        self.samples.append((time.perf_counter() - t0, rss, pss))
        return rss, pss

    def stop(self) -> None:
        """Ctrl-C (the servers shut down on it), then kill what is left of the tree."""
        self.seen.update(tree(self.process.pid))
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        time.sleep(2)
        for pid in sorted(self.seen - {self.process.pid}):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def others_testing(mine: set[int]) -> bool:
    """Whether a pytest process that is not ours runs on the machine (the numbers would share the cores)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) not in mine:
            try:
                if b"pytest" in (entry / "cmdline").read_bytes():
                    return True
            except OSError:
                continue
    return False


# ---------------------------------------------------------------------------------------------- load
async def load(server: Server, images: list[bytes], expected: list[tuple[str, str]], bare: bool, concurrency: int,
               seconds: float, tag: str, warmup: float = 2.0) -> dict:
    """Keep ``concurrency`` one-image requests in flight for ``warmup`` + ``seconds``; count the latter part."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    counter = iter(range(10**12))
    latencies: list[float] = []
    failed = mismatched = 0
    errors: dict[str, int] = {}
    t0 = time.perf_counter()
    start, deadline = t0 + warmup, t0 + warmup + seconds

    busy, loads = [], []

    async def sampler() -> None:
        while True:
            server.sample(t0)
            busy.append(others_testing(server.seen | {os.getpid()}))
            loads.append(os.getloadavg()[0])
            await asyncio.sleep(SAMPLE_S)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal failed, mismatched
        while time.perf_counter() < deadline:
            n = next(counter)
            i = n % len(images)
            request_id = f"{tag}-{n}"
            tic = time.perf_counter()
            try:
                response = await client.post("/v1/predict", files=[("file", (f"{i}.png", images[i], "image/png"))],
                                             headers={"x-request-id": request_id})
                ok, body = response.status_code == 200, response.json() if response.status_code == 200 else None
                reason = f"status {response.status_code}"
            except (httpx.HTTPError, ValueError) as exc:
                ok, body, reason = False, None, type(exc).__name__
            toc = time.perf_counter()
            if tic < start:
                continue
            if not ok:
                failed += 1
                errors[reason] = errors.get(reason, 0) + 1
                continue
            latencies.append(toc - tic)
            row = body["predictions"][0] if body.get("predictions") else {}
            label, decision = expected[i]
            if body.get("request_id") != request_id or row.get("label") != label or (
                    not bare and row.get("decision") != decision):
                mismatched += 1

    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
        watch = asyncio.create_task(sampler())
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        watch.cancel()
    rss, pss = server.sample(t0)
    ms = sorted(1000 * t for t in latencies)
    return {"concurrency": concurrency, "seconds": round(elapsed, 2), "answered": len(ms),
            "images_per_s": len(ms) / elapsed, "p50_ms": statistics.median(ms) if ms else None,
            "p99_ms": ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))] if ms else None,
            "failed": failed, "mismatched": mismatched, "errors": errors, "rss_mb": rss, "pss_mb": pss,
            "other_pytest_seen": any(busy), "load_avg_max": max(loads) if loads else None}


def run_server(name: str, flags: list[str], args, images, expected) -> tuple[list[dict], dict]:
    """The three concurrency cells on one server."""
    replicas = int(flags[flags.index("--replicas") + 1]) if "--replicas" in flags else 1
    threads = max(1, (os.cpu_count() or 1) // replicas)
    server = Server(args.guard, flags, threads)
    try:
        ready = server.wait_ready()
        idle, idle_pss = server.sample(time.perf_counter())
        rows = []
        for c in CONCURRENCY:
            row = asyncio.run(load(server, images, expected, "--bare" in flags, c, args.seconds, f"{c}"))
            rows.append({"server": name, **row})
            print(f"{name:34s} c={c:3d} {row['images_per_s']:7.1f} img/s  p50 {row['p50_ms']:7.1f} ms  p99 "
                  f"{row['p99_ms']:7.1f} ms  failed {row['failed']}  mismatched {row['mismatched']}  "
                  f"RSS {row['rss_mb']:.0f} MiB{'  (another pytest ran)' if row['other_pytest_seen'] else ''}",
                  flush=True)
        return rows, {"server": name, "ready_s": ready, "torch_threads": threads, "idle_rss_mb": idle,
                      "idle_pss_mb": idle_pss}
    finally:
        server.stop()


def memory_run(args, images, expected) -> dict:
    """``--memory-minutes`` at concurrency 32 on the guarded uvicorn server, memory every 5 s."""
    server = Server(args.guard, [], os.cpu_count() or 1)
    try:
        server.wait_ready()
        row = asyncio.run(load(server, images, expected, False, 32, 60 * args.memory_minutes, "mem", warmup=0))
    finally:
        server.stop()
    samples = server.samples
    after = min(samples, key=lambda s: abs(s[0] - 60))
    end = samples[-1]
    return {**row, "samples": [[round(t, 1), round(r, 1), None if p is None else round(p, 1)] for t, r, p in samples],
            "rss_after_1min_mb": after[1], "rss_end_mb": end[1], "rss_ratio_end_to_1min": end[1] / after[1],
            "pss_after_1min_mb": after[2], "pss_end_mb": end[2]}


# ---------------------------------------------------------------------------------------------- report
def markdown(result: dict) -> str:
    """The tables of serve_load.md."""
    s = result["settings"]
    lines = ["# Served guard under load (localhost)", "",
             f"Guard: {s['guard']} (ResNet-20 CIFAR-10, energy, alpha 0.05). Machine: {s['cpus']} CPU cores, "
             f"{s['platform']}. One image per request; {s['images']} PNG images ({s['per_set']} each of "
             f"{', '.join(SETS)}), cycled in that order. {s['seconds']} s per cell after a 2 s warm-up; the "
             "client (one asyncio process, httpx) runs on the same cores as the server.", "",
             "| server | concurrency | images/s | p50 (ms) | p99 (ms) | failed | mismatched | RSS at cell end (MiB) "
             "| other tests running |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["cells"]:
        lines.append(f"| {r['server']} | {r['concurrency']} | {r['images_per_s']:.1f} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r['failed']} | {r['mismatched']} | {r['rss_mb']:.0f} | "
                     f"{'yes' if r['other_pytest_seen'] else 'no'} |")
    lines += ["", "| server | ready after (s) | torch threads per process | idle RSS (MiB) | idle PSS (MiB) |",
              "|---|---:|---:|---:|---:|"]
    for r in result["servers"]:
        pss = "-" if r["idle_pss_mb"] is None else f"{r['idle_pss_mb']:.0f}"
        lines.append(f"| {r['server']} | {r['ready_s']:.1f} | {r['torch_threads']} | {r['idle_rss_mb']:.0f} | {pss} |")
    m = result.get("memory")
    if m:
        lines += ["", f"## Memory over {s['memory_minutes']} min at concurrency 32 (uvicorn guarded)", "",
                  "| answered | images/s | p50 (ms) | p99 (ms) | failed | mismatched | RSS after 1 min (MiB) | "
                  "RSS at the end (MiB) | end / 1 min | other tests running |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
                  f"| {m['answered']} | {m['images_per_s']:.1f} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | "
                  f"{m['failed']} | {m['mismatched']} | {m['rss_after_1min_mb']:.0f} | {m['rss_end_mb']:.0f} | "
                  f"{m['rss_ratio_end_to_1min']:.3f} | {'yes' if m['other_pytest_seen'] else 'no'} |"]
    lines += ["", "## Engines at concurrency 32", "", result["comparison"], ""]
    return "\n".join(lines)


def compare(cells: list[dict]) -> str:
    """Which engine is faster at concurrency 32, in one sentence."""
    at = {r["server"]: r for r in cells if r["concurrency"] == 32}
    uv, ray = at.get("uvicorn guarded"), at.get("ray serve guarded (2 replicas)")
    if not uv or not ray:
        return "(not measured)"
    fast, slow = (uv, ray) if uv["images_per_s"] >= ray["images_per_s"] else (ray, uv)
    return (f"At concurrency 32 on this {os.cpu_count()}-core machine, {fast['server']} is faster: "
            f"{fast['images_per_s']:.1f} vs {slow['images_per_s']:.1f} images/s "
            f"({fast['images_per_s'] / slow['images_per_s']:.2f}x), p50 {fast['p50_ms']:.1f} vs "
            f"{slow['p50_ms']:.1f} ms, p99 {fast['p99_ms']:.1f} vs {slow['p99_ms']:.1f} ms.")


def main() -> None:
    """Parse the options, run every cell and the memory run, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30, help="measured seconds per (server, concurrency)")
    parser.add_argument("--memory-minutes", type=float, default=10, help="minutes of the memory run (0: none)")
    parser.add_argument("--per-set", type=int, default=1000, help="images from each of the three sets")
    parser.add_argument("--guard", type=Path, default=GUARD)
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated subset of the servers")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve_load")
    args = parser.parse_args()
    ensure_guard(args.guard)
    images, origin = png_images(args.per_set)
    expected = expected_answers(args.guard, images)
    flagged = {name: float(np.mean([d == "out" for (_, d), o in zip(expected, origin, strict=True) if o == name]))
               for name in SETS}
    print(f"{len(images)} images; flagged OOD by the guard: {flagged}", flush=True)
    cells, servers = [], []
    for name in args.servers.split(","):
        rows, info = run_server(name, SERVERS[name], args, images, expected)
        cells += rows
        servers.append(info)
    memory = memory_run(args, images, expected) if args.memory_minutes > 0 else None
    if memory:
        print(f"memory run: RSS {memory['rss_after_1min_mb']:.0f} MiB after 1 min, {memory['rss_end_mb']:.0f} MiB "
              f"at the end (x{memory['rss_ratio_end_to_1min']:.3f}); {memory['images_per_s']:.1f} img/s, "
              f"failed {memory['failed']}, mismatched {memory['mismatched']}, another pytest ran: "
              f"{memory['other_pytest_seen']}", flush=True)
    import ray
    import torch

    result = {"settings": {"guard": str(args.guard), "seconds": args.seconds, "memory_minutes": args.memory_minutes,
                           "per_set": args.per_set, "images": len(images), "cpus": os.cpu_count(),
                           "platform": platform.platform(), "python": platform.python_version(),
                           "torch": torch.__version__, "ray": ray.__version__, "flagged_by_guard": flagged},
              "cells": cells, "servers": servers, "memory": memory, "comparison": compare(cells)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(result["comparison"])


if __name__ == "__main__":
    main()
