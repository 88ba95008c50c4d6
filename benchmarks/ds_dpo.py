"""Our DPO step without Ray: the same DeepSpeed engine, config, batches and loss as a Ray Train worker
(``bpo_ray.train.worker``), launched by torchrun as TRL is. Used by ``bench_train.py`` to split our gap to TRL
into what the step costs and what the runtime around it costs; writes one JSON per rank.

    torchrun --nproc_per_node 2 benchmarks/ds_dpo.py --config RUN.json --pairs DIR --steps 16 --out DIR

Reads the scored pairs (precomputed reference log-probs); each rank takes every world-th row, in order.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, help="a RunConfig dumped as JSON")
    parser.add_argument("--pairs", required=True, help="reference/pairs parquet folder")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import deepspeed
    import pyarrow.parquet as pq

    from bpo_ray.config import RunConfig
    from bpo_ray.train.batch import EncodingCache, collate, encode_pair, pad_id, pair_logps
    from bpo_ray.train.losses import training_objective
    from bpo_ray.train.setup import deepspeed_config, disable_dropout
    from bpo_ray.train.worker import _load_policy, peak_memory_gib

    cfg = RunConfig.model_validate(json.loads(Path(args.config).read_text()))
    train = cfg.train
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(train.seed)
    total = args.steps + args.warmup
    ds_config = deepspeed_config(train, world, False, total)
    model, processor = _load_policy(cfg.model.name_or_path, cfg, ds_config)
    disable_dropout(model)  # as the Ray worker does for DPO
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds_config)
    rows = pq.read_table(args.pairs).to_pylist()[rank::world]  # images by reference, fetched by the cache
    size = train.per_device_batch_size
    cache = EncodingCache(train.encode_cache_gib, str(Path(args.pairs).resolve().parents[1]))  # <run>/reference/pairs
    ends = []
    for step in range(total):
        # Encoded in the loop through the same cache as the Ray worker's: that cost is part of the step on both
        # sides (rows come back from the second epoch on, as they do there).
        chunk = [rows[(step * size + i) % len(rows)] for i in range(size)]
        encoded = cache.encode(chunk, lambda r: encode_pair(processor, r, cfg.model.max_length))
        batch = collate(encoded, pad_id(processor))
        loss, _ = training_objective(pair_logps(engine, batch, average=train.loss == "ipo"),
                                     torch.tensor([r["ref_chosen_logp"] for r in chunk]),
                                     torch.tensor([r["ref_rejected_logp"] for r in chunk]), train)
        engine.backward(loss)
        engine.step()
        ends.append(time.perf_counter())
    seconds = (ends[-1] - ends[args.warmup]) / (len(ends) - 1 - args.warmup)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps({
        "samples_per_second": size * world / seconds, "seconds_per_step": seconds,
        "peak_memory_gib": peak_memory_gib(), "world": world}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
