"""sft (when ``sft.enabled``): supervised fine-tuning of ``model.name_or_path`` into the base that BPO aligns.

Off by default (a user brings an SFT checkpoint). On, it reads and validates ``sft.data`` exactly as the
data stage reads ``data`` (``sft/samples`` + ``sft/errors``, conservation checked), fine-tunes on the
annotated answers with the DPO trainer's machinery (Ray Train × DeepSpeed, checkpoints and resume,
ZeRO-3 export) and writes ``sft/model``, which every later stage then uses as the policy and the eval
stage serves as the base. A finished sft stage is skipped on re-runs, so the demo trains it once.
"""

from __future__ import annotations

import logging

from bpo_ray.config import RunConfig
from bpo_ray.data.dataset import read_validated
from bpo_ray.models.loader import resolve_model_path
from bpo_ray.pipeline.rundir import RunDir
from bpo_ray.raydata import read_parquet
from bpo_ray.tracking import recorded_run
from bpo_ray.train.fit import fit

log = logging.getLogger(__name__)


def run(cfg: RunConfig, run_dir: RunDir, key: str) -> dict:
    if not cfg.sft.enabled:
        return {"skipped": "sft.enabled is false"}
    data = read_validated(cfg.sft.data, cfg.cache_dir, run_dir.stage_dir("sft"), "sft", run_dir.image_store("sft"))
    if not data["samples"]:
        raise ValueError(f"sft: no valid sample in sft.data (rejected: {data['errors_by_reason']})")
    sft_cfg = cfg.model_copy(update={"train": cfg.sft.as_train()})
    samples = read_parquet(run_dir.sft_samples)
    base = resolve_model_path(cfg.model.name_or_path, cfg.cache_dir)
    trained = fit(sft_cfg, samples, objective="sft", checkpoints=_checkpoints(cfg, run_dir, key), base=base,
                  export_dir=run_dir.sft_model, log_dir=run_dir.training_log("sft"), images_root=run_dir.root,
                  tracked=recorded_run(cfg, run_dir.tracking), stage="sft")
    final = trained["final_metrics"]
    log.info("sft: %d steps, final loss %.4f; base for BPO: %s", trained["steps"], final.get("loss", float("nan")),
             trained["model_dir"])
    return {"data": data, **trained, "skipped_too_long": int(final.get("skipped_too_long", 0)), "from": base}


def _checkpoints(cfg: RunConfig, run_dir: RunDir, key: str) -> str:
    """``checkpoints/sft-<key>``; older run directories named it by the config hash alone, and an sft run
    interrupted there resumes from it."""
    legacy = cfg.section_hash("model", "sft", earlier=True)
    return run_dir.checkpoint_run("sft", legacy if run_dir.has_checkpoints("sft", legacy) else key)
