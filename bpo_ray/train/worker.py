"""What each Ray Train worker runs: DPO (or, for the sft stage, plain SFT) with a DeepSpeed engine over its
Ray Data shard.

Resume: a checkpoint holds the DeepSpeed state of every rank plus ``state.json`` (micro-batches done);
on restart (a failed worker, or the same run re-submitted) ``ray.train.get_checkpoint()`` returns it, the
engine loads it and the loop skips the micro-batches already done, so the trajectory continues.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from typing import TYPE_CHECKING

import torch

from bpo_ray import storage
from bpo_ray.config import RunConfig
from bpo_ray.data.records import decode_image
from bpo_ray.models.loader import load_vlm
from bpo_ray.models.prompts import encode_prompt_response
from bpo_ray.tracking import Session, TrackedRun
from bpo_ray.train.batch import (
    EncodingCache,
    WeakImages,
    collate,
    collate_rows,
    encode_pair,
    pad_id,
    pair_logps,
    response_nll,
)
from bpo_ray.train.losses import to_floats, training_objective
from bpo_ray.train.reference import reference_columns
from bpo_ray.train.setup import (
    adopt_process_group,
    deepspeed_config,
    disable_dropout,
    param_groups,
    prepare_model,
    probe_the_cpu_once,
    quiet_deepspeed,
    quiet_ray_train_reports,
    trainable_parameters,
)

if TYPE_CHECKING:
    from bpo_ray.train.fit import FitJob

log = logging.getLogger("bpo_ray.train")
LINE_EVERY_S = 10.0  # between step lines in the log, at most
STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"
EVENTS_DIR = "tb"
TRAINING_LOG = (METRICS_FILE, EVENTS_DIR)  # what a training stage keeps across a resumed run


def _load_policy(path: str, cfg: RunConfig, ds_config: dict):
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float16 if ds_config["fp16"]["enabled"] \
        else torch.float32
    keep_alive = None
    if cfg.train.zero_stage == 3:
        # Partition weights while loading (zero.Init) instead of materialising the whole model per worker.
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)
    model, processor = load_vlm(path, cfg.model, dtype=dtype)
    del keep_alive
    return prepare_model(model, cfg.train), processor


def _forever(shard, batch_size: int, encode, what: str, train):
    """``encode(rows)`` over the shard's batches (rows as stored: images by reference), epoch after epoch;
    skips batches it returns None for, and fails when a whole epoch yields nothing. Each epoch mixes rows in
    a buffer seeded by (seed, epoch): the same batches in the same order on a rerun (resume skips them), but
    not the same as last epoch (with one order repeated every epoch, the tiny SFT never learned to look at
    the image in 3,000 steps)."""
    epoch = 0
    while True:
        produced = False
        shuffle = {"local_shuffle_buffer_size": train.shuffle_buffer,
                   "local_shuffle_seed": train.seed * 100_003 + epoch} if train.shuffle_buffer else {}
        epoch += 1
        for rows in shard.iter_batches(batch_size=batch_size, batch_format="pandas", **shuffle):
            item = encode(rows.to_dict("records"))
            if item is not None:
                produced = True
                yield item
        if not produced:
            raise ValueError(f"this worker's shard holds no {what} that fits model.max_length")


def _batches(shard, batch_size: int, processor, cfg: RunConfig, images_root: str):
    """Encoded micro-batches of pairs with their reference log-probs (chosen, rejected, and the chosen answer on
    the weakened image or None), forever (epochs repeat the shard)."""
    weak = WeakImages.for_config(cfg)
    weak = weak.sized_for(processor) if weak else None
    columns = reference_columns(weak)
    cache = EncodingCache(cfg.train.encode_cache_gib, images_root)

    def encode_row(row):
        return encode_pair(processor, row, cfg.model.max_length, cfg.model.min_response_tokens, weak)

    def encode(rows):
        pairs, refs = [], []
        for row, pair in zip(rows, cache.encode(rows, encode_row), strict=True):
            if pair is None:  # too long: the reference stage recorded and dropped these; a guard only
                continue
            pairs.append(pair)
            # Unscored (live reference modes) columns are all-null in parquet: None → NaN.
            refs.append([float("nan") if row[c] is None else row[c] for c in columns])
        if not pairs:
            return None
        scores = torch.tensor(refs).T
        return collate(pairs, pad_id(processor)), scores[0], scores[1], scores[2] if weak else None
    return _forever(shard, batch_size, encode, "pair", cfg.train)


def _sft_batches(shard, batch_size: int, processor, cfg: RunConfig, images_root: str):
    """Encoded micro-batches of samples (prompt + annotated answer), forever, with the count of samples
    skipped as too long so far (the data stage checks records, not token lengths)."""
    skipped = 0
    cache = EncodingCache(cfg.train.encode_cache_gib, images_root)

    def encode_row(row):
        return encode_prompt_response(processor, json.loads(row["messages"]), decode_image(row["image"]),
                                      row["answer"], cfg.model.max_length, cfg.model.min_response_tokens)

    def encode(rows):
        nonlocal skipped
        encoded = [e for e in cache.encode(rows, encode_row) if e is not None]
        skipped += len(rows) - len(encoded)
        return (collate_rows(encoded, pad_id(processor)), len(encoded), skipped) if encoded else None
    return _forever(shard, batch_size, encode, "sample", cfg.train)


def worker_dataset(rank: int) -> str:
    """The name of rank ``rank``'s fixed part of the training rows (``fit`` hands each worker its own)."""
    return f"train_{rank}"


