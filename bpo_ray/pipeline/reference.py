"""reference: the frozen base model's log-probs of every pair, in an autoscaling Ray Data actor pool →
``reference/pairs`` (the pairs with ``ref_chosen_logp``/``ref_rejected_logp``, and ``ref_chosen_weak_logp``
with ``train.image_weight``) + ``reference/errors``
(pairs whose prompt leaves no room for the response). With ``train.reference`` ``live`` or
``adapter_disabled`` training scores the reference itself and this stage only checks lengths."""

from __future__ import annotations

from bpo_ray.config import RunConfig
from bpo_ray.data.images import detach_images, with_images
from bpo_ray.negatives.batches import ERROR_COLUMNS
from bpo_ray.pipeline.rundir import RunDir, policy_path
from bpo_ray.raydata import count_by, count_rows, read_parquet, write_by_kind
from bpo_ray.resources import pool_request, torch_threads
from bpo_ray.train.batch import WeakImages
from bpo_ray.train.reference import ReferenceScorer, scored_columns
from bpo_ray.train.setup import precision

# What the scores depend on: the model; of train, the loss (IPO averages log-probs), the reference mode (live
# modes only check lengths here), the precision (``auto`` follows use_gpu) and the image-conditional term's
# weakened image. Not lr, beta or steps: a sweep over those scores its pairs once.
READS = ("model", "train.loss", "train.reference", "train.precision", "resources.use_gpu", "train.image_weight",
         "train.image_distortions")


def run(cfg: RunConfig, run_dir: RunDir, key: str) -> dict:
    import ray.data

    pairs = read_parquet(run_dir.pairs)
    pairs_in = count_rows(pairs)
    pairs = with_images(pairs, run_dir.root)  # the bytes, for scoring only: the table written keeps references
    pool = cfg.train.reference_pool
    weak = WeakImages.for_config(cfg)
    rows = pairs.map_batches(
        ReferenceScorer, batch_format="pandas", batch_size=pool.batch_size,
        fn_constructor_kwargs={"model_path": policy_path(cfg, run_dir), "model_cfg": cfg.model,
                               "average": cfg.train.loss == "ipo", "score": cfg.train.reference == "precomputed",
                               "precision": precision(cfg.train, cfg.resources.use_gpu),
                               "threads": torch_threads(pool.num_cpus), "weak": weak},
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size),
        **pool_request(pool)).map_batches(detach_images, batch_format="numpy").materialize()
    write_by_kind(rows, run_dir.stage_dir("reference"),
                  {"pairs": ("pair", scored_columns(weak)), "errors": ("error", ERROR_COLUMNS)})
    counts = count_by(rows, ["kind", "reason"])
    scored = counts.get(("pair", ""), 0)
    errors = {reason: n for (kind, reason), n in counts.items() if kind == "error"}
    if scored + sum(errors.values()) != pairs_in:
        raise RuntimeError(f"reference: {pairs_in} pairs in but {scored} scored + {sum(errors.values())} errors")
    return {"pairs_in": pairs_in, "scored": scored, "errors_by_reason": errors, "mode": cfg.train.reference}
