"""data: read + validate ``data`` (LLaVA JSON, parquet, a saved HF dataset or the bundled shapes) with Ray
Data → ``data/samples`` + ``data/errors``; the manifest's counts satisfy
``records_in == records_ok + records_rejected``. Skipped when nothing is bootstrapped from the samples."""

from __future__ import annotations

from bpo_ray.config import RunConfig, bootstraps
from bpo_ray.data.dataset import read_validated
from bpo_ray.pipeline.rundir import RunDir


def run(cfg: RunConfig, run_dir: RunDir, key: str) -> dict:
    if not bootstraps(cfg):  # training on existing pairs alone (bpo train --pairs): no sample is needed
        return {"skipped": "nothing is bootstrapped (weakening, injection and existence are off): the negatives "
                           "stage reads only negatives.extra_pairs"}
    return read_validated(cfg.data, cfg.cache_dir, run_dir.stage_dir("data"), "data", run_dir.image_store("data"))
