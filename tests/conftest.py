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
def ray_local():
    """A private local cluster for this test session (address="local" never joins another one)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}})
    yield ray
    ray.shutdown()


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600):
    """Run the real ``bpo`` console script (or a python file) as a user would; returns CompletedProcess."""
    import subprocess

    bpo = Path(sys.executable).parent / "bpo"
    cmd = [str(bpo), *args] if not args[0].endswith(".py") else [sys.executable, *args]
    return subprocess.run(cmd, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
