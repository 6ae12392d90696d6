"""``ServeConfig``: how a guard is served (address, batching, limits, auth, monitoring), checked at the door."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from oodforge.util.errors import ConfigError, MissingPathError

ENGINES = ("uvicorn", "ray")


@dataclass(frozen=True)
class ServeConfig:
    """A served guard's settings. ``bare`` serves the network alone (class and probability, no OOD decision), to
    measure what the guard costs behind the same server."""

    guard_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 64
    max_delay_ms: float = 5.0
    workers: int = 1
    token_file: Path | None = None
    max_body_mb: float = 20.0
    max_images: int = 256
    max_pixels: int = 4096 * 4096
    window: int = 500
    monitor_log: Path | None = None
    webhook: str | None = None
    bare: bool = False
    engine: str = "uvicorn"
    replicas: int = 1
    address: str | None = None

    def __post_init__(self) -> None:
        checks = [("--port", 0 <= self.port <= 65535, "in [0, 65535]"),
                  ("--max-batch", self.max_batch >= 1, ">= 1"), ("--max-delay-ms", self.max_delay_ms >= 0, ">= 0"),
                  ("--workers", self.workers >= 1, ">= 1"), ("--max-body-mb", self.max_body_mb > 0, "> 0"),
                  ("--max-images", self.max_images >= 1, ">= 1"), ("--max-pixels", self.max_pixels >= 1, ">= 1"),
                  ("--window", self.window >= 10, ">= 10"), ("--replicas", self.replicas >= 1, ">= 1")]
        for flag, ok, rule in checks:
            if not ok:
                raise ConfigError(f"{flag} must be {rule}, got {getattr(self, flag[2:].replace('-', '_'))!r}")
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.replicas > 1 and self.engine != "ray":
            raise ConfigError("--replicas needs --engine ray")
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            if self.host != "localhost":
                raise ConfigError(f"--host must be an IP address or localhost, got {self.host!r}") from None
        if self.token_file is not None and not Path(self.token_file).is_file():
            raise MissingPathError(f"--token-file not found: {self.token_file}")
        if self.webhook is not None and not self.webhook.startswith(("http://", "https://")):
            raise ConfigError(f"--webhook must be an http(s) URL, got {self.webhook!r}")

    @property
    def max_body_bytes(self) -> int:
        """The largest request body accepted, in bytes."""
        return int(self.max_body_mb * 2**20)

    def token(self) -> str | None:
        """The bearer token from ``token_file`` (stripped), or None when auth is off; an empty file is refused."""
        if self.token_file is None:
            return None
        token = Path(self.token_file).read_text().strip()
        if not token:
            raise ConfigError(f"--token-file {self.token_file} is empty")
        return token
