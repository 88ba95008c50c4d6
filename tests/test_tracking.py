"""Experiment tracking for real: an MLflow file store and W&B offline, read back through MLflow's client and
W&B's own record types. Rank 0's step lines go through ``TrainingLog`` as in a training worker; the
pipeline's own use (Ray Train's rank 0, a resumed and extended job) is in test_job."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from bpo_ray import tracking
from bpo_ray.config import ConfigError, load_config
from bpo_ray.eval.compare import comparison
from bpo_ray.eval.plots import eval_plot
from bpo_ray.pipeline.job import STAGES
from bpo_ray.pipeline.rundir import RunDir, stage_key
from bpo_ray.train.worker import TrainingLog
from wandb_records import read_offline

EVAL = {"base": {"images": 100, "chair": {"chair_s": 0.15},
                 "pope": {"adversarial": {"f1": 0.654, "accuracy": 0.623, "yes_ratio": 0.59}}},
        "aligned": {"images": 100, "chair": {"chair_s": 0.03},
                    "pope": {"adversarial": {"f1": 0.696, "accuracy": 0.661, "yes_ratio": 0.55}}}}


@pytest.fixture
def settings(tmp_path, monkeypatch):
    # MLflow 3 asks for an explicit opt-in to its file store (it recommends a database for servers).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return [f"storage_path={tmp_path / 'runs'}", f"tracking.mlflow.tracking_uri={tmp_path / 'mlruns'}",
            "tracking.wandb.mode=offline", f"tracking.wandb.dir={tmp_path / 'wandb'}"]


def _steps(tracked, steps, first_step, out_dir, caplog):
    """What rank 0 of the train stage logs: one line per step, also to the trackers, none of which may fail."""
    caplog.clear()
    log = TrainingLog(str(out_dir), 10, 20, total_steps=4, first_step=first_step, tracked=tracked, stage="train")
    for step in steps:
        log.log({"step": step, "loss": 1.0 / step, "reward_margin": 0.1 * step, "reward_accuracy": 1.0, "lr": 1e-5})
    log.close()
    assert not [r.getMessage() for r in caplog.records if r.name == "bpo_ray.tracking" and r.levelno >= logging.WARNING]


def _mlflow_run(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, runs


def test_a_run_is_one_tracked_run_across_jobs_with_its_steps_stages_and_eval_table(settings, tmp_path, monkeypatch,
                                                                                caplog):
    cfg = load_config(None, settings)
    run_dir = RunDir.for_config(cfg)
    first = tracking.open_run(cfg, run_dir.tracking)
    # As in a Ray Train worker: a working directory of its own, where MLflow's default store is not ours.
    (tmp_path / "worker").mkdir()
    monkeypatch.chdir(tmp_path / "worker")
    _steps(first, (1, 2), 0, tmp_path / "log", caplog)
    tracking.log_stage(first, "data", {"samples": 24, "seconds": 3.5}, run_dir.root)
    tracking.finish(first, ok=False)  # the job stopped mid-training
    client, runs = _mlflow_run(first.mlflow_uri, "bpo-ray")
    assert [r.info.status for r in runs] == ["FAILED"]

    second = tracking.open_run(cfg, run_dir.tracking)  # the re-submitted job: the same tracked runs
    assert (second.mlflow_run_id, second.wandb_run_id) == (first.mlflow_run_id, first.wandb_run_id)
    _steps(second, (3, 4), 2, tmp_path / "log", caplog)  # training resumed from its step-2 checkpoint
    rows = comparison(EVAL)
    plot = run_dir.plot("eval.png")
    (tmp_path / "runs" / "bpo-tiny" / "plots").mkdir(parents=True)
    with open(plot, "wb") as f:
        f.write(eval_plot(rows))
    with open(run_dir.report_md, "w") as f:
        f.write("# BPO run report\n")
    tracking.log_stage(second, "eval", {"metrics": EVAL, "seconds": 12.0}, run_dir.root)
    tracking.log_stage(second, "report", {"report": run_dir.report_md, "plots": ["plots/eval.png"],
                                          "comparison": rows, "seconds": 1.0}, run_dir.root)
    tracking.finish(second, ok=True)

    client, runs = _mlflow_run(first.mlflow_uri, "bpo-ray")
    assert [r.info.status for r in runs] == ["FINISHED"]
    run = runs[0]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == \
        [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]
    assert run.data.params["train.beta"] == "0.1" and run.data.params["run_name"] == "bpo-tiny"
    assert run.data.metrics["eval/aligned/pope/adversarial/f1"] == 0.696
    assert run.data.metrics["stages/data/seconds"] == 3.5
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    artifacts |= {a.path for d in ("manifests", "plots") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"config.yaml", "manifests/data.json", "manifests/eval.json", "manifests/report.json",
            "eval_table.json", "plots/eval.png", "report.md"} <= artifacts
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "eval_table.json")).read_text())
    assert [row[0] for row in table["data"]] == [r["metric"] for r in rows]

    offline = read_offline(tmp_path / "wandb")
    assert offline.run_ids == {first.wandb_run_id} and offline.sessions >= 5
    assert offline.series("train/loss", "train/step") == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]
    assert offline.config["train"]["beta"] == 0.1
    assert {"config.yaml", "manifests/data.json", "manifests/report.json", "report.md"} <= set(offline.files)
    [table_file] = [p for name, p in offline.files.items() if name.startswith("media/table/eval_table")]
    assert json.loads(table_file.read_text())["data"] == [[r["metric"], r["base"], r["aligned"], r["delta"]]
                                                          for r in rows]
    assert any(name.startswith("media/images/plots/eval") for name in offline.files)
    assert any(row.get("eval/aligned/pope/adversarial/f1") == 0.696 for row in offline.history)


def test_other_tracking_settings_start_a_new_tracked_run_and_no_stage_reruns(settings, tmp_path, monkeypatch):
    cfg = load_config(None, settings)
    run_dir = RunDir.for_config(cfg)
    first = tracking.open_run(cfg, run_dir.tracking)
    moved = load_config(None, [*settings, "tracking.mlflow.experiment=ablations"])
    second = tracking.open_run(moved, run_dir.tracking)
    assert second.mlflow_run_id != first.mlflow_run_id and second.wandb_run_id == first.wandb_run_id
    assert tracking.recorded_run(moved, run_dir.tracking) == second  # what the training stages hand rank 0
    monkeypatch.chdir(tmp_path)  # a relative W&B folder is the driver's, made absolute before workers get it
    relative = load_config(None, [*settings[:-1], "tracking.wandb.dir=wandb-here"])
    assert tracking.open_run(relative, run_dir.tracking).wandb.dir == str(tmp_path / "wandb-here") \
        == tracking.recorded_run(relative, run_dir.tracking).wandb.dir
    recorded_uri = tracking.recorded_run(relative, run_dir.tracking).mlflow_uri
    assert tracking.recorded_run(load_config(None, [f"storage_path={tmp_path / 'runs'}"]), run_dir.tracking) is None
    untracked = load_config(None, [f"storage_path={tmp_path / 'runs'}"])
    for stage in STAGES:  # switching tracking on never invalidates a finished stage
        assert stage_key("x", cfg, stage.reads) == stage_key("x", untracked, stage.reads), stage.name
    with pytest.raises(ConfigError, match="tracking.wandb.mode"):
        load_config(None, ["tracking.wandb.mode=later"])
    # A tracking URI MLflow cannot use stops the job before any stage, naming the setting to change.
    unusable = load_config(None, [settings[0], "tracking.mlflow.tracking_uri=nosuchscheme://tracker"])
    with pytest.raises(RuntimeError, match="cannot use the tracking URI 'nosuchscheme://tracker'.*tracking_uri to"):
        tracking.open_run(unusable, run_dir.tracking)
    assert tracking.recorded_run(cfg, run_dir.tracking).mlflow_uri == recorded_uri  # the failed one not recorded


def test_a_tracker_that_fails_while_logging_warns_once_and_the_others_go_on(settings, tmp_path, caplog):
    cfg = load_config(None, settings)
    run = tracking.open_run(cfg, RunDir.for_config(cfg).tracking)
    with caplog.at_level(logging.WARNING, logger="bpo_ray.tracking"), tracking.Session(run) as session:
        session.metrics({"/not/a/metric//name": 1.0})  # MLflow refuses this key
        session.metrics({"train/loss": 0.5}, step=1, step_metric="train/step")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "mlflow stopped logging" in warnings[0]
    assert read_offline(tmp_path / "wandb").series("train/loss", "train/step") == [(1, 0.5)]


def test_a_background_session_sends_every_step_in_order(settings, tmp_path):
    """Rank 0's session, steps back to back: MLflow has every one, in step order, when close() returns (sent
    concurrently, most runs of three such steps came back out of order, some with a metric folder lost)."""
    from mlflow.tracking import MlflowClient

    cfg = load_config(None, settings[:2])  # MLflow alone: nothing else spaces the steps out
    run = tracking.open_run(cfg, RunDir.for_config(cfg).tracking)
    client = MlflowClient(run.mlflow_uri)
    for attempt in range(20):
        with tracking.Session(run, background=True) as session:
            for step in range(1, 6):
                session.metrics({f"try{attempt}/loss": 1.0 / step}, step=step)
        assert [(m.step, m.value) for m in client.get_metric_history(run.mlflow_run_id, f"try{attempt}/loss")] == \
            [(step, 1.0 / step) for step in range(1, 6)]
        assert not session.failed and session.sending is None
