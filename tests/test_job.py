"""The real entry points on the embedded default: ``bpo run`` / ``python jobs/bpo.py`` on local Ray, and
``ray job submit`` to a head node this test starts and stops itself (stopped mid-training, resubmitted).

Each starts a cluster of its own. The session's shared cluster may be up (a test file sorted earlier, such as
``test_extra_pairs.py``, started it), but idle: pytest runs one test at a time, so no cluster starts while
another trains (Ray Train V2's placement-group cleaner does not tolerate that).
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
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml
from ray.dashboard.modules.job.common import JobErrorType
from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient, JobType

from bpo_ray.train.worker import worker_dataset
from conftest import REPO, free_ports, run_cli
from ray_jobs import JobFailed, SubmittedJob, died_before_entrypoint
from ray_procs import processes_of, running, stop_processes_of
from wandb_records import read_offline

RAY = str(Path(sys.executable).parent / "ray")
# The embedded default trains its SFT base first: a few steps on a few images here.
TINY_SFT = ["sft.max_steps=2", "sft.data.synthetic.num_images=8", "sft.per_device_batch_size=4"]


def test_job_runs_the_embedded_default_and_resumes(tmp_path, monkeypatch):
    """The job on the embedded default's first round alone, then the same run with the default's two
    bootstrapping rounds: round 1 is skipped as finished, round 2 makes its weakened-image negatives (and asks
    its existence questions) with round 1's aligned model and trains on from it; then once more, with
    everything finished, nothing runs. All three jobs log to one MLflow run and one W&B run (offline), rank 0
    of each training stage live."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's opt-in to its file store
    tracked = [f"tracking.mlflow.tracking_uri={tmp_path / 'mlruns'}", "tracking.wandb.mode=offline",
               f"tracking.wandb.dir={tmp_path / 'wandb'}"]
    common = [f"storage_path={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}", "resources.ray_address=local",
              "data.synthetic.num_images=8", "train.max_steps=3", "negatives.weakening.sampling.max_new_tokens=8", "negatives.truncated=keep", "eval.enabled=false",
              *TINY_SFT, *tracked]
    first = run_cli("run", "--config", "configs/tiny.yaml", *common, "rounds=1")
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "runs" / "bpo-tiny"
    assert f"run directory: {run_dir}" in first.stdout
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["synthetic"]["num_images"] == 8 and saved["resources"]["ray_address"] == "local"
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert manifest["finished"] and manifest["records_in"] == 16 and manifest["records_rejected"] == 0
    assert pq.read_table(run_dir / "data" / "samples").num_rows == manifest["samples"] == 8 * 3
    assert (tmp_path / "cache" / "models" / "tiny-llava-v2" / "model.safetensors").is_file()
    train = json.loads((run_dir / "train" / "manifest.json").read_text())
    assert train["finished"] and train["steps"] == 3 and train["workers"] == 2
    assert (run_dir / "model" / "model.safetensors").is_file() and "train: 3 steps on 2 workers" in first.stdout
    # The embedded default fine-tunes its own base first; BPO then aligns that model.
    sft = json.loads((run_dir / "sft" / "manifest.json").read_text())
    assert sft["finished"] and sft["steps"] == 2 and (run_dir / "sft" / "model" / "model.safetensors").is_file()
    assert f"sft: 2 steps on {sft['samples']} samples" in first.stdout
    assert not (run_dir / "round-2").exists()
    # A training worker's progress is its step lines. Ray Data's bar for each pass over a worker's rows, redrawn
    # as a new line at every update (11,000 of the demo's 16,000 lines), and its notes about it stay out.
    lines = (first.stdout + first.stderr).splitlines()
    assert any("bpo_ray.train: step 3/3" in line for line in lines)
    shards = [f"Dataset {worker_dataset(rank)}_" for rank in range(2)]
    assert not [line for line in lines if any(s in line for s in shards) or "Progress bars disabled" in line]
    # Nor DeepSpeed's noise from the workers: torch's warning for ZeRO-3's deprecated collectives (a line a step),
    # its scheduler's warning at build time, its notice that a CPU run found no GPU.
    assert not [line for line in lines if "RayTrainWorker" in line and any(noise in line for noise in (
        "is deprecated", "before it has started", "unable to detect it"))]
    # Nor Ray Train's two lines per rank at each checkpoint: rank 0 says where each checkpoint went, once.
    assert not [line for line in lines if "Reporting training result" in line or "Checkpoint successfully" in line]
    saved_at = sorted(line.split("bpo_ray.train: checkpoint at ")[1] for line in lines
                      if "bpo_ray.train: checkpoint at " in line)
    assert [line.split(f": {run_dir / 'checkpoints'}/")[0] for line in saved_at] == ["step 2/2", "step 3/3"], saved_at
    # The stages' bookkeeping (counts, the tables they write) runs without Ray Data's lines; their work keeps them.
    plans = [line for line in lines if "Execution plan of Dataset" in line]
    assert any("ReferenceScorer" in line for line in plans), plans
    assert not [line for line in plans if any(op in line for op in ("count_rows", "_count_batch", "Write]",
                                                                     "AggregateNumRows", "yes_no_sides"))]
    negatives = json.loads((run_dir / "negatives" / "manifest.json").read_text())
    card = (run_dir / "model" / "README.md").read_text()  # the model's card: its pairs, training, no eval
    assert f"{negatives['pairs']} preference pairs from {negatives['samples_in']} samples" in card
    assert "3 steps on 2 workers" in card and "Not evaluated" in card

    round_1 = {stage: json.loads((run_dir / stage / "manifest.json").read_text())
               for stage in ("sft", "data", "negatives", "reference", "train")}
    extended = run_cli("jobs/bpo.py", "--config", "configs/tiny.yaml", *common)  # the default: two rounds
    assert extended.returncode == 0, extended.stderr[-3000:]
    for stage, before in round_1.items():  # skipped: the same output, not a re-run that wrote a new one
        assert json.loads((run_dir / stage / "manifest.json").read_text()) == before, stage
    for pairs_dir, generator in ((run_dir / "negatives", run_dir / "sft" / "model"),
                                 (run_dir / "round-2" / "negatives", run_dir / "model")):
        pairs = pq.read_table(pairs_dir / "pairs", columns=["negative_type", "generator"]).to_pylist()
        assert {p["generator"] for p in pairs if p["negative_type"] == "image_weakening"} == {str(generator)}
    round_2 = json.loads((run_dir / "round-2" / "train" / "manifest.json").read_text())
    assert round_2["finished"] and round_2["steps"] == 3 and round_2["model_dir"] == str(run_dir / "round-2" / "model")
    assert (run_dir / "round-2" / "model" / "model.safetensors").is_file()
    assert "2 bootstrapping rounds" in (run_dir / "round-2" / "model" / "README.md").read_text()
    for stage in ("negatives", "round-2/negatives"):  # the default's existence pairs, steered in both rounds
        existence = json.loads((run_dir / stage / "manifest.json").read_text())["by_type"]["existence"]
        assert existence["policy_answered"] == existence["questions"] > 0 and existence["steer_gain"] == 0.3, stage

    finished = {**round_1, **{stage: json.loads((run_dir / stage / "manifest.json").read_text())
                              for stage in ("round-2/negatives", "round-2/reference", "round-2/train")}}
    again = run_cli("run", "--config", "configs/tiny.yaml", *common)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "round-2/train: 3 steps" in again.stdout  # the closing summary lists every round's stages
    for stage, before in finished.items():
        assert json.loads((run_dir / stage / "manifest.json").read_text()) == before, stage

    from mlflow.tracking import MlflowClient

    ids = json.loads((run_dir / "tracking.json").read_text())
    client = MlflowClient(ids["mlflow"]["tracking_uri"])
    [run] = client.search_runs([client.get_experiment_by_name("bpo-ray").experiment_id])
    assert run.info.run_id == ids["mlflow"]["run_id"] and run.info.status == "FINISHED"
    for series, steps in (("sft/loss", 2), ("train/loss", 3), ("round-2/train/loss", 3)):  # from Ray Train's rank 0
        assert [m.step for m in client.get_metric_history(run.info.run_id, series)] == list(range(1, steps + 1))
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "manifests")}
    assert {"manifests/sft.json", "manifests/train.json", "manifests/report.json"} <= logged
    offline = read_offline(tmp_path / "wandb")
    assert offline.run_ids == {ids["wandb"]["run_id"]}
    assert [step for step, _ in offline.series("round-2/train/loss", "round-2/train/step")] == [1, 2, 3]


