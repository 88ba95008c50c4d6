"""Training stages: reference log-probs (Ray Data), then DPO (Ray Train × DeepSpeed) and export.

``reference``: with ``train.reference: precomputed`` (the default) the frozen base model scores every pair
once, in an autoscaling actor pool, and the scores are stored beside the pairs (``reference/pairs``), so
training workers hold only the policy. ``live`` / ``adapter_disabled`` score inside the training step
instead; the stage then only checks lengths. Either way, pairs whose prompt leaves no room for the response
are recorded in ``reference/errors`` and training reads ``reference/pairs``.

``train``: ``TorchTrainer`` with one DeepSpeed engine per worker. Checkpoints go to
``checkpoints/train-<key>`` (the key hashes the training inputs), so re-running the job with the same run
resumes from the latest one, and a failed worker group restarts from it (``FailureConfig``). The trained
model is exported to ``model/``.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import torch

from bpo_ray import storage
from bpo_ray.config import RunConfig
from bpo_ray.models.device import DTYPES, actor_device
from bpo_ray.models.loader import load_processor, load_vlm
from bpo_ray.models.prompts import SampleTooLong
from bpo_ray.negatives.stage import ERROR_COLUMNS, PAIR_COLUMNS
from bpo_ray.raydata import count_by, worker_parts, write_by_kind
from bpo_ray.resources import pool_request, torch_threads, train_worker_request
from bpo_ray.stages import RunDir, policy_path
from bpo_ray.train.batch import collate, encode_pair, pad_id, pair_logps
from bpo_ray.train.setup import optimizer_steps, precision

log = logging.getLogger(__name__)

SCORED_COLUMNS = (*PAIR_COLUMNS, "ref_chosen_logp", "ref_rejected_logp")


class ReferenceScorer:
    """Ray Data actor: the frozen reference model scores (chosen, rejected) for a batch of pairs."""

    def __init__(self, model_path: str, model_cfg: dict, average: bool, precision: str, score: bool = True,
                 threads: int = 1):
        from bpo_ray.config import ModelConfig

        torch.set_num_threads(threads)
        self.cfg = ModelConfig.model_validate(model_cfg)
        if score:  # in the policy's training precision: another dtype offsets every pair's margin
            self.model, self.processor = load_vlm(model_path, self.cfg, dtype=DTYPES[precision],
                                                  device=actor_device())
            self.model.eval()
        else:  # length checks only: the reference is scored live during training
            self.model, self.processor = None, load_processor(model_path, self.cfg)
        self.average = average

    @torch.inference_mode()
    def __call__(self, batch):
        rows = batch.to_dict("records")
        encoded, valid, problems = [], [], {}
        for i, row in enumerate(rows):
            try:
                encoded.append(encode_pair(self.processor, row, self.cfg.max_length, self.cfg.min_response_tokens))
                valid.append(i)
            except SampleTooLong as err:
                problems[i] = str(err)
        chosen = rejected = [np.nan] * len(encoded)
        if encoded and self.model is not None:
            logps = pair_logps(self.model, collate(encoded, pad_id(self.processor)), average=self.average)
            chosen, rejected = logps.chosen.tolist(), logps.rejected.tolist()
        scores = dict(zip(valid, zip(chosen, rejected, strict=True), strict=True))
        batch["ref_chosen_logp"] = [scores.get(i, (np.nan, np.nan))[0] for i in range(len(rows))]
        batch["ref_rejected_logp"] = [scores.get(i, (np.nan, np.nan))[1] for i in range(len(rows))]
        batch["kind"] = ["error" if i in problems else "pair" for i in range(len(rows))]
        batch["stage"] = "reference"
        batch["reason"] = [SampleTooLong.reason if i in problems else "" for i in range(len(rows))]
        batch["detail"] = [problems.get(i, "") for i in range(len(rows))]
        return batch


def run_reference(cfg: RunConfig, run: RunDir) -> dict:
    import ray.data

    pairs = ray.data.read_parquet(run.path("negatives", "pairs"))
    pairs_in = pairs.count()
    pool = cfg.train.reference_pool
    policy = policy_path(cfg, run)
    rows = pairs.map_batches(
        ReferenceScorer, batch_format="pandas", batch_size=pool.batch_size,
        fn_constructor_kwargs={"model_path": policy, "model_cfg": cfg.model.model_dump(),
                               "average": cfg.train.loss == "ipo", "score": cfg.train.reference == "precomputed",
                               "precision": precision(cfg.train, cfg.resources.use_gpu),
                               "threads": torch_threads(pool.num_cpus)},
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size),
        **pool_request(pool)).materialize()
    write_by_kind(rows, run.path("reference"), {"pairs": ("pair", SCORED_COLUMNS), "errors": ("error", ERROR_COLUMNS)})
    counts = count_by(rows, ["kind", "reason"])
    scored = counts.get(("pair", ""), 0)
    errors = {reason: n for (kind, reason), n in counts.items() if kind == "error"}
    if scored + sum(errors.values()) != pairs_in:
        raise RuntimeError(f"reference: {pairs_in} pairs in but {scored} scored + {sum(errors.values())} errors")
    return {"pairs_in": pairs_in, "scored": scored, "errors_by_reason": errors, "mode": cfg.train.reference}


def _train_key(cfg: RunConfig, run: RunDir) -> str:
    """Checkpoints belong to exactly these training inputs (config + the reference stage's output)."""
    upstream = (run.read_manifest("reference") or {}).get("output_id", "")
    return hashlib.sha256((upstream + cfg.section_hash("model", "train")).encode()).hexdigest()[:12]


def run_train(cfg: RunConfig, run: RunDir, pid_dir: str | None = None) -> dict:
    import ray.data

    pairs = ray.data.read_parquet(run.path("reference", "pairs"))
    return fit(cfg, run, pairs, objective="dpo", name=f"train-{_train_key(cfg, run)}", base=policy_path(cfg, run),
               export_dir=run.path("model"), out_dir=run.path("train"), pid_dir=pid_dir)


# What identifies a row of each objective's table (for its seeded order).
ORDER_BY = {"sft": ("sample_id",), "dpo": ("sample_id", "negative_type", "distortion", "seed", "rejected")}


def worker_dataset(rank: int) -> str:
    return f"train_{rank}"


def fit(cfg: RunConfig, run: RunDir, rows, objective: str, name: str, base: str, export_dir: str, out_dir: str,
        pid_dir: str | None = None) -> dict:
    """Train ``base`` on ``rows`` with ``cfg.train``, one DeepSpeed engine per Ray Train worker; export it.

    ``objective``: "dpo" (rows are scored pairs) or "sft" (rows are samples). Checkpoints go to
    ``checkpoints/<name>``: the same name resumes from the latest one Ray Train recorded."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    train, res = cfg.train, cfg.resources
    num_rows = rows.count()
    if num_rows < train.num_workers:
        raise ValueError(f"{objective}: {num_rows} rows cannot feed {train.num_workers} workers")
    # Each worker's rows, in a seeded order that does not depend on how the files were written: the same
    # batches on a rerun and after a resume. Held in the object store: left lazy, every epoch re-ran the read.
    parts = worker_parts(rows, train.num_workers, list(ORDER_BY[objective]), train.seed)
    micro_per_epoch, total_steps = optimizer_steps(num_rows, train, train.num_workers)
    storage.make_dir(out_dir)
    loop_config = {
        "cfg": cfg.model_dump(mode="json"),
        "objective": objective,
        "policy_path": base,
        "use_gpu": res.use_gpu,
        "total_steps": total_steps,
        "out_dir": out_dir,
        "export_dir": export_dir,
        "pid_dir": pid_dir,
    }
    resumed = latest_checkpoint(run.path("checkpoints", name))
    if resumed:
        log.info("%s: resuming from checkpoint %s (micro-step %d of %d)", out_dir.rsplit("/", 1)[-1], resumed[0],
                 resumed[1], total_steps * train.gradient_accumulation_steps)
    request = train_worker_request(cfg)
    resources = {"CPU": request["num_cpus"], **({"GPU": request["num_gpus"]} if res.use_gpu else {}),
                 **({"memory": request["memory"]} if "memory" in request else {})}
    execution = ray.data.ExecutionOptions(preserve_order=True)
    trainer = TorchTrainer(
        train_loop_per_worker=_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=train.num_workers, use_gpu=res.use_gpu,
                                               resources_per_worker=resources,
                                               accelerator_type=res.accelerator_type),
        datasets={worker_dataset(rank): part for rank, part in enumerate(parts)},
        dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=execution),
        run_config=ray.train.RunConfig(
            name=name, storage_path=run.path("checkpoints"),
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
    from bpo_ray.train.worker import STATE_FILE

    snapshot = storage.join(train_dir, RAY_TRAIN_SNAPSHOT)
    if not storage.exists(snapshot):
        return None
    latest = json.loads(storage.read_text(snapshot)).get("latest_checkpoint_result")
    if not latest:
        return None
    path = storage.join(train_dir, latest["checkpoint_dir_name"])
    state = storage.join(path, STATE_FILE)
    return (path, json.loads(storage.read_text(state))["micro_steps"]) if storage.exists(state) else None


def _loop(config: dict) -> None:  # a module-level function: Ray pickles it by reference
    from bpo_ray.train.worker import train_loop_per_worker

    train_loop_per_worker(config)


def read_metrics(run: RunDir) -> list[dict]:
    path = run.path("train", "metrics.jsonl")
    return [json.loads(line) for line in storage.read_text(path).splitlines()] if storage.exists(path) else []
