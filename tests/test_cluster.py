"""cluster/: launcher YAMLs validate against the schema Ray ships, KubeRay manifests use KubeRay's field
names and our Ray version, the entrypoints and configs they name exist, every stage's request fits a node
type, and a multi-node simulation places each stage on its node type."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys

import pytest
import yaml

from bpo_ray.config import load_config, validate_config
from bpo_ray.resources import node_satisfies, stage_requests
from conftest import REPO

CLUSTER = REPO / "cluster"
LAUNCHER = ["aws.yaml", "gcp.yaml"]
KUBERAY = ["raycluster.yaml", "rayjob.yaml", "rayservice.yaml"]
GPU_CONFIGS = ["configs/llava-1.5-7b.yaml", "configs/qwen2.5-vl-7b.yaml"]


def ray_version() -> str:
    pin = re.search(r'"ray\[[^\]]*\]>=([\d.]+)', (REPO / "pyproject.toml").read_text()).group(1)
    constrained = re.search(r"^ray==([\d.]+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    assert constrained.startswith(pin.rsplit(".", 1)[0]), (pin, constrained)
    return constrained


# ---------------------------------------------------------------------------------------- launcher
@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_yaml_validates_against_rays_schema(name):
    from ray.autoscaler._private.util import prepare_config
    from ray.autoscaler._private.util import validate_config as validate_launcher

    raw = yaml.safe_load((CLUSTER / name).read_text())
    validate_launcher(prepare_config(raw))  # raises on any schema violation
    assert raw["docker"]["image"].startswith(f"rayproject/ray:{ray_version()}-")
    head = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # dashboard + job server on loopback only
    assert not re.search(r"--dashboard-host=0\.0\.0\.0|--ray-client-server-port", head)
    assert any("[vllm]" in c and f"ray[data,train,serve]=={ray_version()}" in c for c in raw["setup_commands"])
    types = raw["available_node_types"]
    assert types[raw["head_node_type"]]["resources"]["CPU"] == 0
    for name_, node in types.items():
        if node["resources"].get("GPU"):
            assert node["min_workers"] == 0, f"{name_}: GPU nodes scale from zero"
            assert any(k.startswith("accelerator_type:") for k in node["resources"]), name_
    assert (REPO / raw["file_mounts"]["/home/ray/bpo-ray"]).resolve() == REPO


@pytest.mark.parametrize("name", LAUNCHER)
@pytest.mark.parametrize("config", GPU_CONFIGS)
def test_every_stage_request_fits_a_gpu_node_type_and_only_that(name, config):
    types = yaml.safe_load((CLUSTER / name).read_text())["available_node_types"]
    cfg = load_config(REPO / config)
    requests = stage_requests(cfg)
    assert set(requests) >= {"negatives.weakening", "negatives.injection", "reference", "train", "serve"}
    for stage, request in requests.items():
        fits = [t for t, node in types.items() if node_satisfies(node["resources"], request)]
        assert fits, f"{config}: no node type in {name} can run {stage} ({request})"
        assert all(types[t]["resources"].get("GPU") for t in fits), (stage, fits)  # never on CPU nodes
        wanted = request["accelerator_type"]
        assert all(f"accelerator_type:{wanted}" in types[t]["resources"] for t in fits), (stage, fits)
    train = requests["train"]
    capacity = sum(types[t]["max_workers"] * types[t]["resources"]["GPU"] for t in types
                   if node_satisfies(types[t]["resources"], train))
    assert capacity >= cfg.train.num_workers * train["num_gpus"], "not enough GPUs for the training workers"


# ------------------------------------------------------------------------------------------ KubeRay
# The KubeRay (ray.io/v1) fields these manifests use, by object; anything else is a typo.
KUBERAY_FIELDS = {
    "RayCluster.spec": {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
                        "workerGroupSpecs"},
    "autoscalerOptions": {"upscalingMode", "idleTimeoutSeconds", "resources", "env", "image"},
    "headGroupSpec": {"serviceType", "rayStartParams", "template"},
    "workerGroupSpec": {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"},
    "RayJob.spec": {"entrypoint", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "activeDeadlineSeconds",
                    "backoffLimit", "rayClusterSpec", "runtimeEnvYAML", "submissionMode"},
    "RayService.spec": {"serveConfigV2", "rayClusterConfig"},
}


def _check_cluster_spec(spec: dict, where: str) -> None:
    assert set(spec) <= KUBERAY_FIELDS["RayCluster.spec"], (where, set(spec))
    assert spec["rayVersion"] == ray_version(), where
    assert set(spec.get("autoscalerOptions", {})) <= KUBERAY_FIELDS["autoscalerOptions"]
    head = spec["headGroupSpec"]
    assert set(head) <= KUBERAY_FIELDS["headGroupSpec"] and {"rayStartParams", "template"} <= set(head)
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "no public service for the head"
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= KUBERAY_FIELDS["workerGroupSpec"], (where, set(group))
        assert {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(group)
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        accelerator = json.loads(json.loads(group["rayStartParams"]["resources"]))
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert any(k.startswith("accelerator_type:") for k in accelerator) and int(limits["nvidia.com/gpu"]) >= 1
    for pod in [head["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
        for container in pod["spec"]["containers"]:
            assert {"name", "image", "resources"} <= set(container)
            assert {"name": "RAY_AUTH_MODE", "value": "token"} in container.get("env", [])
    assert "cluster/Dockerfile" in (CLUSTER / "kuberay" / "raycluster.yaml").read_text()
    assert f"FROM rayproject/ray:{ray_version()}-" in (CLUSTER / "Dockerfile").read_text()


def _docs(name: str) -> dict:
    return {d["kind"]: d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text())}


def test_kuberay_raycluster():
    doc = _docs("raycluster.yaml")["RayCluster"]
    assert doc["apiVersion"] == "ray.io/v1"
    _check_cluster_spec(doc["spec"], "RayCluster")
    assert doc["spec"]["enableInTreeAutoscaling"] is True


def test_kuberay_rayjob_runs_our_job_with_its_config_map():
    docs = _docs("rayjob.yaml")
    job = docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1" and set(job["spec"]) <= KUBERAY_FIELDS["RayJob.spec"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    _check_cluster_spec(job["spec"]["rayClusterSpec"], "RayJob")
    entry = job["spec"]["entrypoint"].split()
    assert entry[0] == "python" and entry[1] == "/app/jobs/bpo.py" and (REPO / "jobs" / "bpo.py").is_file()
    config_path = entry[entry.index("--config") + 1]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if config_path.startswith(m["mountPath"]))
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    config_map = docs["ConfigMap"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    cfg = validate_config(yaml.safe_load(config_map["data"][config_path.rsplit("/", 1)[1]]))
    assert cfg.storage_path.startswith("s3://")  # the cluster goes away after the job
    assert all(r.get("accelerator_type") for r in stage_requests(cfg).values())


def test_kuberay_rayservice_serves_through_our_app_builder():
    from ray.serve.schema import ServeDeploySchema

    service = _docs("rayservice.yaml")["RayService"]
    assert service["apiVersion"] == "ray.io/v1" and set(service["spec"]) <= KUBERAY_FIELDS["RayService.spec"]
    _check_cluster_spec(service["spec"]["rayClusterConfig"], "RayService")
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    app = serve_config.applications[0]
    module, attr = app.import_path.split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    args = dict(app.args)
    model = args.pop("model")
    cfg = load_config(None, [f"{k}={v}" for k, v in args.items()])  # the builder's own parsing
    assert cfg.serve.engine == "vllm" and cfg.serve.accelerator_type == "L4" and model.startswith("/models/")


# ------------------------------------------------------------------------------------- simulation
@pytest.mark.slow
def test_simulated_cluster_places_each_stage_on_its_node_type():
    """Own process: the simulation starts a multi-node Ray cluster of its own."""
    done = subprocess.run([sys.executable, str(REPO / "tests" / "cluster_sim.py"), str(CLUSTER / "aws.yaml"),
                           str(REPO / "configs" / "llava-1.5-7b.yaml")],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("PLACED ")), None)
    assert done.returncode == 0 and line, done.stdout[-2000:] + done.stderr[-4000:]
    placed = json.loads(line[len("PLACED "):])
    assert placed == {"negatives.weakening": ["gpu_l4"], "negatives.injection": ["gpu_l4"], "reference": ["gpu_l4"],
                      "train": ["gpu_a100"], "serve": ["gpu_l4"]}