# ------------------------------------------------------------------------------------- ray job submit
@dataclass
class Head:
    client: JobSubmissionClient  # typed reads of job state
    env: dict  # what the `ray` CLI needs to reach this head (its auth settings)
    dashboard: str  # http://127.0.0.1:PORT: jobs API
    gcs: str  # 127.0.0.1:PORT: where nodes join
    temp_dir: str
    marks: tuple[str, ...]  # what names its processes whose command line does not name temp_dir

    def submit(self, *args: str) -> SubmittedJob:
        return SubmittedJob(self.client, RAY, self.env, REPO, list(args))


@pytest.fixture(scope="module")
def head_node():
    """A Ray head started with ``ray start`` in its own temp dir; stopped by killing exactly its processes
    (``ray stop`` would stop every Ray cluster on the machine)."""
    temp_dir = tempfile.mkdtemp(prefix="bpo-head-", dir="/tmp")  # short: Ray's socket paths have a length limit
    # Every port the head listens on, chosen free: Ray's defaults (52365 for the job agent, 10001 for the
    # client server) collide with any other Ray on the machine, and a head without its agent takes no jobs.
    gcs, dashboard, client, manager, store, agent, agent_grpc, metrics, runtime_env = free_ports(9)
    marks = (f"--port={client}",)  # the client server: `ray start` starts it, then it is orphaned
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    headers = None
    if env["RAY_AUTH_MODE"] == "token":  # this head's own token: independent of ~/.ray and of test order
        token = Path(temp_dir) / "auth_token"
        token.write_text(secrets.token_hex(32))
        env["RAY_AUTH_TOKEN_PATH"] = str(token)
        headers = {"Authorization": f"Bearer {token.read_text()}"}
    started = subprocess.run(
        [RAY, "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
         "--include-dashboard=true", f"--ray-client-server-port={client}", f"--node-manager-port={manager}",
         f"--object-manager-port={store}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={runtime_env}", "--num-cpus=4", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        capture_output=True, text=True, env=env, timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        head = Head(JobSubmissionClient(f"http://127.0.0.1:{dashboard}", headers=headers), env,
                    f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{gcs}", temp_dir, marks)
        _wait_accepting_jobs(head.client)
        yield head
    finally:
        stop_processes_of(temp_dir, *marks)
        assert not running(processes_of(temp_dir, *marks))


def _wait_accepting_jobs(client: JobSubmissionClient, timeout: float = 120) -> None:
    """The job server answers before its agent on the head has registered (it refuses submissions until
    then): submit a no-op job until one is accepted."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.submit_job(entrypoint="python -c pass", submission_id=f"ready-{secrets.token_hex(4)}")
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_the_head_refuses_clients_and_nodes_without_its_token(head_node, tmp_path):
    """Token auth, for real: each request is made with the cluster's token and again without it (or with a
    wrong one); only the token differs, and only the first is accepted."""
    from ray.exceptions import AuthenticationError

    if head_node.env.get("RAY_AUTH_MODE") != "token":
        pytest.skip("RAY_AUTH_MODE is not token for this run")
    with pytest.raises(AuthenticationError):
        JobSubmissionClient(head_node.dashboard, headers={"Authorization": f"Bearer {secrets.token_hex(32)}"})
    assert head_node.client.list_jobs() is not None

    right = {**head_node.env, "HOME": str(tmp_path)}  # no ~/.ray/auth_token to fall back on
    no_token = {k: v for k, v in right.items() if not k.startswith("RAY_AUTH_TOKEN")}
    wrong = {**no_token, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    job_list = [RAY, "job", "list", "--address", head_node.dashboard]
    for env, accepted in ((right, True), (no_token, False), (wrong, False)):
        done = subprocess.run(job_list, env=env, capture_output=True, text=True, timeout=120)
        assert (done.returncode == 0) == accepted, done.stderr[-2000:]

    # A worker node joins with the cluster's token and is refused with another one.
    manager, store = free_ports(2)
    join = [RAY, "start", f"--address={head_node.gcs}", "--num-cpus=0", f"--node-manager-port={manager}",
            f"--object-manager-port={store}", "--disable-usage-stats"]
    # Ray takes an auth error for a GCS still starting and retries it for RAY_gcs_server_port_wait_time_s.
    refused = subprocess.run(join, env={**wrong, "RAY_gcs_server_port_wait_time_s": "10"}, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode != 0
    before = {p.pid for p in running(processes_of(head_node.temp_dir, *head_node.marks))}
    joined = subprocess.run(join, env=right, capture_output=True, text=True, timeout=120)
    try:
        assert joined.returncode == 0, joined.stderr[-2000:]
        listed = subprocess.run([RAY, "list", "nodes", "--address", head_node.dashboard, "--format", "json"],
                                env=right, capture_output=True, text=True, timeout=120)
        nodes = json.loads(listed.stdout)
        assert sorted((n["state"], n["is_head_node"]) for n in nodes) == [("ALIVE", False), ("ALIVE", True)]
    finally:  # stop just that node's processes: the module's other tests use this head alone
        worker = [p for p in running(processes_of(head_node.temp_dir, *head_node.marks)) if p.pid not in before]
        for p in worker:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        psutil.wait_procs(worker, timeout=20)


def _details(status: JobStatus, **fields) -> JobDetails:
    return JobDetails(type=JobType.SUBMISSION, entrypoint="python jobs/bpo.py", status=status, **fields)


def test_only_a_supervisor_death_before_our_entrypoint_is_retried():
    died = JobErrorType.JOB_SUPERVISOR_ACTOR_DIED
    # The crash seen here: the supervisor died while the runtime env was set up (the job never ran).
    assert died_before_entrypoint(_details(JobStatus.FAILED, error_type=died))
    # Died after launching our entrypoint (Ray moved the job to RUNNING first): our code ran; not retried.
    assert not died_before_entrypoint(_details(JobStatus.FAILED, error_type=died,
                                               driver_agent_http_address="http://127.0.0.1:52365"))
    # Our entrypoint failed.
    assert not died_before_entrypoint(_details(JobStatus.FAILED, driver_exit_code=1,
                                               error_type=JobErrorType.JOB_ENTRYPOINT_COMMAND_ERROR))
    assert not died_before_entrypoint(_details(JobStatus.STOPPED))
    assert not died_before_entrypoint(_details(JobStatus.FAILED, error_type=JobErrorType.RUNTIME_ENV_SETUP_FAILURE))


def test_a_failing_job_fails_fast_with_its_logs(head_node):
    """A job of ours that fails is reported within seconds, with its output, and is not resubmitted."""
    started = time.monotonic()
    job = head_node.submit("--", sys.executable, "-c", "import sys; print('config is wrong'); sys.exit(3)")
    with pytest.raises(JobFailed, match=r"(?s)JOB_ENTRYPOINT_COMMAND_ERROR, exit code 3.*config is wrong"):
        job.wait({JobStatus.SUCCEEDED}, timeout=300)
    assert time.monotonic() - started < 60 and len(job.attempts) == 1


def _registered_checkpoint(run_dir: Path, while_training: bool = True) -> tuple[str, int] | None:
    from bpo_ray.train.fit import latest_checkpoint
    from train_checkpoints import recorded_checkpoint

    read = recorded_checkpoint if while_training else latest_checkpoint
    for train_dir in (run_dir / "checkpoints").glob("train-*"):
        if found := read(str(train_dir)):
            return found
    return None


# Enough steps that the stop lands mid-training: a step takes well under a second here, and the stop
# reaches the job a moment after the first checkpoint is recorded.
SUBMIT_STEPS = 20


def test_ray_job_submit_runs_the_whole_job_and_resumes_after_a_stop(head_node, tmp_path):
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    entry = [sys.executable, "jobs/bpo.py", "--config", "configs/tiny.yaml", f"storage_path={runs}",
             f"cache_dir={cache}", "data.synthetic.num_images=8", "negatives.weakening.sampling.max_new_tokens=8",
             "negatives.truncated=keep",
             f"train.max_steps={SUBMIT_STEPS}", f"train.epochs={SUBMIT_STEPS}", "train.checkpoint_every=2", "eval.num_images=4", f"serve.port={free_ports(1)[0]}",
             *TINY_SFT]
    runtime_env = json.dumps({"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                                           "TORCH_EXTENSIONS_DIR": os.environ.get(
                                               "TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}})
    submit = ["--working-dir", ".", "--runtime-env-json", runtime_env, "--"]

    first = head_node.submit(*submit, *entry)
    # Stop it once Ray Train has registered a checkpoint (mid-training: checkpoints every 2 steps). A
    # checkpoint folder appears before Ray Train records it; only a recorded one is resumed from.
    run_dir = runs / "bpo-tiny"
    deadline, next_status = time.monotonic() + 600, 0.0
    while (found := _registered_checkpoint(run_dir)) is None and time.monotonic() < deadline:
        if time.monotonic() > next_status:  # fails at once if the job failed or ended early
            assert first.info().status in (JobStatus.PENDING, JobStatus.RUNNING), first.logs()[-3000:]
            next_status = time.monotonic() + 2
        time.sleep(0.2)
    assert found, first.logs()[-3000:]
    assert head_node.client.stop_job(first.id)
    first.wait({JobStatus.STOPPED}, timeout=120)
    assert not (run_dir / "train" / "manifest.json").exists()
    stopped_at = _registered_checkpoint(run_dir, while_training=False)[1]

    finished = {stage: json.loads((run_dir / stage / "manifest.json").read_text())
                for stage in ("sft", "data", "negatives", "reference")}
    second = head_node.submit(*submit, *entry)
    second.wait({JobStatus.SUCCEEDED}, timeout=900)
    logs = second.logs()
    for stage, before in finished.items():  # skipped: the same output, not a re-run that wrote a new one
        assert json.loads((run_dir / stage / "manifest.json").read_text()) == before, stage
    train = json.loads((run_dir / "train" / "manifest.json").read_text())
    assert train["steps"] == SUBMIT_STEPS and train["resumed_from_micro_step"] == stopped_at
    assert 0 < stopped_at < SUBMIT_STEPS
    # The resubmitted job's log goes on from the stopped one's: every step is in it, the early ones too.
    logged = [json.loads(line)["step"] for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert set(logged) == set(range(1, SUBMIT_STEPS + 1)), logged
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["eval"]) == {"base", "aligned"}
    for model in ("base", "aligned"):
        assert set(report["eval"][model]["pope"]) == {"random", "popular", "adversarial"}
        assert report["eval"][model]["chair"]["n"] == 4
    markdown = (run_dir / "report.md").read_text()
    assert "| pope adversarial f1 |" in markdown and "CHAIR_s" in markdown
    assert (run_dir / "plots" / "training.png").stat().st_size > 1000 and (run_dir / "plots" / "eval.png").is_file()
    assert f"report: {run_dir}/report.md" in logs
    assert "/v1/chat/completions 200" not in logs  # the eval's requests are not one line each in the job's log
    last = json.loads((run_dir / "round-2" / "train" / "manifest.json").read_text())  # the default's second round
    assert last["finished"] and last["steps"] == SUBMIT_STEPS and last["model_dir"] == str(run_dir / "round-2" / "model")
    card = (run_dir / "round-2" / "model" / "README.md").read_text()  # the card of the model evaluated, the last
    assert "| pope adversarial f1 |" in card and "Base vs aligned on 4 held-out images" in card
