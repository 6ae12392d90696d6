"""``oodforge serve``: a guard over HTTP (uvicorn with dynamic batching, or Ray Serve replicas)."""

from __future__ import annotations

from pathlib import Path

import typer


def serve(guard_dir: Path = typer.Argument(..., help="A guard folder (from oodforge guard build)."),
          host: str = typer.Option("127.0.0.1", help="Address to listen on (default: this machine only)."),
          port: int = typer.Option(8000, help="Port to listen on."),
          max_batch: int = typer.Option(64, help="Most images per model batch."),
          max_delay_ms: float = typer.Option(5.0, help="How long a request waits for others to batch with."),
          workers: int = typer.Option(1, help="Model threads running batches concurrently."),
          token_file: Path | None = typer.Option(None, help="File holding a bearer token every request but "
                                                 "/health must carry (Authorization: Bearer TOKEN)."),
          max_body_mb: float = typer.Option(20.0, help="Largest request body (MiB)."),
          max_images: int = typer.Option(256, help="Most images per request."),
          max_pixels: int = typer.Option(4096 * 4096, help="Most pixels per image (larger ones are refused)."),
          window: int = typer.Option(500, help="Images in the drift monitor's sliding window."),
          monitor_log: Path | None = typer.Option(None, help="Append the monitor's records (JSON lines) here, for "
                                                  "oodforge monitor."),
          webhook: str | None = typer.Option(None, help="URL to POST the monitor's state to when the alarm "
                                             "raises or clears."),
          bare: bool = typer.Option(False, "--bare", help="Serve the network alone (class and probability, no "
                                                          "OOD decision): the baseline for the guard's cost."),
          engine: str = typer.Option("uvicorn", help="uvicorn (one process) or ray (Ray Serve replicas)."),
          replicas: int = typer.Option(1, help="With --engine ray: replicas of the guard."),
          address: str | None = typer.Option(None, help="With --engine ray: the Ray cluster (auto, "
                                                        "ray://HEAD:10001); default: a local Ray instance.")) -> None:
    """Serve a guard over HTTP: POST /v1/predict, GET /health, /v1/guard, /v1/monitor, /metrics."""
    from oodforge.deploy.artifact import read_guard_file
    from oodforge.serve.config import ServeConfig
    from oodforge.serve.engines import serve_ray, serve_uvicorn

    config = ServeConfig(guard_dir=guard_dir, host=host, port=port, max_batch=max_batch, max_delay_ms=max_delay_ms,
                         workers=workers, token_file=token_file, max_body_mb=max_body_mb, max_images=max_images,
                         max_pixels=max_pixels, window=window, monitor_log=monitor_log, webhook=webhook, bare=bare,
                         engine=engine, replicas=replicas, address=address)
    config.token()
    read_guard_file(guard_dir)  # a bad guard folder is one error line before any server starts
    if engine == "ray":
        serve_ray(config)
    else:
        serve_uvicorn(config)
