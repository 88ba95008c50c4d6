"""What each stage asks Ray for, in one place: the stages schedule with these, the cluster configs
(cluster/) provide node types that satisfy them, and tests check the two agree.

A request is Ray's resource vocabulary: ``num_cpus``, ``num_gpus``, ``accelerator_type`` (Ray turns it
into the ``accelerator_type:<T>`` node resource that GPU nodes advertise) and ``memory`` in bytes.
"""

from __future__ import annotations

from bpo_ray.config import ActorPoolConfig, RunConfig, ServeConfig

GiB = 1024**3


def _request(num_cpus: float, num_gpus: float, accelerator_type: str | None, memory_gb: float | None) -> dict:
    request: dict = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if accelerator_type:
        request["accelerator_type"] = accelerator_type
    if memory_gb:
        request["memory"] = int(memory_gb * GiB)
    return request


def torch_threads(num_cpus: float) -> int:
    """Intra-op threads for an actor that reserved ``num_cpus``: more would oversubscribe the node."""
    return max(1, int(num_cpus))


def pool_request(pool: ActorPoolConfig) -> dict:
    """Ray remote args of one actor in a Ray Data actor pool (generation, reference scoring)."""
    return _request(pool.num_cpus, pool.num_gpus, pool.accelerator_type, pool.memory_gb)


def train_worker_request(cfg: RunConfig) -> dict:
    res = cfg.resources
    return _request(res.cpus_per_worker, res.gpus_per_worker if res.use_gpu else 0.0, res.accelerator_type,
                    res.memory_gb_per_worker)


def serve_replica_request(serve: ServeConfig) -> dict:
    return _request(serve.num_cpus_per_replica, serve.num_gpus_per_replica, serve.accelerator_type,
                    serve.memory_gb_per_replica)


def serve_scaling(serve: ServeConfig) -> dict:
    """Serve deployment options for replica count: fixed when min == max, else autoscaling."""
    if serve.min_replicas == serve.max_replicas:
        return {"num_replicas": serve.max_replicas}
    return {"autoscaling_config": {"min_replicas": serve.min_replicas, "max_replicas": serve.max_replicas,
                                   "target_ongoing_requests": serve.target_ongoing_requests}}


def stage_requests(cfg: RunConfig) -> dict[str, dict]:
    """Per stage (and worker kind), what one of its actors needs; stages that need nothing special
    (data, rules injection, report) run on any CPU."""
    neg = cfg.negatives
    out = {}
    if neg.weakening.enabled:
        out["negatives.weakening"] = pool_request(neg.weakening.pool)
    if neg.injection.enabled and neg.injection.engine != "rules":
        out["negatives.injection"] = pool_request(neg.injection.pool)
    if cfg.train.reference == "precomputed":
        out["reference"] = pool_request(cfg.train.reference_pool)
    out["train"] = train_worker_request(cfg)
    out["serve"] = serve_replica_request(cfg.serve)
    return out


def node_satisfies(node_resources: dict[str, float], request: dict) -> bool:
    """Whether a node type (cluster-launcher ``resources``: CPU, GPU, memory, accelerator_type:T, ...)
    can hold one actor with this request."""
    need = {"CPU": request.get("num_cpus", 0), "GPU": request.get("num_gpus", 0),
            "memory": request.get("memory", 0)}
    if request.get("accelerator_type"):
        need[f"accelerator_type:{request['accelerator_type']}"] = 0.001
    return all(node_resources.get(k, 0) >= v for k, v in need.items() if v and (k != "memory" or "memory" in node_resources))
