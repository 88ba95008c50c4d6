"""Experiment tracking: one bpo-ray run is one MLflow run and/or one Weights & Biases run (optional extras).

Who logs what:
- the driver, when the run starts: the resolved config (MLflow params and ``config.yaml``; W&B's config);
- rank 0 of each training stage, every step: its metrics as ``<stage>/<metric>`` against ``<stage>/step``
  (``sft/loss``, ``train/reward_margin``, ``round-2/train/loss``), live;
- the driver, after each stage: its manifest (``manifests/<stage>.json``) and time; eval's scores as
  ``eval/<model>/<task>/…`` metrics; the report's base-vs-aligned table and plots.

The tracked runs' ids are kept in the run directory (``tracking.json``): a resumed, re-submitted or extended
job reopens them and logs on, rather than starting new ones. W&B lets one process write a run at a time, so
every session here is short (open, log, close), and the driver's never overlaps a training stage's.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any

from bpo_ray import storage
from bpo_ray.config import MlflowConfig, RunConfig, WandbConfig

log = logging.getLogger(__name__)

MLFLOW_PARAMS_PER_CALL = 100  # the MLflow REST API's limit for one log_batch


@dataclass(frozen=True)
class TrackedRun:
    """What a process needs to log into this run's trackers (pickled to the training workers)."""

    name: str
    mlflow: MlflowConfig | None = None
    mlflow_uri: str | None = None  # resolved on the driver: workers do not share its environment
    mlflow_run_id: str | None = None
    wandb: WandbConfig | None = None
    wandb_run_id: str | None = None


def open_run(cfg: RunConfig, record: str) -> TrackedRun | None:
    """The tracked run of the run directory whose ``tracking.json`` is ``record`` (None when tracking is off):
    the recorded one when it was made with the same backend settings, else a new one, recorded. A new run
    gets the config as parameters; every job updates the logged ``config.yaml``."""
    settings = cfg.tracking
    if settings.mlflow is None and settings.wandb is None:
        return None
    saved = json.loads(storage.read_text(record)) if storage.exists(record) else {}
    entry: dict[str, dict] = {}
    created: set[str] = set()
    if settings.mlflow is not None:
        mlflow_uri = _mlflow_uri(settings.mlflow)
        where = {"tracking_uri": mlflow_uri, "experiment": settings.mlflow.experiment}
        mlflow_run_id = _same(saved.get("mlflow"), where)
        try:
            if mlflow_run_id is None:
                mlflow_run_id = _new_mlflow_run(mlflow_uri, settings.mlflow.experiment, cfg.run_name, record)
                created.add("mlflow")
            else:
                _mlflow_client(mlflow_uri).update_run(mlflow_run_id, status="RUNNING")
        except Exception as err:  # before any stage runs, in words that say which setting
            given = "" if settings.mlflow.tracking_uri else " (MLflow's default: tracking.mlflow.tracking_uri is unset)"
            raise RuntimeError(f"tracking.mlflow: cannot use the tracking URI {mlflow_uri!r}{given}: "
                               f"{err.__class__.__name__}: {err}. Set tracking.mlflow.tracking_uri to a tracking "
                               f"server (http://…) or a folder every node can reach (a file store).") from err
        entry["mlflow"] = {**where, "run_id": mlflow_run_id}
    if settings.wandb is not None:
        where = {"project": settings.wandb.project, "entity": settings.wandb.entity}
        wandb_run_id = _same(saved.get("wandb"), where)
        if wandb_run_id is None:
            wandb_run_id = uuid.uuid4().hex[:12]
            created.add("wandb")
        entry["wandb"] = {**where, "run_id": wandb_run_id}
    storage.write_text(record, json.dumps(entry, indent=2))
    run = recorded_run(cfg, record)
    config = cfg.model_dump(mode="json")
    with Session(run, wandb_config=config, strict=True) as session:  # a wrong setting fails before any stage
        session.text("config.yaml", cfg.to_yaml())
        if "mlflow" in created:
            session.params(flatten(config))
    log.info("tracking: %s", ", ".join(f"{name} run {e['run_id']}" + (" (new)" if name in created else " (resumed)")
                                       for name, e in entry.items()))
    return run


