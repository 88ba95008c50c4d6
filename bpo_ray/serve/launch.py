"""Starting and stopping served models: ``deploy`` (one Serve application per model, each under its own
route prefix), ``wait_healthy``, ``undeploy``, and ``serve_until_stopped`` behind ``bpo serve``."""

from __future__ import annotations

import logging
import signal
import threading
import time

from bpo_ray.config import ConfigError, ModelConfig, RunConfig, ServeConfig, serve_problems

log = logging.getLogger(__name__)


def deploy(apps: dict[str, tuple[str, str]], cfg: ServeConfig, model: ModelConfig | None = None,
           access_log: bool = True) -> dict[str, str]:
    """Start Serve's proxy on cfg.host:cfg.port and run one application per model.

    ``apps``: name → (model path, model id); each is served under ``/<name>`` (``/`` for an app named
    "default"). ``model``: the run's model settings (dtype, attention kernel). ``access_log``: Serve's line
    per request in the replicas' logs (which reach the driver's). Returns name → OpenAI base URL.
    """
    from ray import serve

    from bpo_ray.serve.app import build_app

    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    targets, urls = [], {}
    for name, (path, model_id) in apps.items():
        prefix = "/" if name == "default" else f"/{name}"
        targets.append(serve.RunTarget(build_app(path, cfg, model_id, model), name=name, route_prefix=prefix,
                                       logging_config={"enable_access_log": access_log}))
        urls[name] = f"http://{host}:{cfg.port}{prefix.rstrip('/')}/v1"
    # The models load at once (on a cluster, a checkpoint download and load each, minutes), not one after the
    # other; this returns when every application runs, and raises if one fails to deploy.
    serve.run_many(targets)
    return urls


def undeploy(names: list[str]) -> None:
    """Delete our applications; stop Serve itself only when nothing else is left on it."""
    from ray import serve

    for name in names:  # all at once: each drains its replicas for seconds
        serve.delete(name, _blocking=False)
    deadline = time.monotonic() + 60  # as long as serve.delete waits for one
    while left := set(names) & set(serve.status().applications):
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve applications {sorted(left)} were not deleted in 60 s")
        time.sleep(0.2)
    if not serve.status().applications:
        serve.shutdown()


def wait_healthy(base_url: str, timeout_s: float = 300.0, api_key: str | None = None) -> None:
    """Block until ``GET /v1/models`` answers 200 (the proxy routes and a replica is up)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{base_url}/models", headers=headers, timeout=5.0)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as err:
            last = f"{err.__class__.__name__}: {err}"
        time.sleep(0.5)
    raise TimeoutError(f"{base_url} did not become healthy in {timeout_s:.0f}s (last: {last})")


def serve_until_stopped(cfg: RunConfig, path: str) -> int:
    """``bpo serve``: deploy the model at ``path``, print the URL, wait for Ctrl-C / SIGTERM, then take down
    what we started."""
    import sys

    from bpo_ray.runtime import init_ray, setup_logging

    setup_logging()
    problems = list(serve_problems(cfg.serve))
    if problems:
        print("error: " + "\n  ".join(problems), file=sys.stderr)
        return 2

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    init_ray(cfg.resources)
    try:
        url = deploy({"default": (path, cfg.serve.model_id)}, cfg.serve, cfg.model)["default"]
        wait_healthy(url, api_key=cfg.serve.api_key)
    except (ConfigError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        undeploy(["default"])
        return 1
    print(f"serving {path} as {cfg.serve.model_id!r} at {url} (Ctrl-C to stop)", flush=True)
    while not stop.wait(1.0):
        pass
    log.info("stopping")
    undeploy(["default"])
    print("stopped", flush=True)
    return 0
