"""The served guard: predictions over HTTP equal the guard's own, dynamic batching keeps each answer with its
request under concurrency, every bad request is one 4xx JSON error after which the server goes on, metrics."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from oodforge.deploy.guard import Guard
from oodforge.deploy.inputs import Preprocessing
from oodforge.detectors import create_detector
from oodforge.detectors.base import outputs_of
from oodforge.models.classifier import ModelConfig, build_classifier
from oodforge.serve.app import create_app
from oodforge.serve.config import ServeConfig
from oodforge.util.errors import ConfigError


@pytest.fixture(scope="module")
def guard_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_classifier(ModelConfig(backbone="small_cnn", num_classes=3, in_channels=3, mean=(0.5,) * 3,
                                         std=(0.25,) * 3)).eval()
    train = outputs_of(model, [(torch.rand(90, 3, 16, 16), torch.arange(90) % 3)])
    guard = Guard(model, create_detector("knn", k=5)._ready(train, model), classes=["ash", "elm", "oak"],
                  preprocessing=Preprocessing((16, 16, 3)), alpha=0.2)
    folder = tmp_path_factory.mktemp("guard")
    guard.calibrate(torch.rand(60, 3, 16, 16)).save(folder)
    return folder


def png(seed: int, size: int = 20) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A small PNG whose header claims width x height pixels (a decompression bomb's signature)."""
    data = bytearray(png(0, 4))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:ihdr + 13]))
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def expected(guard_dir: Path, images: list[bytes]) -> list:
    from oodforge.deploy.guard import load_guard

    guard = load_guard(guard_dir)
    return [guard.predict(Image.open(io.BytesIO(b))) for b in images]


def test_predict_over_http_equals_the_guard(guard_dir):
    images = [png(i) for i in range(3)]
    want = expected(guard_dir, images)
    with TestClient(create_app(ServeConfig(guard_dir, window=20))) as client:
        multipart = client.post("/v1/predict", files=[("file", (f"{i}.png", b, "image/png"))
                                                      for i, b in enumerate(images)])
        as_json = client.post("/v1/predict", json={"images": [base64.b64encode(b).decode() for b in images]})
        for response, names in ((multipart, ["0.png", "1.png", "2.png"]), (as_json, ["0", "1", "2"])):
            assert response.status_code == 200, response.text
            body = response.json()
            assert len(body["request_id"]) >= 16
            rows = body["predictions"]
            assert [r["name"] for r in rows] == names
            assert [r["decision"] for r in rows] == [w.decision for w in want]
            assert [r["label"] for r in rows] == [w.label for w in want]
            assert np.allclose([r["score"] for r in rows], [w.score for w in want], atol=1e-5)
        assert client.get("/health").json()["status"] == "ok"
        info = client.get("/v1/guard").json()
        assert info["detector"] == "knn" and info["alpha"] == 0.2 and info["classes"] == ["ash", "elm", "oak"]
        metrics = client.get("/metrics").text
        assert "oodforge_images_total 6.0" in metrics
        flagged = sum(w.decision == "out" for w in want)
        assert f'oodforge_decisions_total{{decision="out"}} {2.0 * flagged}' in metrics or flagged == 0
        assert 'oodforge_requests_total{endpoint="/v1/predict",status="200"} 2.0' in metrics
        assert "oodforge_p_value_bucket" in metrics and "oodforge_drift_alarm 0.0" in metrics


@pytest.mark.parametrize("case", ["malformed_json", "not_base64", "not_an_image", "bomb", "oversize", "no_image",
                                  "wrong_type", "too_many"])
