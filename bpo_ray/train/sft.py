"""The sft stage: supervised fine-tuning of ``model.name_or_path`` into the base that BPO aligns.

Off by default (a user brings an SFT checkpoint). On, it reads and validates ``sft.data`` exactly as the
data stage reads ``data`` (``sft/samples`` + ``sft/errors``, conservation checked), fine-tunes on the
annotated answers with the DPO trainer's machinery (Ray Train × DeepSpeed, checkpoints and resume,
ZeRO-3 export) and writes ``sft/model``, which every later stage then uses as the policy and the eval
stage serves as the base. A finished sft stage is skipped on re-runs, so the demo trains it once.
"""

from __future__ import annotations

import logging

from bpo_ray.config import RunConfig
from bpo_ray.data.stage import read_validated
from bpo_ray.models.loader import resolve_model_path
from bpo_ray.stages import RunDir
from bpo_ray.train.stage import fit

log = logging.getLogger(__name__)


def run_sft(cfg: RunConfig, run: RunDir, pid_dir: str | None = None) -> dict:
    import ray.data

    if not cfg.sft.enabled:
        return {"skipped": "sft.enabled is false"}
    data = read_validated(cfg.sft.data, cfg.cache_dir, run.path("sft"), "sft")
    if not data["samples"]:
        raise ValueError(f"sft: no valid sample in sft.data (rejected: {data['errors_by_reason']})")
    sft_cfg = cfg.model_copy(update={"train": cfg.sft.as_train()})
    samples = ray.data.read_parquet(run.path("sft", "samples"))
    key = cfg.section_hash("model", "sft")[:12]  # checkpoints belong to this model + sft config (data included)
    base = resolve_model_path(cfg.model.name_or_path, cfg.cache_dir)
    trained = fit(sft_cfg, run, samples, objective="sft", name=f"sft-{key}", base=base,
                  export_dir=run.path("sft", "model"), out_dir=run.path("sft"), pid_dir=pid_dir)
    final = trained["final_metrics"]
    log.info("sft: %d steps, final loss %.4f; base for BPO: %s", trained["steps"], final.get("loss", float("nan")),
             trained["model_dir"])
    return {"data": data, **trained, "skipped_too_long": int(final.get("skipped_too_long", 0)), "from": base}