def recorded_run(cfg: RunConfig, record: str) -> TrackedRun | None:
    """The tracked run ``open_run`` recorded for this run directory, or None when tracking is off or the
    stage runs outside a pipeline (nothing recorded): what a training stage hands its rank 0."""
    settings = cfg.tracking
    if (settings.mlflow is None and settings.wandb is None) or not storage.exists(record):
        return None
    saved = json.loads(storage.read_text(record))
    mlflow, wandb = saved.get("mlflow", {}), saved.get("wandb", {})
    return TrackedRun(cfg.run_name,
                      settings.mlflow if mlflow else None, mlflow.get("tracking_uri"), mlflow.get("run_id"),
                      _wandb_settings(settings.wandb) if wandb else None, wandb.get("run_id"))


def log_stage(run: TrackedRun | None, stage: str, manifest: dict, run_root: str) -> None:
    """What a stage finished with: its manifest and time; eval's scores; the report's table and plots."""
    if run is None:
        return
    with Session(run) as session:
        session.text(f"manifests/{stage}.json", json.dumps(manifest, indent=2, default=str))
        values = {f"stages/{stage}/seconds": float(manifest.get("seconds", 0.0))}
        if stage == "eval":
            values.update({f"eval/{k}": v for k, v in flatten(manifest.get("metrics", {}), sep="/").items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)})
        session.metrics(values)
        if rows := manifest.get("comparison"):
            session.table("eval_table", ["metric", "base", "aligned", "delta"],
                          [[r["metric"], r["base"], r["aligned"], r["delta"]] for r in rows])
        for plot in manifest.get("plots", []):
            session.image(plot, storage.read_bytes(storage.join(run_root, plot)))
        if report := manifest.get("report"):
            session.text("report.md", storage.read_text(report))


def finish(run: TrackedRun | None, ok: bool) -> None:
    """Marks the MLflow run finished (or failed); the next job on this run directory reopens it."""
    if run is not None and run.mlflow_run_id:
        _mlflow_client(run.mlflow_uri).set_terminated(run.mlflow_run_id, "FINISHED" if ok else "FAILED")


