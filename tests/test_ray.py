"""``oodforge bench --executor ray``: same results as the local executor, resources, retries that resume."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

ray = pytest.importorskip("ray")

from conftest import needs_mnist_family  # noqa: E402
from oodforge.bench.executors import RAY_MISSING, TASK_FILE, check_fits, run_jobs  # noqa: E402
from oodforge.bench.jobs import bench_jobs, run_bench  # noqa: E402
from oodforge.cli import app  # noqa: E402
from oodforge.evaluation.result import Evaluation  # noqa: E402
from oodforge.models.classifier import read_checkpoint  # noqa: E402
from oodforge.runs.payload import MethodRun  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
runner = CliRunner()
TINY = {"benchmark": "fashion_mnist", "detectors": "msp,energy,knn", "seeds": [0, 1],
        "defaults": {"epochs": 1, "train_subset": 256, "batch_size": 64, "lr": 0.05},
        "resources": {"num_cpus": 1, "num_gpus": 0},
        "runs": [{"name": "ce", "loss": "ce"}, {"name": "ls", "loss": "ls"},
                 {"name": "frozen", "epochs": 0, "seeds": [1], "init": "{out}/ce/seed{seed}/model.ckpt"}]}


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance with 2 CPUs, shared by the tests of this module."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@needs_mnist_family
def test_ray_bench_writes_what_the_local_executor_writes(tmp_path, local_ray) -> None:
    config = _write(tmp_path, TINY)
    result = runner.invoke(app, ["bench", str(config), "--out", str(tmp_path / "ray"), "--executor", "ray",
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the Ray tasks (num_cpus 1): with other thread counts float sums differ a little
    try:
        run_bench(config, tmp_path / "local", quiet=True)
    finally:
        torch.set_num_threads(threads)
    on_ray, local = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("ray", "local"))
    methods = ["ce-seed0", "ce-seed1", "ls-seed0", "ls-seed1", "frozen-seed1"]  # config order, not finishing order
    assert list(on_ray["methods"]) == list(local["methods"]) == methods
    assert on_ray["results"] == local["results"]  # training is deterministic: every metric is equal
    for method in methods:
        mine, theirs = on_ray["methods"][method], local["methods"][method]
        assert mine["id_accuracy"] == theirs["id_accuracy"]
        assert {**mine["model"], "checkpoint": None} == {**theirs["model"], "checkpoint": None}  # out folders differ
        loss = lambda run: [epoch["loss"] for epoch in run["train"]["history"]]  # noqa: E731
        assert loss(mine) == loss(theirs)
    assert on_ray["detectors"] == local["detectors"]
    for name in ("summary.json", "summary.md", "results.md"):
        assert (tmp_path / "ray" / name).read_text() == (tmp_path / "local" / name).read_text()
    ray_scores, local_scores = np.load(tmp_path / "ray" / "scores.npz"), np.load(tmp_path / "local" / "scores.npz")
    assert sorted(ray_scores) == sorted(local_scores)
    assert all(np.array_equal(ray_scores[k], local_scores[k]) for k in local_scores)
    task = json.loads((tmp_path / "ray" / "ce" / "seed0" / TASK_FILE).read_text())
    assert task["attempt"] == 1 and task["pid"] != os.getpid()


@needs_mnist_family
def test_killed_worker_is_retried_and_resumes_from_its_checkpoint(tmp_path, local_ray) -> None:
    config = _write(tmp_path, {"benchmark": "fashion_mnist", "detectors": "msp", "seeds": [0],
                               "defaults": {"epochs": 3, "train_subset": 8192, "batch_size": 64, "lr": 0.05},
                               "runs": [{"name": "ce"}]})
    out = tmp_path / "bench"
    run_dir = out / "ce" / "seed0"
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(_capture(run_bench, config, out, quiet=True,
                                                                     executor="ray")), daemon=True)
    thread.start()
    before = _wait_for_epoch(run_dir / "last.ckpt", thread)
    first = json.loads((run_dir / TASK_FILE).read_text())
    os.kill(first["pid"], signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive() and not isinstance(outcome[0], BaseException), outcome
    second = json.loads((run_dir / TASK_FILE).read_text())
    assert second["attempt"] == 2 and second["pid"] != first["pid"]
    history = json.loads((out / "results.json").read_text())["train"]["history"]
    assert len(history) == 3
    # the epochs done before the kill were not trained again: their records (wall times too) are kept as is
    assert history[:before["epoch"]] == before["history"] and history[0]["seconds"] == before["history"][0]["seconds"]


def _capture(function, *args, **kwargs):
    try:
        return function(*args, **kwargs)
    except BaseException as exc:  # handed to the test thread
        return exc


def _wait_for_epoch(checkpoint: Path, thread: threading.Thread, timeout_s: float = 600) -> dict:
    """The training checkpoint as soon as it holds a finished epoch (a deadline, not a wait: on a loaded machine,
    Ray's niced worker took over 120 s for its first epoch)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and thread.is_alive():
        if checkpoint.is_file():
            state = read_checkpoint(checkpoint)
            if state["epoch"] >= 1:
                return state
        time.sleep(0.02)
    raise AssertionError(f"no epoch finished in {checkpoint.parent} (bench thread alive: {thread.is_alive()})")


@dataclass(frozen=True)
class FakeJob:
    method: str
    needs: tuple[str, ...]
    run_dir: Path


def report_worker(job: FakeJob, pause_s: float, quiet: bool = True) -> MethodRun:
    """A job that says where and how it ran, as a ``MethodRun``."""
    start = time.time()
    time.sleep(pause_s)
    info = {"omp": os.environ.get("OMP_NUM_THREADS"), "threads": torch.get_num_threads(), "start": start,
            "end": time.time(), "resources": ray.get_runtime_context().get_assigned_resources()}
    return MethodRun.of(torch.nn.Linear(2, 3), Evaluation(id_accuracy=0.5), info)


def test_ray_tasks_get_the_resources_and_wait_for_the_jobs_they_need(tmp_path, local_ray) -> None:
    jobs = [FakeJob("a", (), tmp_path / "a"), FakeJob("b", ("a",), tmp_path / "b"), FakeJob("c", (), tmp_path / "c")]
    done = run_jobs("ray", report_worker, jobs, 0.5, quiet=True, resources={"num_cpus": 1})
    assert set(done) == {"a", "b", "c"}
    info = {method: run.train for method, run in done.items()}
    assert all(i["omp"] == "1" and i["threads"] == 1 and i["resources"] == {"CPU": 1.0} for i in info.values())
    assert info["b"]["start"] >= info["a"]["end"]  # b reads a's files
    assert done["a"].model["parameters"] == 9 and done["a"].evaluation.detector_records() == {}
    with pytest.raises(ValueError, match="num_gpus 1 is more than"):
        check_fits({"num_cpus": 1, "num_gpus": 1}, ray.cluster_resources())


def test_jobs_that_read_an_earlier_run_wait_for_it(tmp_path) -> None:
    from oodforge.bench.jobs import load_bench_config

    jobs = bench_jobs(load_bench_config(_write(tmp_path, TINY)), "fashion_mnist", tmp_path / "out")
    assert {job.method: job.needs for job in jobs}["frozen-seed1"] == ("ce-seed1",)
    assert all(not job.needs for job in jobs if job.run != "frozen")


def _one_error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    return " ".join(result.output.split())


@pytest.mark.parametrize("resources, message", [
    ({"num_cpus": -1}, "resources: num_cpus must be a non-negative number, got -1"),
    ({"num_gpus": "half"}, "resources: num_gpus must be a non-negative number, got 'half'"),
    ({"num_gpus": True}, "resources: num_gpus must be a non-negative number, got True"),
    ({"gpus": 1}, "resources: unknown key 'gpus'"),
    ([1, 2], "resources must be a mapping"),
])
def test_bad_resources_are_one_line_errors(tmp_path, resources, message) -> None:
    config = _write(tmp_path, {"runs": [{"name": "ce"}], "resources": resources})
    out = tmp_path / "out"
    line = _one_error(runner.invoke(app, ["bench", str(config), "--out", str(out), "--executor", "ray", "--quiet"]))
    assert message in line and str(config) in line and not out.exists()


def test_unknown_executor_or_missing_ray_is_one_line(tmp_path, monkeypatch) -> None:
    config = _write(tmp_path, {"runs": [{"name": "ce"}]})
    out = tmp_path / "out"
    line = _one_error(runner.invoke(app, ["bench", str(config), "--out", str(out), "--executor", "nope"]))
    assert "--executor must be one of local, ray; got 'nope'" in line and not out.exists()
    line = _one_error(runner.invoke(app, ["bench", str(config), "--out", str(out), "--address", "auto"]))
    assert "--address is for --executor ray" in line
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    line = _one_error(runner.invoke(app, ["bench", str(config), "--out", str(out), "--executor", "ray"]))
    assert RAY_MISSING in line and not out.exists()
