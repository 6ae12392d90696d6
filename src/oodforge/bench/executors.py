"""Where ``oodforge bench`` runs its jobs (one per run x seed): in this process, one after another
(``local``), or as Ray tasks on a local Ray instance or a Ray cluster (``ray``, the ``[ray]`` extra).

A Ray task gets the config's ``resources`` (``num_cpus``, ``num_gpus``; OMP_NUM_THREADS = its CPUs). A task
whose worker dies is retried (``MAX_RETRIES``); jobs resume from their last checkpoint, so a retry goes on
from the last finished epoch. Each task writes ``<run>/seed<k>/ray-task.json`` (host, pid, attempt) when it
starts. On a cluster the bench folder, ``OODFORGE_DATA`` and ``OODFORGE_CACHE`` must be shared by every node.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from oodforge.util.atomic import atomic_json
from oodforge.util.errors import ConfigError
from oodforge.util.progress import progress_bar

EXECUTORS = ("local", "ray")
RAY_MISSING = "--executor ray needs Ray: pip install -e '.[ray]'"
DEFAULT_RESOURCES = {"num_cpus": 1, "num_gpus": 0}
MAX_RETRIES = 3
TASK_FILE = "ray-task.json"
POLL_S = 0.5  # how often the progress lines are refreshed while no task finishes


class Job(Protocol):
    """What an executor reads of a job (``oodforge.bench.jobs.BenchJob``)."""

    method: str
    needs: tuple[str, ...]  # methods that must finish first
    run_dir: Any


def check_executor(name: str, address: str | None = None) -> None:
    """Refuse an unknown executor, ``--address`` without Ray, or Ray when it is not installed."""
    if name not in EXECUTORS:
        raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)}; got {name!r}")
    if name == "local" and address:
        raise ConfigError("--address is for --executor ray")
    if name == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError(RAY_MISSING)


def check_resources(resources: object, path: object) -> None:
    """A bench config's ``resources``: a mapping of ``num_cpus``/``num_gpus`` to non-negative numbers."""
    if not isinstance(resources, dict):
        raise ConfigError(f"{path}: resources must be a mapping like {{num_cpus: 1, num_gpus: 0.25}}, "
                         f"got {resources!r}")
    for key, value in resources.items():
        if key not in DEFAULT_RESOURCES:
            raise ConfigError(f"{path}: resources: unknown key {key!r}; allowed: {', '.join(DEFAULT_RESOURCES)}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{path}: resources: {key} must be a non-negative number, got {value!r}")


def run_jobs(executor: str, work: Callable, jobs: Sequence[Job], *args, quiet: bool = False,
             resources: dict | None = None, address: str | None = None) -> dict[str, Any]:
    """``work(job, *args, quiet=...)`` for every job, keyed by ``job.method``; a job starts only after
    the jobs it ``needs``. ``local``: in order, in this process; ``ray``: as Ray tasks (``run_on_ray``)."""
    check_executor(executor, address)
    if executor == "local":
        return {job.method: work(job, *args, quiet=quiet) for job in jobs}
    return run_on_ray(work, jobs, args, {**DEFAULT_RESOURCES, **(resources or {})}, address, quiet)


def run_on_ray(work: Callable, jobs: Sequence[Job], args: tuple, resources: dict, address: str | None = None,
               quiet: bool = False) -> dict[str, Any]:
    """Each job as a Ray task with ``resources``, retried if its worker dies, with one progress line per job.

    Uses Ray as initialised by the caller, else connects to ``address`` (``auto``, ``ray://HEAD:10001``) or
    starts a local instance with every CPU (stopped again at the end).
    """
    import ray

    started = connect(address, quiet)
    try:
        if started and not address:
            check_fits(resources, ray.cluster_resources())
        board = ray.remote(num_cpus=0)(TaskBoard).remote()
        threads = max(1, math.floor(resources["num_cpus"]))
        task = ray.remote(ray_job).options(
            num_cpus=resources["num_cpus"], num_gpus=resources["num_gpus"], max_retries=MAX_RETRIES,
            retry_exceptions=False)
        try:
            with progress_bar(quiet) as bar:
                return drive(jobs, lambda job: task.remote(work, job, args, board, threads), board, bar)
        finally:
            ray.kill(board)
    finally:
        if started:
            ray.shutdown()


