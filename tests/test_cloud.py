"""Cloud storage and an installed package, as users on a cluster have them.

An S3 API server on loopback (moto's server mode, as Ray's own tests use it) stands in for S3; everything
reaches it through the standard AWS settings (``AWS_ENDPOINT_URL``, credentials in the environment).
The end-to-end test installs the wheel into a fresh virtualenv outside the checkout and runs the job from
there with its run directory, data and images in the bucket.

Sorted before the tests that share the session's Ray cluster: the jobs here start their own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from bpo_ray import storage
from conftest import REPO, build_wheel, free_ports, run_cli

BUCKET = "bpo-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3 API on loopback for this module; the environment a user's nodes would have (endpoint,
    credentials) is set for this process and the jobs it starts. Yields that environment."""
    import httpx

    server = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    assert server, "moto_server not installed: pip install 'moto[server]' (part of the dev extra)"
    port = free_ports()[0]
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:  # ends when the server answers or exits (a deadline only against a wedged start)
        if proc.poll() is not None:
            pytest.fail(f"moto_server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(endpoint, timeout=2).status_code < 500:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"moto_server did not answer in 120 s: {log.read_text()[-2000:]}"
        time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir(BUCKET)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    proc.terminate()
    proc.wait(timeout=30)


def _files(uri: str) -> dict[str, bytes]:
    fs, root = storage.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root) + 1:]: storage.read_bytes(f"s3://{i.path}") for i in infos
            if i.type == pafs.FileType.File}


# ------------------------------------------------------------------------------------------- URIs
def test_uri_handling_is_the_same_for_s3_gs_and_local_paths(tmp_path):
    assert storage.is_uri("s3://b/k") and storage.is_uri("gs://b/k")
    assert not storage.is_uri("runs/x") and not storage.is_uri("file:///tmp/x")
    assert storage.absolute("gs://b/runs") == "gs://b/runs" and storage.absolute("file:///tmp/x") == "/tmp/x"
    assert storage.join("gs://b/runs/", "/bpo/", "model") == "gs://b/runs/bpo/model"
    fs, path = storage.resolve("gs://b/runs/bpo")
    assert type(fs).__name__ == "GcsFileSystem" and path == "b/runs/bpo"
    assert storage.local_dir(str(tmp_path)) == str(tmp_path)  # local paths are used where they are


def test_a_model_on_s3_is_copied_once_per_version(s3, tmp_path):
    fs, path = storage.resolve(f"s3://{BUCKET}/models/m")
    assert type(fs).__name__ == "S3FileSystem" and path == f"{BUCKET}/models/m"
    uri = f"s3://{BUCKET}/models/m"
    storage.write_text(f"{uri}/config.json", '{"v": 1}')
    storage.write_bytes(f"{uri}/sub/weights.bin", b"\x00" * 1000)
    first = storage.local_dir(uri, str(tmp_path))
    assert json.loads(Path(first, "config.json").read_text()) == {"v": 1}
    assert Path(first, "sub", "weights.bin").stat().st_size == 1000
    assert storage.local_dir(uri, str(tmp_path)) == first  # unchanged: not fetched again
    storage.write_text(f"{uri}/config.json", '{"v": 22}')  # rewritten in place, as a re-run stage does
    second = storage.local_dir(uri, str(tmp_path))
    assert second != first and json.loads(Path(second, "config.json").read_text()) == {"v": 22}
    with pytest.raises(FileNotFoundError):
        storage.local_dir(f"s3://{BUCKET}/models/none", str(tmp_path))


def test_training_log_on_s3_goes_on_after_a_restart_elsewhere(s3):
    from bpo_ray.train.worker import TrainingLog

    out = f"s3://{BUCKET}/runs/log/train"
    first = TrainingLog(out, trainable=1, total=2)
    for step in (1, 2):
        first.log({"step": step, "loss": 1.0 / step, "lr": 1e-3})
    first.sync()  # at a checkpoint
    first.log({"step": 3, "loss": 0.3, "lr": 1e-3})  # after it: lost with the node, as the step is
    first._scratch.cleanup()  # the node goes away
    second = TrainingLog(out, trainable=1, total=2)  # the restarted worker, from the bucket alone
    second.log({"step": 3, "loss": 0.25, "lr": 1e-3})
    second.close()
    files = _files(out)
    steps = [json.loads(line)["step"] for line in files["metrics.jsonl"].decode().splitlines()]
    assert steps == [1, 2, 3]
    assert sum(name.startswith("tb/events.out.tfevents") for name in files) == 2  # one per writer


