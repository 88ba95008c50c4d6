"""The job on a multi-node cluster that autoscales from zero, on this machine: Ray's own autoscaler (v2) with
its fake multi-node provider (real autoscaler logic; each node a set of local Ray processes). The node
types mirror cluster/aws.yaml scaled down (no GPUs here: the L4 and A100 types are told apart by their
``accelerator_type:<T>`` resources, which is what the stages ask for). The head has no CPUs, so every
worker node the run uses is one the autoscaler started for a stage's request.

Sorted first: the cluster here must not overlap another one that trains.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import pytest

from conftest import REPO, free_ports
from ray_procs import processes_of, running, stop_processes_of

RAY = str(Path(sys.executable).parent / "ray")
NODE_TYPES = {  # cluster/aws.yaml, scaled down
    "cpu": {"resources": {"CPU": 2}, "max_workers": 1},
    "gpu_l4": {"resources": {"CPU": 2, "accelerator_type:L4": 1}, "max_workers": 1},
    "gpu_a100": {"resources": {"CPU": 4, "accelerator_type:A100": 1}, "max_workers": 2},
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
    return {"cluster_name": "bpo-fake", "max_workers": 4, "idle_timeout_minutes": 0.2, "upscaling_speed": 1.0,
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
    """head, or the NODE_TYPES entry whose accelerator resource the node has (none: cpu)."""
    if node.is_head_node:
        return "head"
    return next((name for name, spec in NODE_TYPES.items()
                 if any(key.startswith("accelerator_type:") and key in node.resources_total
                        for key in spec["resources"])), "cpu")


def _kill_training_node_after_a_checkpoint(run: Path, dashboard: str, env: dict, job: subprocess.Popen) -> str:
    """Once Ray Train has registered a checkpoint (and before training ends), kill every process of the node
    the training workers run on. Returns its node id."""
    import psutil

    from train_checkpoints import recorded_checkpoint

    deadline = time.monotonic() + 600
    # Find the node the training workers run on while they start (a state read takes seconds; the steps
    # after a checkpoint may not), then kill it the moment a checkpoint is recorded. By their actors, not
    # by node type: the autoscaler may have brought up a second A100 node that trains nothing.
    while not (run / "reference" / "manifest.json").exists():  # training is next
        assert job.poll() is None, "the job ended before training"
        assert time.monotonic() < deadline, "no scored pairs in 600 s"
        time.sleep(0.2)
    training: set[str] = set()
    while not training:
        assert job.poll() is None, "the job ended before its training workers started"
        assert time.monotonic() < deadline, "no training workers in 600 s"
        training = {a.node_id for a in _state("actors", dashboard, env)
                    if "RayTrainWorker" in a.class_name and a.state == "ALIVE"}
        time.sleep(0.5)
    assert len(training) == 1, f"the training workers were spread over nodes {training}"
    node = next(n for n in _alive_nodes(dashboard, env) if n.node_id in training)
    assert _node_type(node) == "gpu_a100"
    while not any(recorded_checkpoint(d) for d in (run / "checkpoints").glob("train-*")):
        assert job.poll() is None, "the job ended before training checkpointed"
        assert time.monotonic() < deadline, "no checkpoint in 600 s"
        time.sleep(0.2)
    assert not (run / "train" / "manifest.json").exists(), "training ended before the node could be lost"
    victims = {}
    for p in psutil.process_iter():  # the fake provider starts each node's processes with its id in their env
        try:
            if p.environ().get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") == node.node_id:
                victims[p.pid] = p
                victims.update((c.pid, c) for c in p.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    assert victims, f"no processes of node {node.node_id}"
    for p in victims.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(list(victims.values()), timeout=30)
    return node.node_id


@dataclass
class StateRow:  # the fields of Ray's NodeState / ActorState these tests read
    node_id: str
    state: str = ""
    is_head_node: bool = False
    resources_total: dict = field(default_factory=dict)
    class_name: str = ""


def _state(kind: str, dashboard: str, env: dict) -> list[StateRow]:
    """Ray's state API (list_nodes / list_actors), read in a child process that holds this cluster's token:
    Ray keeps the first token a process loads, and this process must keep none for the clusters that
    other tests start."""
    code = ("import dataclasses, json, sys\nfrom ray.util.state import list_actors, list_nodes\n"
            f"rows = list_{kind}(address=sys.argv[1], detail=True, limit=10000)\n"
            "print(json.dumps([dataclasses.asdict(r) for r in rows], default=str))")
    done = subprocess.run([sys.executable, "-c", code, dashboard], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    names = {f.name for f in fields(StateRow)}
    return [StateRow(**{k: v for k, v in row.items() if k in names}) for row in json.loads(done.stdout)]


def _alive_nodes(dashboard: str, env: dict) -> list[StateRow]:
    return [n for n in _state("nodes", dashboard, env) if n.state == "ALIVE"]


# Enough steps that the training node is lost mid-run: 8 (two epochs of these pairs) once ended within the
# few seconds between the first recorded checkpoint and the kill.
STEPS = 16


@pytest.mark.slow
def test_stages_bring_up_their_node_types_from_zero_survive_a_lost_node_and_go_away(autoscaling_cluster, tmp_path):
    gcs_address, dashboard, env = autoscaling_cluster
    assert [_node_type(n) for n in _alive_nodes(dashboard, env)] == ["head"]  # nothing but the head to start with

    # Each stage asks for its node type, as configs/llava-1.5-7b.yaml does on aws.yaml (L4 for generation,
    # reference scoring and serving, A100 for DPO), at a size this machine can hold.
    l4 = {"num_cpus": 1, "accelerator_type": "L4"}
    overrides = [f"storage_path={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}",
                 f"resources.ray_address={gcs_address}", "sft.enabled=false", "data.synthetic.num_images=6",
                 "negatives.weakening.sampling.max_new_tokens=8", "negatives.truncated=keep",
                 f"train.max_steps={STEPS}", f"train.epochs={STEPS}", "train.checkpoint_every=2", "train.num_workers=2", "resources.cpus_per_worker=1",
                 "resources.accelerator_type=A100", "eval.num_images=4", f"serve.port={free_ports()[0]}",
                 *[f"{pool}.{k}={v}" for pool in ("negatives.weakening.pool", "train.reference_pool")
                   for k, v in {**l4, "min_size": 1, "max_size": 1}.items()],
                 "serve.num_cpus_per_replica=1", "serve.accelerator_type=L4"]
    run = tmp_path / "runs" / "bpo-tiny"
    log = tmp_path / "job.log"
    with open(log, "w") as out:
        job = subprocess.Popen([sys.executable, "jobs/bpo.py", "--config", "configs/tiny.yaml", *overrides],
                               cwd=REPO, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=subprocess.STDOUT)
    try:
        # Mid-training, the training node goes away (every process of it killed, as a lost VM): the autoscaler
        # brings up another and Ray Train resumes from the last checkpoint.
        lost = _kill_training_node_after_a_checkpoint(run, dashboard, env, job)
        assert job.wait(timeout=900) == 0, log.read_text()[-4000:]
    finally:
        if job.poll() is None:
            job.kill()
    train = json.loads((run / "train" / "manifest.json").read_text())
    assert train["finished"] and train["steps"] == STEPS
    logged = [json.loads(line)["step"] for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(logged)) == list(range(1, STEPS + 1)) and logged[-1] == STEPS, logged  # no step lost
    assert (run / "model" / "model.safetensors").is_file()
    report = json.loads((run / "report.json").read_text())
    assert set(report["eval"]) == {"base", "aligned"}

    # Where each stage's actors ran, from Ray's state API (nodes that have since gone are still listed).
    type_of = {n.node_id: _node_type(n) for n in _state("nodes", dashboard, env)}
    actors = _state("actors", dashboard, env)
    placed: dict[str, set[str]] = {}
    for actor in actors:
        for stage, marker in (("negatives.weakening", "HFGenerator"), ("reference", "ReferenceScorer"),
                              ("train", "RayTrainWorker"), ("serve", "ChatServer")):
            if marker in actor.class_name:
                placed.setdefault(stage, set()).add(type_of[actor.node_id])
    assert placed == {"negatives.weakening": {"gpu_l4"}, "reference": {"gpu_l4"}, "train": {"gpu_a100"},
                      "serve": {"gpu_l4"}}, placed
    assert {"gpu_l4", "gpu_a100"} <= set(type_of.values())
    trained_on = {a.node_id for a in actors if "RayTrainWorker" in a.class_name}
    assert lost in trained_on and len(trained_on) == 2  # the lost node, then its replacement

    # Idle nodes are removed: back to the head alone (a deadline only against an autoscaler that never acts).
    deadline = time.monotonic() + 180
    while (alive := [_node_type(n) for n in _alive_nodes(dashboard, env)]) != ["head"]:
        assert time.monotonic() < deadline, f"still up 180 s after the job: {alive}"
        time.sleep(1)
