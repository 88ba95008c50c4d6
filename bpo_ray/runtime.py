"""Starting or joining Ray, and logging, the same way for every entry point."""

from __future__ import annotations

import json
import logging
import os

from bpo_ray.config import ResourcesConfig

log = logging.getLogger("bpo_ray")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per evaluation request otherwise


def setup_worker_logging(level: str = "INFO") -> None:
    """In a Ray worker: our own progress lines at INFO (they reach the driver's and the job's log), without
    turning on every library's INFO logging the way a root-level config would."""
    lib = logging.getLogger("bpo_ray")
    if not lib.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        lib.addHandler(handler)
    lib.setLevel(level)
    lib.propagate = False


def init_ray(resources: ResourcesConfig) -> None:
    """Join the cluster named by ``resources.ray_address`` or ``RAY_ADDRESS`` (set by ``ray job submit``);
    otherwise join a cluster already running on this machine, or start a local one.
    ``ray_address: local`` always starts a private cluster (what tests use)."""
    import ray

    if ray.is_initialized():
        return
    import ray.data
    # Workers inherit these: one BLAS thread per worker on small machines, quiet tokenizers.
    env_vars = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false"}
    # A submitted job (ray job submit) already has a runtime env; Ray refuses to merge one that sets the
    # same variables again, so add only what the job's does not say.
    for key in _job_env_vars():
        env_vars.pop(key, None)
    address = resources.ray_address or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"runtime_env": {"env_vars": env_vars} if env_vars else None, "log_to_driver": True}
    if address in (None, "local"):
        kwargs["num_cpus"] = resources.local_num_cpus
    context = ray.init(address=address, **kwargs)
    # One progress bar per dataset (done/total, rate, ETA), not one per operator on top of it.
    ray.data.DataContext.get_current().enable_operator_progress_bars = False
    log.info("ray: %s", ray.cluster_resources())
    if context.dashboard_url:
        log.info("ray dashboard: http://%s", context.dashboard_url)


def _job_env_vars() -> set[str]:
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return set()
    try:
        return set((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
    except (json.JSONDecodeError, AttributeError):
        return set()