class Session:
    """One short stretch of logging into a tracked run, as a context manager. A tracker that fails while
    logging is reported once and skipped: a lost metric is better than a lost training run. ``background``:
    MLflow's metric calls return once the previous step is sent, and are sent by its own thread, waited for on
    close (a training step should not wait on a tracking server; W&B's are sent in the background anyway)."""

    def __init__(self, run: TrackedRun, wandb_config: dict | None = None, strict: bool = False,
                 background: bool = False):
        self.run, self.failed, self.strict, self.background = run, set(), strict, background
        self.mlflow = _mlflow_client(run.mlflow_uri) if run.mlflow_run_id else None
        self.wandb = None
        self.step_metrics: set[str] = set()
        self.sending = None  # the background metrics MLflow is still sending (its RunOperations)
        if run.wandb_run_id:
            self._guarded("wandb", "the run's start", lambda: self._open_wandb(wandb_config))

    def _open_wandb(self, config: dict | None) -> None:
        import wandb

        # W&B logs its internals at DEBUG into its own debug.log; passed up, they would flood the job's log.
        logging.getLogger("wandb").propagate = False

        w = self.run.wandb
        self.wandb = wandb.init(
            id=self.run.wandb_run_id, resume="allow", project=w.project, entity=w.entity, mode=w.mode, dir=w.dir,
            name=self.run.name, reinit="create_new",
            settings=wandb.Settings(console="off", x_disable_stats=True, disable_git=True, silent=True))
        if config is not None:
            self.wandb.config.update(config, allow_val_change=True)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.sending is not None:
            self._guarded("mlflow", "the last steps", self._wait_sent)
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
            if self.background:
                import wandb

                # finish() hands the last records to W&B's service, which writes them when it closes; a Ray
                # Train worker is killed once training returns, before W&B's exit hook would wait for that.
                self._guarded("wandb", "the last steps", wandb.teardown)

    def _wait_sent(self) -> None:
        """Waits for the background step MLflow is still sending: this client's own operation, not
        mlflow.flush_async_logging(), which flushes the process's default store (in a Ray Train worker, a
        database in its working directory), not this client's."""
        sending, self.sending = self.sending, None
        if sending is not None:
            sending.wait()

    def _each(self, what: str, mlflow=None, wandb=None) -> None:
        for backend, write in (("mlflow", mlflow), ("wandb", wandb)):
            if write is not None and getattr(self, backend) is not None:
                self._guarded(backend, what, write)

    def _guarded(self, backend: str, what: str, write) -> None:
        if backend in self.failed:
            return
        try:
            write()
        except Exception as err:  # network, auth, a tracking server down: training goes on
            if self.strict:
                raise RuntimeError(f"tracking.{backend}: could not log {what} ({err.__class__.__name__}: {err}); "
                                   f"check its settings and credentials, or log offline "
                                   f"(tracking.wandb.mode=offline, a local tracking.mlflow.tracking_uri)") from err
            self.failed.add(backend)
            log.warning("tracking: %s stopped logging this session (%s while logging %s: %s)", backend,
                        err.__class__.__name__, what, err)

    def params(self, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in values.items()]

        def mlflow():
            for i in range(0, len(items), MLFLOW_PARAMS_PER_CALL):
                self.mlflow.log_batch(self.run.mlflow_run_id, params=items[i:i + MLFLOW_PARAMS_PER_CALL])
        self._each("params", mlflow=mlflow)

    def metrics(self, values: dict[str, float], step: int | None = None, step_metric: str | None = None) -> None:
        """``values`` at ``step``; with ``step_metric`` (``train/step``), W&B plots them against it."""
        def mlflow():
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            # One step in flight: MLflow sends queued batches concurrently, which stores them out of step order
            # and races a file store creating a new metric's folder. A step waits only on a tracker slower than
            # a training step.
            self._wait_sent()
            self.sending = self.mlflow.log_batch(self.run.mlflow_run_id, synchronous=not self.background,
                                                 metrics=[Metric(k, float(v), now, step or 0) for k, v in values.items()])

        def wandb():
            if step_metric is None:
                self.wandb.log(values)
                return
            prefix = step_metric.rpartition("/")[0]
            if prefix not in self.step_metrics:  # a resumed W&B run's own step counter restarts: not ours
                self.wandb.define_metric(step_metric)
                self.wandb.define_metric(f"{prefix}/*", step_metric=step_metric)
                self.step_metrics.add(prefix)
            self.wandb.log({step_metric: step, **values})
        self._each("metrics", mlflow=mlflow, wandb=wandb)

    def text(self, name: str, content: str) -> None:
        """A file of the run: an MLflow artifact; in W&B a file in the run's folder (uploaded with it)."""
        def wandb():
            target = os.path.join(self.wandb.dir, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w") as f:
                f.write(content)
        self._each(name, mlflow=lambda: self.mlflow.log_text(self.run.mlflow_run_id, content, name), wandb=wandb)

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        def wandb():
            import wandb as wb

            self.wandb.log({name: wb.Table(columns=columns, data=rows)})
        self._each(name, mlflow=lambda: self.mlflow.log_table(
            self.run.mlflow_run_id, {c: [r[i] for r in rows] for i, c in enumerate(columns)}, f"{name}.json"),
            wandb=wandb)

    def image(self, name: str, png: bytes) -> None:
        """A plot (``plots/training.png``): an MLflow artifact at that path, a W&B image under that key."""
        with tempfile.TemporaryDirectory() as scratch:
            path = os.path.join(scratch, os.path.basename(name))
            with open(path, "wb") as f:
                f.write(png)

            def wandb():
                import wandb as wb

                self.wandb.log({name.removesuffix(".png"): wb.Image(path)})
            self._each(name, mlflow=lambda: self.mlflow.log_artifact(
                self.run.mlflow_run_id, path, os.path.dirname(name) or None), wandb=wandb)


def flatten(tree: dict, sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-5}}`` → ``{"train.lr": 1e-5}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, sep, f"{name}{sep}"))
        else:
            out[name] = value
    return out


def _same(saved: dict | None, where: dict) -> str | None:
    """The recorded run id when it was made with these settings (another URI or project: a new run)."""
    if saved and all(saved.get(k) == v for k, v in where.items()):
        return saved.get("run_id")
    return None


def _wandb_settings(settings: WandbConfig | None) -> WandbConfig | None:
    """With ``dir`` made absolute here, on the driver: training workers run elsewhere, and a relative folder
    would be theirs."""
    if settings is None or not settings.dir:
        return settings
    return settings.model_copy(update={"dir": os.path.abspath(settings.dir)})


def _mlflow_uri(settings: MlflowConfig) -> str:
    import mlflow

    uri = settings.tracking_uri or mlflow.get_tracking_uri()
    if "://" not in uri and ":" not in uri.split("/")[0]:  # a plain local path: the file store there
        uri = "file://" + os.path.abspath(uri)
    return uri


def _mlflow_client(uri: str | None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _new_mlflow_run(uri: str, experiment: str, name: str, record: str) -> str:
    client = _mlflow_client(uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=name,
                            tags={"bpo_ray.run_dir": storage.split(record)[0], "mlflow.source.name": "bpo-ray"})
    return run.info.run_id