def train_loop_per_worker(job: FitJob) -> None:
    quiet_deepspeed(job.cfg.resources.use_gpu)
    import deepspeed
    import ray.train

    from bpo_ray.runtime import setup_worker_logging

    setup_worker_logging()  # a fresh worker process: its progress lines reach the driver's (and the job's) log
    # This worker runs a Ray Data pass over its part every epoch; the step lines are its progress. Without
    # these, each pass adds its own lines to the job's log, and the notice that fit() turned the bars off.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    quiet_ray_train_reports()
    cfg = job.cfg
    train = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    adopt_process_group()
    probe_the_cpu_once()
    torch.manual_seed(train.seed)

    ds_config = deepspeed_config(train, world, cfg.resources.use_gpu, job.total_steps)
    model, processor = _load_policy(job.policy_path, cfg, ds_config)
    sft = job.objective == "sft"
    if not sft:  # DPO compares the policy with a reference that has none: dropout would only add noise
        disable_dropout(model)
    trainable, total = trainable_parameters(model)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, train), config=ds_config)

    reference = None if sft else _reference_scorer(cfg, job.policy_path, ds_config, engine)
    micro_done = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            engine.load_checkpoint(directory, tag="ds")
            with open(os.path.join(directory, STATE_FILE)) as f:
                micro_done = json.load(f)["micro_steps"]
        if rank == 0:
            log.info("resumed from %s at micro-step %d", checkpoint.path, micro_done)

    accumulation = train.gradient_accumulation_steps
    total_micro = job.total_steps * accumulation

    shard = ray.train.get_dataset_shard(worker_dataset(rank))  # this rank's fixed part (fit.fit)
    batches = (_sft_batches if sft else _batches)(shard, train.per_device_batch_size, processor, cfg, job.images_root)
    for _ in range(micro_done):  # same order as before the interruption: skip what was already trained on
        next(batches)
    training_log = TrainingLog(job.log_dir, trainable, total, job.total_steps, micro_done // accumulation,
                               job.tracked, job.stage) if rank == 0 else None
    window, started = [], time.time()
    average = train.loss == "ipo"
    # DeepSpeed's fp32 ZeRO-0 path clips gradients but keeps no norm (get_global_grad_norm() stays None):
    # there the loop measures it itself, on the averaged gradients, before step() clears them.
    own_grad_norm = engine.zero_optimization_stage() == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled())
    grad_norm = None
    while micro_done < total_micro:
        engine.train()
        if sft:
            (inputs, labels, keep), rows, skipped = next(batches)
            loss = response_nll(engine, inputs, labels, keep)
            step_metrics, weight = {"loss": loss.item()}, rows
        else:
            batch, ref_c, ref_r, ref_weak = next(batches)
            if reference is not None:
                ref_c, ref_r, ref_weak = reference(batch, average)
            loss, terms = training_objective(pair_logps(engine, batch, average=average), ref_c, ref_r, train, ref_weak)
            step_metrics, weight = to_floats(terms), batch.num_pairs
        engine.backward(loss)
        lr = float(scheduler.get_last_lr()[0])  # the rate this step uses (step() moves the schedule on)
        if own_grad_norm and engine.is_gradient_accumulation_boundary():
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in engine.module.parameters() if p.grad is not None])
        engine.step()
        micro_done += 1
        window.append((step_metrics, weight))
        if micro_done % accumulation:
            continue
        step = micro_done // accumulation
        metrics = _step_metrics(window, step, lr, grad_norm if own_grad_norm else engine.get_global_grad_norm(),
                                engine, started, world)
        if sft:  # samples over model.max_length, summed over workers: the sft manifest reports them
            metrics["skipped_too_long"] = int(all_reduce_sum([float(skipped)], engine.device)[0])
        window, started = [], time.time()
        last = micro_done >= total_micro
        if step % train.checkpoint_every == 0 or last:
            with tempfile.TemporaryDirectory() as directory:
                engine.save_checkpoint(directory, tag="ds")
                if rank == 0:
                    with open(os.path.join(directory, STATE_FILE), "w") as f:
                        json.dump({"micro_steps": micro_done, "step": step}, f)
                if training_log:
                    training_log.log(metrics)
                    training_log.sync()
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
                persisted = ray.train.get_checkpoint()  # as uploaded: report returns once it is
                if training_log and persisted:
                    log.info("checkpoint at step %d/%d: %s", step, job.total_steps, persisted.path)
        # No report between checkpoints: Ray Train V2 drains one report per worker per controller poll (2 s),
        # so reporting every step would cap training at one step per poll. Rank 0 logs every step itself.
        elif training_log:
            training_log.log(metrics)
    if training_log:
        training_log.close()
    from bpo_ray.train.export import export_model

    export_model(engine, cfg, job.policy_path, job.export_dir, rank)


