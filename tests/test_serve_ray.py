"""The Ray Serve engine: two replicas of the guard's app answer exactly what one uvicorn-style app (and the guard
itself) answers, image by image and request by request; /health works; Serve and Ray are shut down afterwards."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

ray = pytest.importorskip("ray")

from oodforge.serve.app import create_app  # noqa: E402
from oodforge.serve.config import ServeConfig  # noqa: E402
from oodforge.serve.ray_engine import APP_NAME, DEPLOYMENT_NAME, deploy, shutdown  # noqa: E402
from oodforge.util.errors import ConfigError  # noqa: E402
from test_serve import expected, free_port, png, small_guard_dir  # noqa: E402

IMAGES = [png(200 + i, size=16 if i % 2 else 24) for i in range(12)]  # calibration-like and not


@pytest.fixture(scope="module")
def guard_dir(tmp_path_factory) -> Path:
    return small_guard_dir(tmp_path_factory.mktemp("guard"), seed=1, alpha=0.3)


@pytest.fixture(scope="module")
def ray_url(guard_dir, request) -> str:
    """Two replicas on a free localhost port; Serve and the local Ray instance stop when the module ends."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the replicas inherit it
    request.addfinalizer(shutdown)
    config = ServeConfig(guard_dir, port=free_port(), engine="ray", replicas=2, window=20)
    return deploy(config, blocking=False)


def rows_of(body: dict) -> list[tuple]:
    return [(r["name"], r["label"], r["decision"], r["score"]) for r in body["predictions"]]


def assert_same(got: list[tuple], want: list[tuple]) -> None:
    assert [g[:3] for g in got] == [w[:3] for w in want]
    assert np.allclose([g[3] for g in got], [w[3] for w in want], rtol=0, atol=1e-5)


def test_two_replicas_answer_what_one_app_answers(guard_dir, ray_url):
    from ray import serve

    status = serve.status().applications[APP_NAME]
    assert status.deployments[DEPLOYMENT_NAME].replica_states == {"RUNNING": 2}
    files = [("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(IMAGES)]

    async def singly() -> list[dict]:
        async with httpx.AsyncClient(base_url=ray_url, timeout=60) as client:
            async def one(i: int) -> dict:
                response = await client.post("/v1/predict", files=[files[i]], headers={"x-request-id": f"r-{i}"})
                assert response.status_code == 200, response.text
                return response.json()
            return await asyncio.gather(*(one(i) for i in range(len(IMAGES))))

    ray_single = asyncio.run(singly())
    ray_multi = httpx.post(ray_url + "/v1/predict", files=files, headers={"x-request-id": "all"}, timeout=60)
    assert ray_multi.status_code == 200, ray_multi.text
    with TestClient(create_app(ServeConfig(guard_dir, window=20))) as client:
        local_single = [client.post("/v1/predict", files=[f]).json() for f in files]
        local_multi = client.post("/v1/predict", files=files).json()

    assert [b["request_id"] for b in ray_single] == [f"r-{i}" for i in range(12)]
    assert ray_multi.json()["request_id"] == "all"
    local_rows = [row for body in local_single for row in rows_of(body)]
    assert_same([row for body in ray_single for row in rows_of(body)], local_rows)
    assert_same(rows_of(ray_multi.json()), rows_of(local_multi))
    assert_same(rows_of(local_multi), local_rows)
    want = expected(guard_dir, IMAGES)  # and both equal the guard's own predictions
    assert_same(local_rows, [(f"{i}.png", w.label, w.decision, w.score) for i, w in enumerate(want)])
    assert {w.decision for w in want} == {"in", "out"}  # the comparison covers both decisions


def test_health_and_guard_info_through_the_proxy(ray_url):
    health = httpx.get(ray_url + "/health", timeout=30)
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "detector": "knn", "alpha": 0.3, "bare": False}
    info = httpx.get(ray_url + "/v1/guard", timeout=30).json()
    assert info["classes"] == ["ash", "elm", "oak"] and info["calibration_size"] == 60
    bad = httpx.post(ray_url + "/v1/predict", content=b"abc", headers={"content-type": "text/plain"}, timeout=30)
    assert bad.status_code == 415 and "multipart" in bad.json()["error"]


def test_more_local_replicas_than_cpus_is_refused(guard_dir):
    cpus = os.cpu_count() or 1
    with pytest.raises(ConfigError, match=f"--replicas {cpus + 1} needs {cpus + 1} CPUs"):
        deploy(ServeConfig(guard_dir, engine="ray", replicas=cpus + 1), blocking=False)
