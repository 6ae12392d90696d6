"""Ray Serve engine: ``config.replicas`` replicas, each running the app ``create_app(config)`` builds (Ray Serve's
FastAPI ingress with a builder function, so the endpoints exist once), behind Ray Serve's HTTP proxy on
``config.host:config.port``; on a local Ray instance, or on the cluster at ``config.address``."""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from oodforge.serve.app import create_app
from oodforge.serve.config import ServeConfig
from oodforge.util.errors import ConfigError

APP_NAME = "oodforge"
DEPLOYMENT_NAME = "guard"
_STATE: dict = {"local": False}


def application(config: ServeConfig):
    """The Ray Serve application: ``config.replicas`` replicas that each build the guard's app when they start.

    A replica takes up to ``config.max_batch`` requests at once, so the app's dynamic batcher can fill a batch."""
    from ray import serve

    def build_app():
        return create_app(config)

    ingress = serve.ingress(build_app)()
    deployment = serve.deployment(ingress, name=DEPLOYMENT_NAME, num_replicas=config.replicas,
                                  max_ongoing_requests=max(config.max_batch, 5), ray_actor_options={"num_cpus": 1},
                                  logging_config={"log_level": "WARNING", "enable_access_log": False})
    return deployment.bind()


def absolute_paths(config: ServeConfig) -> ServeConfig:
    """``config`` with its files as absolute paths: replicas need not share this process's working folder."""
    absolute = {name: Path(value).resolve() for name in ("guard_dir", "token_file", "monitor_log")
                if (value := getattr(config, name)) is not None}
    return replace(config, **absolute)


def deploy(config: ServeConfig, blocking: bool = True) -> str:
    """Deploy the guard of ``config`` on Ray Serve and return its URL; with ``blocking``, serve until interrupted
    (Ctrl-C), then shut down."""
    import ray
    from ray import serve

    config = absolute_paths(config)
    cpus = os.cpu_count() or 1
    if config.address is None and config.replicas > cpus:
        raise ConfigError(f"--replicas {config.replicas} needs {config.replicas} CPUs; this machine has {cpus} "
                          "(give --address of a Ray cluster for more)")
    if not ray.is_initialized():
        if config.address is not None:
            ray.init(address=config.address, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
            _STATE["local"] = True
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(application(config), name=APP_NAME, route_prefix="/")
    except BaseException:
        shutdown()
        raise
    url = f"http://{config.host}:{config.port}"
    if not blocking:
        return url
    print(f"oodforge: serving {config.guard_dir} at {url} with {config.replicas} Ray Serve replica(s); "
          "Ctrl-C stops it", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        shutdown()
    return url


def shutdown() -> None:
    """Take the guard's deployment down: on the local Ray instance ``deploy`` started, Serve and Ray stop; on a
    cluster, the application is deleted and this process disconnects."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        if _STATE["local"]:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    finally:
        ray.shutdown()
        _STATE["local"] = False