def _reference_scorer(cfg: RunConfig, policy_path: str, ds_config: dict, engine):
    """None when reference log-probs were precomputed; else a function scoring a batch live: (chosen,
    rejected, chosen on the weakened image or None)."""
    import deepspeed

    mode = cfg.train.reference
    if mode == "precomputed":
        return None
    if mode == "adapter_disabled":  # the LoRA policy with its adapters off *is* the base model
        def score(batch, average):
            with torch.no_grad(), engine.module.disable_adapter():
                logps = pair_logps(engine, batch, average=average)
            return logps.chosen, logps.rejected, logps.chosen_weak
        return score
    # live: a frozen copy of the base under the same ZeRO stage, with no optimizer state
    frozen = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
    if cfg.train.zero_stage != 3:
        frozen["zero_optimization"] = {"stage": 0}
    model, _ = load_vlm(policy_path, cfg.model, dtype=next(engine.module.parameters()).dtype)
    model.requires_grad_(False)
    ref_engine = deepspeed.initialize(model=model, config=frozen)[0]
    ref_engine.eval()

    def score(batch, average):
        with torch.no_grad():
            logps = pair_logps(ref_engine, batch, average=average)
        return logps.chosen, logps.rejected, logps.chosen_weak
    return score


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums over every rank, in a tensor on this rank's device (NCCL takes no CPU tensors)."""
    total = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return total.tolist()


def mean_over_ranks(window: list[tuple[dict, int]], device: torch.device) -> dict[str, float]:
    """Pair-weighted means of a step's micro-batch metrics over every rank: each rank saw other pairs, and
    rank 0's alone are a noisy sample of the step."""
    keys = sorted(window[0][0])
    sums = all_reduce_sum([sum(m[k] * n for m, n in window) for k in keys] + [sum(n for _, n in window)], device)
    return {k: sums[i] / sums[-1] for i, k in enumerate(keys)}


def _step_metrics(window, step, lr, grad_norm, engine, started, world) -> dict:
    pairs = sum(n for _, n in window)
    metrics = mean_over_ranks(window, engine.device)
    metrics.update(step=step, lr=lr,
                   grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                   samples_per_second=pairs * world / max(time.time() - started, 1e-9),
                   peak_memory_gib=peak_memory_gib(), model_state_gib=model_state_gib(engine))
    return metrics


