"""Training on Ray Train: one DeepSpeed engine per worker over its part of a Ray dataset, then export.

``fit`` runs one training run (the DPO of the train stage, or the sft stage's fine-tuning) in a
``TorchTrainer``. Its checkpoints go to the folder it is given, so a re-submitted job with the same inputs
resumes from the latest one, and a failed worker group restarts from it (``FailureConfig``). The trained
model is exported (ZeRO-3 gathered, LoRA merged) to ``export_dir``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from bpo_ray import storage
from bpo_ray.config import RunConfig
from bpo_ray.raydata import count_rows, worker_parts
from bpo_ray.resources import train_worker_request
from bpo_ray.tracking import TrackedRun
from bpo_ray.train.setup import optimizer_steps
from bpo_ray.train.worker import EVENTS_DIR, METRICS_FILE, STATE_FILE, train_loop_per_worker, worker_dataset

log = logging.getLogger(__name__)


# What identifies a row of each objective's table (for its seeded order).
ORDER_BY = {"sft": ("sample_id",), "dpo": ("sample_id", "negative_type", "distortion", "seed", "rejected")}


@dataclass(frozen=True)
class FitJob:
    """What every training worker is handed (pickled as it is: typed settings, not a dumped dict)."""

    cfg: RunConfig  # its ``train`` section is the one that applies (the sft stage swaps in its own)
    objective: str  # "dpo" | "sft"
    policy_path: str
    total_steps: int
    log_dir: str  # metrics.jsonl and tb/ (rank 0)
    export_dir: str
    images_root: str = ""  # the run directory the rows' ``image_file`` references are in
    tracked: TrackedRun | None = None  # rank 0 logs its steps there too, as ``<stage>/<metric>``
    stage: str = "train"


def fit(cfg: RunConfig, rows, objective: str, checkpoints: str, base: str, export_dir: str, log_dir: str,
        images_root: str, tracked: TrackedRun | None = None, stage: str = "train") -> dict:
    """Train ``base`` on ``rows`` with ``cfg.train``, one DeepSpeed engine per Ray Train worker; export it.

    ``objective``: "dpo" (rows are scored pairs) or "sft" (rows are samples). ``checkpoints``: this training
    run's folder; the same folder resumes from the latest checkpoint Ray Train recorded there. ``images_root``:
    the run directory the rows' ``image_file`` references are in (``data/images.py``)."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    train, res = cfg.train, cfg.resources
    num_rows = count_rows(rows)
    if num_rows < train.num_workers:
        raise ValueError(f"{objective}: {num_rows} rows cannot feed {train.num_workers} workers")
    # Each worker's rows, in a seeded order that does not depend on how the files were written: the same
    # batches on a rerun and after a resume. Held in the object store: left lazy, every epoch re-ran the read.
    parts = worker_parts(rows, train.num_workers, list(ORDER_BY[objective]), train.seed, num_rows=num_rows)
    for part in parts:
        # A worker's step lines already say its rate and ETA. Ray Data's bar for each pass over a part is
        # relayed to the driver and redrawn there as a new line of the job's log at every update.
        part.context.enable_progress_bars = False
    micro_per_epoch, total_steps = optimizer_steps(num_rows, train, train.num_workers)
    storage.make_dir(log_dir)
    job = FitJob(cfg=cfg, objective=objective, policy_path=base, total_steps=total_steps, log_dir=log_dir,
                 export_dir=export_dir, images_root=images_root, tracked=tracked, stage=stage)
    resumed = latest_checkpoint(checkpoints)
    if not resumed:  # a fresh training run starts a fresh log; a resumed one goes on with its own
        storage.remove_file(storage.join(log_dir, METRICS_FILE))
        storage.remove_dir(storage.join(log_dir, EVENTS_DIR))
    else:
        log.info("%s: resuming from checkpoint %s (micro-step %d of %d)", storage.split(checkpoints)[1],
                 resumed[0], resumed[1], total_steps * train.gradient_accumulation_steps)
    request = train_worker_request(cfg)
    resources = {"CPU": request["num_cpus"], **({"GPU": request["num_gpus"]} if res.use_gpu else {}),
                 **({"memory": request["memory"]} if "memory" in request else {})}
    execution = ray.data.ExecutionOptions(preserve_order=True)
    storage_path, name = storage.split(checkpoints)
    trainer = TorchTrainer(
        train_loop_per_worker=_loop,
        train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(num_workers=train.num_workers, use_gpu=res.use_gpu,
                                               resources_per_worker=resources,
                                               accelerator_type=res.accelerator_type),
        # The parts are ordered and split without their images (small in the object store); each worker
        # reads a batch's images as it encodes it.
        datasets={worker_dataset(rank): part for rank, part in enumerate(parts)},
        dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=execution),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return {"pairs" if objective == "dpo" else "samples": num_rows, "steps": total_steps,
            "micro_batches_per_epoch": micro_per_epoch, "workers": train.num_workers,
            "final_metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))},
            "checkpoint": result.checkpoint.path if result.checkpoint else None, "model_dir": export_dir,
            "resumed_from_micro_step": resumed[1] if resumed else 0}


# Ray Train V2 restores ``ray.train.get_checkpoint()`` from this file in the run's storage folder; a
# checkpoint folder it does not list (a job stopped mid-upload) is never resumed from.
RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"


def latest_checkpoint(train_dir: str) -> tuple[str, int] | None:
    """(path, micro-steps done) of the checkpoint Ray Train will resume this run from, if any."""
    snapshot = storage.join(train_dir, RAY_TRAIN_SNAPSHOT)
    if not storage.exists(snapshot):
        return None
    try:
        latest = json.loads(storage.read_text(snapshot)).get("latest_checkpoint_result")
    except json.JSONDecodeError as e:
        # Ray Train rewrites this file in place at every checkpoint; a job stopped mid-write leaves it cut short,
        # and Ray Train's own restore would then fail on it with a bare parse error.
        raise ValueError(f"{snapshot} is cut short or corrupt ({e}): no checkpoint can be resumed from it. Remove "
                         f"it to train this stage from the start.") from e
    if not latest:
        return None
    path = storage.join(train_dir, latest["checkpoint_dir_name"])
    state = storage.join(path, STATE_FILE)
    return (path, json.loads(storage.read_text(state))["micro_steps"]) if storage.exists(state) else None


def _loop(config: dict) -> None:  # a module-level function: Ray pickles it by reference
    train_loop_per_worker(config["job"])
