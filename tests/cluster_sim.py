"""Multi-node simulation (run by tests/test_cluster.py in its own process): a head and three node types from
cluster/aws.yaml on one machine (``ray.cluster_utils.Cluster``; their GPUs are declared, not real), then
every stage's actors scheduled with the exact requests the stages make (``bpo_ray.resources``) through the
same Ray APIs (Ray Data actor pools, replica actors, one placement-group bundle per training worker as
Ray Train reserves them). Prints JSON: stage → node types its actors landed on."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ray
import yaml
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from bpo_ray.config import load_config
from bpo_ray.resources import pool_request, serve_replica_request, train_worker_request


class _Where:
    def __call__(self, batch):
        batch["node_type"] = [ray.get_runtime_context().get_node_id()] * len(batch["id"])
        return batch


def start_cluster(spec: dict) -> tuple[Cluster, dict[str, str]]:
    """Node types scaled down 8× in CPUs so they fit a laptop; GPUs and accelerator labels as declared.
    Returns the cluster and node id → node type."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"node:type:head": 1}})
    node_type_of = {cluster.head_node.node_id: "head"}
    try:
        for name in ("cpu", "gpu_l4", "gpu_a100"):
            res = dict(spec["available_node_types"][name]["resources"])
            cpus, gpus = res.pop("CPU"), res.pop("GPU", 0)
            node = cluster.add_node(num_cpus=max(2, cpus // 8), num_gpus=gpus, resources=res)
            node_type_of[node.node_id] = name
    except BaseException:
        cluster.shutdown()
        raise
    return cluster, node_type_of


def start_cluster_retrying_once(spec: dict) -> tuple[Cluster, dict[str, str]]:
    """Start-up on a busy machine can outlast Ray's fixed waits (a raylet has 30 s to register; the GCS wait
    is raised by RAY_gcs_server_port_wait_time_s): one more try, said on stderr, before failing."""
    try:
        return start_cluster(spec)
    except Exception as err:  # Ray raises plain Exceptions for start-up timeouts
        print(f"cluster start failed, retrying once: {err.__class__.__name__}: {err}", file=sys.stderr, flush=True)
        return start_cluster(spec)


def main(cluster_yaml: str, run_config: str) -> dict:
    spec = yaml.safe_load(Path(cluster_yaml).read_text())
    cluster, node_type_of = start_cluster_retrying_once(spec)
    ray.init(address=cluster.address)
    cfg = load_config(run_config, ["train.num_workers=2", "resources.cpus_per_worker=2",
                                   *[f"{p}.num_cpus=1" for p in ("negatives.weakening.pool",
                                                                 "negatives.injection.pool",
                                                                 "train.reference_pool")],
                                   "serve.num_cpus_per_replica=1"])
    placed: dict[str, list[str]] = {}

    # Generation and reference scoring: Ray Data actor pools with the pool's request (as the stages do).
    for stage, pool in (("negatives.weakening", cfg.negatives.weakening.pool),
                        ("negatives.injection", cfg.negatives.injection.pool),
                        ("reference", cfg.train.reference_pool)):
        ds = ray.data.range(4, override_num_blocks=2).map_batches(
            _Where, batch_size=2, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1), **pool_request(pool))
        placed[stage] = sorted({node_type_of[row["node_type"]] for row in ds.take_all()})

    # Training: one bundle per worker, the way Ray Train reserves its workers.
    request = train_worker_request(cfg)
    bundle = {"CPU": request["num_cpus"], "GPU": request["num_gpus"],
              f"accelerator_type:{request['accelerator_type']}": 0.001}
    group = placement_group([bundle] * cfg.train.num_workers)
    ray.get(group.ready(), timeout=60)
    where = ray.get([ray.remote(lambda: ray.get_runtime_context().get_node_id()).options(
        num_cpus=request["num_cpus"], num_gpus=request["num_gpus"],
        scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)).remote()
        for i in range(cfg.train.num_workers)])
    placed["train"] = sorted({node_type_of[n] for n in where})

    # Serving replicas: actors with the replica request (what deployment_options passes to Serve).
    replica = ray.remote(_Where).options(**serve_replica_request(cfg.serve)).remote()
    node = ray.get(replica.__call__.remote({"id": [0]}))["node_type"][0]
    placed["serve"] = [node_type_of[node]]
    ray.shutdown()
    cluster.shutdown()
    return placed


if __name__ == "__main__":
    print("PLACED " + json.dumps(main(sys.argv[1], sys.argv[2])))
