"""Starting or joining Ray, and logging, the same way for every entry point."""

from __future__ import annotations

import logging
import os

from bpo_ray.config import ResourcesConfig

log = logging.getLogger("bpo_ray")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def init_ray(resources: ResourcesConfig) -> None:
    """Join the cluster named by ``resources.ray_address`` or ``RAY_ADDRESS`` (set by ``ray job submit``);
    otherwise join a cluster already running on this machine, or start a local one.
    ``ray_address: local`` always starts a private cluster (what tests use)."""
    import ray

    if ray.is_initialized():
        return
    # Workers inherit these: one BLAS thread per worker on small machines, quiet tokenizers.
    env_vars = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false"}
    address = resources.ray_address or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"runtime_env": {"env_vars": env_vars}, "log_to_driver": True}
    if address in (None, "local"):
        kwargs["num_cpus"] = resources.local_num_cpus
    ray.init(address=address, **kwargs)
    log.info("ray: %s", ray.cluster_resources())