def test_bpo_generate_reads_its_records_and_writes_its_pairs_in_the_bucket(s3, tmp_path):
    """``bpo generate`` with every path a URI, as a user with data in a bucket runs it: the records and images
    are read from the bucket and the pairs written there, nothing under the working directory (its flags were
    made local paths: s3://b/x became ./s3:/b/x, and the records were then "not found")."""
    from bpo_ray.data.synthetic import write_dataset

    storage.upload_dir(str(write_dataset(tmp_path / "data", num_images=4, seed=5, max_objects=2)),
                       f"s3://{BUCKET}/gen-data")
    out = f"s3://{BUCKET}/runs/gen"
    work = tmp_path / "work"
    work.mkdir()
    done = run_cli("generate", "--data", f"s3://{BUCKET}/gen-data/records.json", "--image-root",
                   f"s3://{BUCKET}/gen-data", "--out", out, "resources.ray_address=local", "sft.enabled=false",
                   "negatives.weakening.enabled=false", f"cache_dir={tmp_path / 'cache'}", cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    files = _files(out)
    records = json.loads(files["data/manifest.json"])
    assert records["finished"] and records["records_in"] == 8 and records["records_rejected"] == 0
    pairs = json.loads(files["negatives/manifest.json"])
    assert pairs["finished"] and pairs["pairs"] > 0
    assert any(name.startswith("negatives/pairs/") and name.endswith(".parquet") for name in files)
    assert list(work.iterdir()) == []


# ------------------------------------------------------------------ the installed job, on S3
def _run(*cmd) -> str:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    assert done.returncode == 0, (cmd, done.stdout[-2000:], done.stderr[-4000:])
    return done.stdout


def _fresh_venv(tmp: Path) -> Path:
    """A virtualenv outside the checkout with the wheel built from it installed. Its dependencies come from
    the test environment's site-packages (a .pth file), so nothing is downloaded; that directory's own
    .pth files (the editable install of the checkout) are not processed, so bpo_ray is the wheel's."""
    wheel = build_wheel(tmp)
    venv = tmp / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    purelib = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    Path(purelib, "_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel)
    return venv


def _job_env(s3_env: dict, tmpdir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, **s3_env, "TMPDIR": str(tmpdir), "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_installed_job_runs_on_s3_and_resumes_from_the_bucket_alone(s3, tmp_path):
    from bpo_ray.config import load_config
    from bpo_ray.data.synthetic import write_dataset

    venv = _fresh_venv(tmp_path)
    located = subprocess.run([str(venv / "bin" / "python"), "-c", "import bpo_ray; print(bpo_ray.__file__)"],
                             capture_output=True, text=True, cwd=tmp_path, env=_job_env(s3, tmp_path))
    assert located.stdout.startswith(str(venv)), located  # the wheel's package, not the checkout's

    data = write_dataset(tmp_path / "data", num_images=8, seed=5, max_objects=2)
    storage.upload_dir(str(data), f"s3://{BUCKET}/data")
    runs = f"s3://{BUCKET}/runs"
    overrides = [
        f"storage_path={runs}", "cache_dir=cache", "resources.ray_address=local",
        "data.format=llava_json", f"data.path=s3://{BUCKET}/data/records.json", f"data.image_root=s3://{BUCKET}/data",
        "sft.max_steps=2", "sft.data.synthetic.num_images=8", "sft.per_device_batch_size=4", "sft.checkpoint_every=1",
        "train.max_steps=3", "train.checkpoint_every=2", "negatives.weakening.sampling.max_new_tokens=8",
        "negatives.truncated=keep", "eval.num_images=4",
        "negatives.existence.enabled=false"]  # records from a file: no object truth to ask about (the default's 2 rounds stay)
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    config = tmp_path / "run.yaml"  # the same run as a user's own config file, for step 2
    config.write_text(cfg.to_yaml())
    run = f"{runs}/{cfg.run_name}"

    # 1. bpo train without --config: the embedded default the wheel ships (the demo's) + overrides; sft … train,
    #    every output into the bucket.
    first = _on_a_fresh_node(venv, s3, tmp_path / "node1", "train", *overrides)
    files = _files(run)
    for stage in ("sft", "data", "negatives", "reference", "train", "round-2/negatives", "round-2/reference",
                  "round-2/train"):
        assert json.loads(files[f"{stage}/manifest.json"])["finished"], stage
    assert "eval/manifest.json" not in files
    assert {"sft/model/model.safetensors", "model/model.safetensors", "round-2/model/model.safetensors",
            "config.yaml"} <= set(files)
    for stage, steps in (("sft", 2), ("train", 3), ("round-2/train", 3)):
        logged = [json.loads(line)["step"] for line in files[f"{stage}/metrics.jsonl"].decode().splitlines()]
        assert logged == list(range(1, steps + 1)), (stage, logged)
        assert any(name.startswith(f"{stage}/tb/events.out.tfevents") for name in files), stage
    assert any(name.startswith("checkpoints/") and name.endswith("state.json") for name in files)
    for table in ("data/samples", "negatives/pairs", "reference/pairs"):  # (error tables: empty here)
        assert any(name.startswith(table + "/") and name.endswith(".parquet") for name in files), table
    pairs = json.loads(files["negatives/manifest.json"])
    assert pairs["pairs"] > 0 and json.loads(files["data/manifest.json"])["records_in"] == 16
    trained = files["train/manifest.json"], files["round-2/train/manifest.json"]

    # 2. Another node, nothing local: bpo run resumes from the bucket (skips what finished, evaluates). The stages
    #    skip only if step 1 ran this very config: the embedded default is configs/tiny.yaml.
    _assert_no_run_output(*first)
    for folder in first:
        shutil.rmtree(folder, ignore_errors=True)
    second = _on_a_fresh_node(venv, s3, tmp_path / "node2", "run", "--config", config)
    files = _files(run)
    assert (files["train/manifest.json"], files["round-2/train/manifest.json"]) == trained  # not re-run
    evaluated = json.loads(files["eval/manifest.json"])
    assert evaluated["finished"] and evaluated["requests"] > 0 and not evaluated["errors_by_reason"]
    assert {"eval/metrics.json", "eval/predictions.jsonl", "report.json", "report.md", "plots/training.png",
            "plots/eval.png"} <= set(files)
    assert json.loads(files["report.json"])

    _assert_no_run_output(*second)
    shutil.rmtree(second[1], ignore_errors=True)


def _on_a_fresh_node(venv: Path, s3: dict, workdir: Path, *bpo_args) -> tuple[Path, Path]:
    """Run the installed ``bpo`` in an empty working directory with a temp dir of its own (TMPDIR: Ray's
    session goes there too, so it is short, for Ray's socket paths). Returns (workdir, temp dir)."""
    workdir.mkdir()
    tmp = Path(tempfile.mkdtemp(prefix="bpo-node-", dir="/tmp"))
    done = subprocess.run([str(venv / "bin" / "bpo"), *map(str, bpo_args)], cwd=workdir, env=_job_env(s3, tmp),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return workdir, tmp


def _assert_no_run_output(*roots: Path) -> None:
    """A node keeps caches (models, held-out images) and Ray's logs; no run output."""
    names = {"manifest.json", "metrics.jsonl", "report.md", "report.json", "predictions.jsonl", "state.json"}
    local = [p for root in roots for p in root.rglob("*") if p.is_file() and (
        p.name in names or p.suffix == ".parquet" or p.name.startswith("events.out.tfevents"))]
    assert local == [], local
    assert not (roots[0] / "runs").exists()
