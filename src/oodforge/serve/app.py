"""The HTTP app of a served guard (FastAPI): ``POST /v1/predict``, ``GET /health``, ``GET /v1/guard``,
``GET /v1/monitor``, ``GET /metrics``. Every error is a JSON ``{"error": ...}`` with a 4xx status, and the server
goes on serving."""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from oodforge.deploy.guard import Guard, load_guard
from oodforge.serve.batching import Batcher
from oodforge.serve.config import ServeConfig
from oodforge.serve.metrics import ServeMetrics
from oodforge.serve.monitor import DriftMonitor
from oodforge.serve.payloads import RequestError, decode, images_from_json

LOG = logging.getLogger("oodforge.serve")
OPEN_PATHS = ("/health",)


class GuardService:
    """A guard with its batcher, metrics and drift monitor: what one server process (or Ray replica) runs."""

    def __init__(self, guard: Guard, config: ServeConfig) -> None:
        self.guard, self.config = guard, config
        self.metrics = ServeMetrics()
        calibration = guard._require_calibration()
        self.monitor = None if config.bare else DriftMonitor(
            guard.alpha, window=config.window, log_path=config.monitor_log, webhook=config.webhook,
            calibration_size=None if guard.class_conditional else len(calibration.scores))
        self.batcher = Batcher(self._run, config.max_batch, config.max_delay_ms, config.workers,
                               on_batch=self.metrics.batch_size.observe)
        self.token = config.token()

    def _run(self, x) -> list[dict]:
        """One model batch: the guard's answers (or the bare network's), counted and fed to the monitor."""
        if self.config.bare:
            rows = self.guard.classify(x)
        else:
            rows = self.guard.answer(x)
            was = self.monitor.state()["alarm"]
            state = self.monitor.update([r["p_value"] for r in rows], [r["decision"] == "out" for r in rows])
            self.metrics.observe_monitor(state, raised=state["alarm"] and not was)
        self.metrics.observe_rows(rows)
        return rows

    def describe(self) -> dict:
        """The guard's metadata for ``/v1/guard`` and ``/health``."""
        return {**self.guard.describe(), "versions": getattr(self.guard, "versions", {}), "bare": self.config.bare}

    def authorized(self, request: Request) -> bool:
        """Whether the request carries the bearer token (always, when auth is off)."""
        if self.token is None or request.url.path in OPEN_PATHS:
            return True
        given = request.headers.get("authorization", "")
        return given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip(), self.token)

    async def images(self, request: Request) -> list[tuple[str, bytes]]:
        """The request's images, as (name, bytes); size limits checked before and while reading."""
        declared = request.headers.get("content-length")
        limit = self.config.max_body_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"the request body is {int(declared)} bytes, more than the limit of {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestError(413, f"the request body is more than the limit of {limit} bytes")
        kind = request.headers.get("content-type", "")
        if kind.startswith("application/json"):
            found = images_from_json(bytes(body))
        elif kind.startswith("multipart/form-data"):
            found = await _multipart(bytes(body), kind)
        else:
            raise RequestError(415, "send images as multipart/form-data (field 'file') or application/json "
                                    '{"images": [base64, ...]}')
        if not found:
            raise RequestError(400, "the request holds no image")
        if len(found) > self.config.max_images:
            raise RequestError(413, f"{len(found)} images in one request, more than the limit of "
                                    f"{self.config.max_images}")
        return found


async def _multipart(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """(filename, bytes) of every ``file`` field of a multipart body."""
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body

    try:
        form = await MultiPartParser(Headers({"content-type": content_type}), stream(), max_files=100_000,
                                     max_fields=100_000).parse()
    except (MultiPartException, ValueError) as exc:
        raise RequestError(400, f"malformed multipart body: {exc}") from None
    files = [value for key, value in form.multi_items() if key == "file"]
    if any(not isinstance(f, UploadFile) for f in files):
        raise RequestError(400, "the multipart field 'file' must hold files")
    return [(f.filename or str(i), await f.read()) for i, f in enumerate(files)]


def create_app(config: ServeConfig, guard: Guard | None = None) -> FastAPI:
    """The FastAPI app serving the guard of ``config.guard_dir`` (or ``guard``)."""
    service = GuardService(guard if guard is not None else load_guard(config.guard_dir), config)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await service.batcher.start()
        yield
        await service.batcher.stop()

    app = FastAPI(title="oodforge guard", lifespan=lifespan)
    app.state.service = service

    @app.middleware("http")
    async def guard_requests(request: Request, call_next):
        tic = time.perf_counter()
        endpoint = request.url.path
        if not service.authorized(request):
            response = JSONResponse({"error": "missing or wrong bearer token"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
        else:
            response = await call_next(request)
        known = endpoint if endpoint in ("/v1/predict", "/health", "/v1/guard", "/v1/monitor", "/metrics") else "other"
        service.metrics.requests.labels(known, str(response.status_code)).inc()
        service.metrics.latency.labels(known).observe(time.perf_counter() - tic)
        return response

    @app.post("/v1/predict")
    async def predict(request: Request):
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        try:
            found = await service.images(request)
            images = [decode(data, name, service.guard.preprocessing, service.config.max_pixels)
                      for name, data in found]
        except RequestError as exc:
            return JSONResponse({"error": exc.message, "request_id": request_id}, status_code=exc.status)
        rows = await service.batcher.submit(images)
        predictions = [{"name": name, **row} for (name, _), row in zip(found, rows, strict=True)]
        return {"request_id": request_id, "predictions": predictions}

    @app.get("/health")
    async def health():
        return {"status": "ok", "detector": None if service.config.bare else service.guard.detector_name,
                "alpha": service.guard.alpha, "bare": service.config.bare}

    @app.get("/v1/guard")
    async def guard_info():
        return service.describe()

    @app.get("/v1/monitor")
    async def monitor(limit: int = 20_000):
        if service.monitor is None:
            return JSONResponse({"error": "a bare server has no monitor"}, status_code=404)
        return service.monitor.snapshot(limit)

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