def test_bad_requests_are_one_4xx_json_error_and_the_server_goes_on(guard_dir, case):
    config = ServeConfig(guard_dir, window=20, max_body_mb=0.01, max_images=4)  # 10 KiB bodies
    with TestClient(create_app(config)) as client:
        send = {
            "malformed_json": lambda: client.post("/v1/predict", content=b'{"images": [', headers={
                "content-type": "application/json"}),
            "not_base64": lambda: client.post("/v1/predict", json={"images": ["%%%"]}),
            "not_an_image": lambda: client.post("/v1/predict", files=[("file", ("x.png", b"hello", "image/png"))]),
            "bomb": lambda: client.post("/v1/predict", files=[("file", ("bomb.png", bomb_png(), "image/png"))]),
            "oversize": lambda: client.post("/v1/predict", content=b"x" * 20_000, headers={
                "content-type": "application/json"}),
            "no_image": lambda: client.post("/v1/predict", json={"images": []}),
            "wrong_type": lambda: client.post("/v1/predict", content=b"abc", headers={"content-type": "text/plain"}),
            "too_many": lambda: client.post("/v1/predict", json={"images": [base64.b64encode(png(0, 4)).decode()] * 5}),
        }[case]
        response = send()
        assert 400 <= response.status_code < 500, (case, response.status_code)
        message = response.json()["error"]
        assert message and "\n" not in message
        words = {"malformed_json": "malformed JSON", "not_base64": "base64", "not_an_image": "x.png",
                 "bomb": "bomb.png", "oversize": "limit", "no_image": "no image", "wrong_type": "multipart",
                 "too_many": "more than the limit of 4"}
        assert words[case] in message, message
        good = client.post("/v1/predict", files=[("file", ("ok.png", png(1), "image/png"))])
        assert good.status_code == 200 and good.json()["predictions"][0]["decision"] in ("in", "out")


def test_bearer_token(guard_dir, tmp_path):
    (tmp_path / "token").write_text("s3cret\n")
    with TestClient(create_app(ServeConfig(guard_dir, token_file=tmp_path / "token"))) as client:
        files = [("file", ("a.png", png(3), "image/png"))]
        assert client.get("/health").status_code == 200  # open, for load balancers
        missing = client.post("/v1/predict", files=files)
        wrong = client.post("/v1/predict", files=files, headers={"authorization": "Bearer nope"})
        assert missing.status_code == wrong.status_code == 401 and "token" in wrong.json()["error"]
        assert client.get("/metrics").status_code == 401
        right = client.post("/v1/predict", files=files, headers={"authorization": "Bearer s3cret"})
        assert right.status_code == 200


def test_config_is_checked_at_the_door(guard_dir, tmp_path):
    with pytest.raises(ConfigError, match="--max-batch must be >= 1"):
        ServeConfig(guard_dir, max_batch=0)
    with pytest.raises(ConfigError, match="--replicas needs --engine ray"):
        ServeConfig(guard_dir, replicas=2)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        ServeConfig(guard_dir, token_file=tmp_path / "empty").token()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A uvicorn server on a free localhost port, in a thread, stopped on exit."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def test_concurrent_requests_are_batched_and_each_answer_matches_its_request(guard_dir, tmp_path):
    images = [png(100 + i) for i in range(64)]
    want = expected(guard_dir, images)
    app = create_app(ServeConfig(guard_dir, window=20, max_batch=16, max_delay_ms=20, workers=2))

    async def fire(url: str) -> list[dict]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async def one(i: int) -> dict:
                response = await client.post("/v1/predict", files=[("file", (f"{i}.png", images[i], "image/png"))],
                                             headers={"x-request-id": f"req-{i}"})
                assert response.status_code == 200
                return response.json()
            return await asyncio.gather(*(one(i) for i in range(len(images))))

    with Running(app) as url:
        answers = asyncio.run(fire(url))
        metrics = httpx.get(url + "/metrics").text
        from oodforge.serve.monitor_page import load_monitor_source, write_monitor_page

        alpha, records = load_monitor_source(url + "/v1/monitor")  # what `oodforge monitor URL` reads
        page = write_monitor_page(records, tmp_path / "page", alpha)
    assert alpha == 0.2 and sum(len(r["p_values"]) for r in records) == len(images)
    assert page.is_file() and "<img" in page.read_text()
    for i, answer in enumerate(answers):
        assert answer["request_id"] == f"req-{i}"
        row = answer["predictions"][0]
        assert row["name"] == f"{i}.png" and row["decision"] == want[i].decision
        assert abs(row["score"] - want[i].score) <= 1e-5
    count = float(next(line.split()[-1] for line in metrics.splitlines()
                       if line.startswith("oodforge_batch_size_count")))
    assert count < len(images)  # some requests shared a batch