def connect(address: str | None, quiet: bool) -> bool:
    """Initialise Ray unless the caller did; True when this call did (and so shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    level = logging.ERROR if quiet else logging.WARNING
    if address:
        ray.init(address=address, logging_level=level, log_to_driver=not quiet)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=level, log_to_driver=not quiet)
    return True


def check_fits(resources: dict, available: dict) -> None:
    """Refuse tasks that a local Ray instance could never schedule (Ray would wait for them forever)."""
    for key, name in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
        if resources[key] > available.get(name, 0):
            raise ConfigError(f"resources: {key} {resources[key]:g} is more than this machine's Ray instance has "
                             f"({available.get(name, 0):g} {name}); lower it or give --address of a cluster")


def drive(jobs: Sequence[Job], submit: Callable, board: Any, bar: Any) -> dict[str, Any]:
    """Submit each job once the jobs it needs are done, collect results as tasks finish, show their states."""
    import ray

    lines = {job.method: bar.add_task(job.method, total=1, start=False, status="waiting") for job in jobs}
    waiting, running, done = list(jobs), {}, {}
    try:
        while waiting or running:
            for job in [j for j in waiting if set(j.needs) <= done.keys()]:
                waiting.remove(job)
                running[submit(job)] = job
            ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
            for ref in ready:
                job = running.pop(ref)
                done[job.method] = task_result(ref, job)
            show_states(bar, lines, ray.get(board.attempts.remote()), done)
    except BaseException:
        for ref in running:
            ray.cancel(ref)
        raise
    return done


def show_states(bar: Any, lines: dict[str, int], attempts: dict[str, int], done: dict) -> None:
    """Each job's line: waiting, running, retried (attempt n) or done."""
    for method, line in lines.items():
        tries = attempts.get(method, 0)
        retried = f" (attempt {tries})" if tries > 1 else ""
        if tries or method in done:
            bar.start_task(line)
        if method in done:
            bar.update(line, completed=1, status=f"done{retried}")
        elif tries:
            bar.update(line, status=f"retried{retried}: running" if retried else "running")


def task_result(ref: Any, job: Job) -> Any:
    """A finished task's result; its own error as it was raised (one line at the CLI), a lost worker's
    error (after ``MAX_RETRIES`` retries) naming the job."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, Exception) and not isinstance(exc.cause, ray.exceptions.RayError):
            raise exc.cause from None
        raise
    except ray.exceptions.RayError as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RuntimeError(f"{job.method} failed on Ray after {MAX_RETRIES} retries: {reason}") from exc


class TaskBoard:
    """Ray actor: how many times each job's task has started (more than once: retried)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def start(self, method: str) -> int:
        self.counts[method] = self.counts.get(method, 0) + 1
        return self.counts[method]

    def attempts(self) -> dict[str, int]:
        return dict(self.counts)


def ray_job(work: Callable, job: Job, args: tuple, board: Any, threads: int) -> Any:
    """One Ray task: note the attempt (``ray-task.json``), run ``work`` quietly, return a light result."""
    import ray

    os.environ["OMP_NUM_THREADS"] = str(threads)  # for processes it starts; Ray reuses workers across tasks
    torch.set_num_threads(threads)
    attempt = ray.get(board.start.remote(job.method))
    os.makedirs(job.run_dir, exist_ok=True)
    atomic_json({"host": socket.gethostname(), "pid": os.getpid(), "attempt": attempt}, job.run_dir / TASK_FILE)
    return work(job, *args, quiet=True).light()  # the model's description, not its weights
