"""Running a served guard: one uvicorn process (dynamic batching over ``workers`` threads), or a Ray Serve
deployment of ``replicas`` copies of the same app (locally, or on the cluster at ``address``)."""

from __future__ import annotations

import logging

from oodforge.serve.app import create_app
from oodforge.serve.config import ServeConfig

LOG = logging.getLogger("oodforge.serve")


def serve_uvicorn(config: ServeConfig) -> None:
    """Serve with uvicorn until interrupted."""
    import uvicorn

    app = create_app(config)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", access_log=False)


def serve_ray(config: ServeConfig, blocking: bool = True) -> str:
    """Deploy ``config.replicas`` replicas on Ray Serve, listening on ``config.host:config.port``; returns the URL.

    With ``blocking`` the call waits until interrupted, then shuts the deployment down."""
    from oodforge.serve.ray_engine import deploy

    return deploy(config, blocking=blocking)
