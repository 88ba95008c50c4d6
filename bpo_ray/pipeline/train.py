"""train: DPO of the policy on the scored pairs, on Ray Train × DeepSpeed (ZeRO-3 by default), then export.

Checkpoints go to ``checkpoints/train-<key>``: the same inputs (config and scored pairs) resume from the
latest one, and a failed worker group restarts from it. Rank 0 logs ``train/metrics.jsonl`` and
TensorBoard events (and, with ``tracking``, to MLflow / W&B); the trained model (LoRA merged) is exported to ``model/``.
"""

from __future__ import annotations

from bpo_ray.config import RunConfig
from bpo_ray.pipeline.rundir import RunDir, policy_path
from bpo_ray.raydata import read_parquet
from bpo_ray.tracking import recorded_run
from bpo_ray.train.fit import fit


def run(cfg: RunConfig, run_dir: RunDir, key: str) -> dict:
    pairs = read_parquet(run_dir.scored_pairs)
    return fit(cfg, pairs, objective="dpo", checkpoints=run_dir.checkpoint_run("train", key),
               base=policy_path(cfg, run_dir), export_dir=run_dir.model, log_dir=run_dir.training_log("train"),
               images_root=run_dir.root,
               tracked=recorded_run(cfg, run_dir.tracking), stage=run_dir.stage_name("train"))