def peak_memory_gib() -> float:
    """This worker's peak: GPU memory allocated on GPU workers, resident memory (RSS) on CPU workers."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def model_state_gib(engine) -> float:
    """Model states this worker holds for its trainable parameters: weights + gradients + AdamW moments, 16
    bytes a parameter (fp32, or bf16 weights/grads with fp32 master + moments), over the local ZeRO-3
    partition (``ds_tensor``) when parameters are partitioned, else over the whole parameter."""
    local = sum((p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel())
                for p in engine.module.parameters() if p.requires_grad)
    return 16 * local / 2**30


class TrainingLog:
    """Rank 0's step lines: ``metrics.jsonl`` and TensorBoard events (``tb/``) in ``out_dir`` (local or a URI).

    Files are written on this node (object stores cannot append) and copied to ``out_dir`` by ``sync()``,
    which the loop calls at every checkpoint and at the end: after a restart on another node the log goes
    on from what the last sync saved, as training goes on from the last checkpoint. Only these two entries
    move: ``out_dir`` may hold other outputs (the sft stage's samples)."""

    def __init__(self, out_dir: str, trainable: int, total: int, total_steps: int = 0, first_step: int = 0,
                 tracked: TrackedRun | None = None, stage: str = "train"):
        self.out_dir, self.trainable, self.total = out_dir, trainable, total
        # Experiment trackers (cfg.tracking) get every step live, as ``<stage>/<metric>``.
        self.tracker, self.stage = (Session(tracked, background=True) if tracked else None), stage
        # Progress: steps done since this attempt started (a resumed run's rate is its own), and how many remain.
        self.total_steps, self.since = total_steps, (time.time(), first_step)
        self.last_line = -math.inf
        self._scratch = tempfile.TemporaryDirectory(prefix="bpo-train-log-")
        self.local = self._scratch.name
        metrics, events = storage.join(out_dir, METRICS_FILE), storage.join(out_dir, EVENTS_DIR)
        if storage.exists(metrics):  # what earlier attempts logged
            with open(os.path.join(self.local, METRICS_FILE), "wb") as f:
                f.write(storage.read_bytes(metrics))
        if storage.exists(events):
            storage.download_dir(events, os.path.join(self.local, EVENTS_DIR))
        self.writer = _tensorboard(os.path.join(self.local, EVENTS_DIR))

    def log(self, metrics: dict, now: float | None = None) -> None:
        with open(os.path.join(self.local, METRICS_FILE), "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.writer:
            for key, value in metrics.items():
                if key != "step":
                    self.writer.add_scalar(f"train/{key}", value, metrics["step"])
        if self.tracker:
            self.tracker.metrics({f"{self.stage}/{k}": v for k, v in metrics.items() if k != "step"},
                                 step=metrics["step"], step_metric=f"{self.stage}/step")
        # The files and trackers above get every step; the job's log a line for this attempt's first and the last
        # step and at most one every LINE_EVERY_S seconds between (the tiny demo trains 10 steps a second).
        now = time.time() if now is None else now
        step = metrics["step"]
        if step not in (self.since[1] + 1, self.total_steps) and now - self.last_line < LINE_EVERY_S:
            return
        self.last_line = now
        dpo = (f" margin {metrics['reward_margin']:.4f} acc {metrics['reward_accuracy']:.2f}"
               if "reward_margin" in metrics else "")
        log.info("step %d/%d loss %.4f%s lr %.2e (%d/%d params trainable)%s", step, self.total_steps,
                 metrics["loss"], dpo, metrics["lr"], self.trainable, self.total, self.progress(step, now))

    def progress(self, step: int, now: float | None = None) -> str:
        """`` | 2.41 steps/s, ETA 1m 40s`` over this attempt's steps so far."""
        start, first = self.since
        done, seconds = step - first, (time.time() if now is None else now) - start
        if done <= 0 or seconds <= 0 or not self.total_steps:
            return ""
        rate = done / seconds
        eta = int(max(0, self.total_steps - step) / rate)
        return f" | {rate:.2f} steps/s, ETA {eta // 60}m {eta % 60:02d}s"

    def sync(self) -> None:
        if self.writer:
            self.writer.flush()
        metrics = os.path.join(self.local, METRICS_FILE)
        if os.path.exists(metrics):
            with open(metrics, "rb") as f:
                storage.write_bytes(storage.join(self.out_dir, METRICS_FILE), f.read())
        if os.path.isdir(os.path.join(self.local, EVENTS_DIR)):
            storage.upload_dir(os.path.join(self.local, EVENTS_DIR), storage.join(self.out_dir, EVENTS_DIR))

    def close(self) -> None:
        if self.tracker:
            self.tracker.close()
        if self.writer:
            self.writer.close()
        self.sync()
        self._scratch.cleanup()


def _tensorboard(directory: str):
    import uuid

    from tensorboardX import SummaryWriter

    # Event files are named by the second and host: a writer restarted within the same second on the same
    # host would replace the earlier attempt's file when synced. A suffix of its own keeps both.
    return SummaryWriter(directory, filename_suffix=f".{uuid.uuid4().hex[:8]}")
