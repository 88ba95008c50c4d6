"""The job on a multi-node cluster that autoscales from zero, on this machine: Ray's own autoscaler (v2) with
its fake multi-node provider (real autoscaler logic; each node a set of local Ray processes). The node
types mirror cluster/aws.yaml scaled down (no GPUs here: the L4 and A100 types are told apart by their
``accelerator_type:<T>`` resources, which is what the stages ask for). The head has no CPUs, so every
worker node the run uses is one the autoscaler started for a stage's request.

Sorted first: the cluster here must not overlap another one that trains.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, free_ports
from ray_procs import processes_of, running, stop_processes_of

RAY = str(Path(sys.executable).parent / "ray")
NODE_TYPES = {  # cluster/aws.yaml, scaled down
    "cpu": {"resources": {"CPU": 2}, "max_workers": 1},
    "gpu_l4": {"resources": {"CPU": 2, "accelerator_type:L4": 1}, "max_workers": 1},
    "gpu_a100": {"resources": {"CPU": 4, "accelerator_type:A100": 1}, "max_workers": 1},
}


def _autoscaler_config(gcs_address: str) -> dict:
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    # "external" with the fake provider's class: Ray's wheel lacks the defaults file of type fake_multinode.
    provider = {"type": "external",
                "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                "gcs_address": gcs_address, "head_node_id": FAKE_HEAD_NODE_ID, "launch_multiple": True,
                "disable_launch_config_check": True, "disable_node_updaters": True}
    types = {name: {**spec, "min_workers": 0, "node_config": {}} for name, spec in NODE_TYPES.items()}
    types["ray.head.default"] = {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}
    return {"cluster_name": "bpo-fake", "max_workers": 3, "idle_timeout_minutes": 0.2, "upscaling_speed": 1.0,
            "provider": provider, "auth": {"ssh_user": "ray"}, "head_node_type": "ray.head.default",
            "available_node_types": types, "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": []}


@pytest.fixture(scope="module")
def autoscaling_cluster():
    """A head with no CPUs and an autoscaler that may start one node of each type. Yields (gcs address,
    dashboard URL, env with the cluster's token); stops exactly its own processes (worker nodes included)."""
    from ray._private.services import get_node_ip_address
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    temp_dir = tempfile.mkdtemp(prefix="bpo-as-", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dashboard, client, agent, agent_grpc, metrics, runtime_env = free_ports(7)
    marks = (f"--port={client}",)
    gcs_address = f"{get_node_ip_address()}:{gcs}"
    config = Path(temp_dir) / "autoscaler.json"
    config.write_text(json.dumps(_autoscaler_config(gcs_address)))
    token = Path(temp_dir) / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    head_env = {**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_enable_autoscaler_v2": "1",
                "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}
    started = subprocess.run(
        [RAY, "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={runtime_env}", "--num-cpus=0", f"--temp-dir={temp_dir}",
         f"--autoscaling-config={config}", "--disable-usage-stats"],
        capture_output=True, text=True, env=head_env, timeout=300)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield gcs_address, f"http://127.0.0.1:{dashboard}", env
    finally:
        stop_processes_of(temp_dir, *marks)
        assert not running(processes_of(temp_dir, *marks))


def _node_type(node) -> str:
    if node.is_head_node:
        return "head"
    return next((name for name, spec in NODE_TYPES.items() if set(spec["resources"]) - {"CPU"} <= set(
        node.resources_total) and set(spec["resources"]) - {"CPU"}), "cpu")


def _alive_nodes(dashboard: str) -> list:
    from ray.util.state import list_nodes

    return [n for n in list_nodes(address=dashboard, detail=True, limit=1000) if n.state == "ALIVE"]


@pytest.mark.slow
def test_stages_bring_up_their_node_types_from_zero_and_they_go_away(autoscaling_cluster, tmp_path, monkeypatch):
    from ray.util.state import list_actors, list_nodes

    gcs_address, dashboard, env = autoscaling_cluster
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", env["RAY_AUTH_TOKEN_PATH"])  # for the state API reads below
    assert [_node_type(n) for n in _alive_nodes(dashboard)] == ["head"]  # nothing but the head to start with

    # Each stage asks for its node type, as configs/llava-1.5-7b.yaml does on aws.yaml (L4 for generation,
    # reference scoring and serving, A100 for DPO), at a size this machine can hold.
    l4 = {"num_cpus": 1, "accelerator_type": "L4"}
    overrides = [f"storage_path={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}",
                 f"resources.ray_address={gcs_address}", "sft.enabled=false", "data.synthetic.num_images=6",
                 "negatives.weakening.sampling.max_new_tokens=8", "negatives.truncated=keep",
                 "train.max_steps=2", "train.num_workers=2", "resources.cpus_per_worker=1",
                 "resources.accelerator_type=A100", "eval.num_images=4", f"serve.port={free_ports()[0]}",
                 *[f"{pool}.{k}={v}" for pool in ("negatives.weakening.pool", "train.reference_pool")
                   for k, v in {**l4, "min_size": 1, "max_size": 1}.items()],
                 "serve.num_cpus_per_replica=1", "serve.accelerator_type=L4"]
    job = subprocess.run([sys.executable, "jobs/bpo.py", "--config", "configs/tiny.yaml", *overrides], cwd=REPO,
                         env={**env, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stderr[-4000:]
    run = tmp_path / "runs" / "bpo-tiny"
    report = json.loads((run / "report.json").read_text())
    assert set(report["eval"]) == {"base", "aligned"}

    # Where each stage's actors ran, from Ray's state API (nodes that have since gone are still listed).
    type_of = {n.node_id: _node_type(n) for n in list_nodes(address=dashboard, detail=True, limit=1000)}
    placed: dict[str, set[str]] = {}
    for actor in list_actors(address=dashboard, detail=True, limit=10000):
        for stage, marker in (("negatives.weakening", "HFGenerator"), ("reference", "ReferenceScorer"),
                              ("train", "RayTrainWorker"), ("serve", "ChatServer")):
            if marker in actor.class_name:
                placed.setdefault(stage, set()).add(type_of[actor.node_id])
    assert placed == {"negatives.weakening": {"gpu_l4"}, "reference": {"gpu_l4"}, "train": {"gpu_a100"},
                      "serve": {"gpu_l4"}}, placed
    assert {"gpu_l4", "gpu_a100"} <= set(type_of.values())

    # Idle nodes are removed: back to the head alone (a deadline only against an autoscaler that never acts).
    deadline = time.monotonic() + 180
    while (alive := [_node_type(n) for n in _alive_nodes(dashboard)]) != ["head"]:
        assert time.monotonic() < deadline, f"still up 180 s after the job: {alive}"
        time.sleep(1)
