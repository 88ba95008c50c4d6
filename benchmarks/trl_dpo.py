"""The baseline a user would otherwise run: TRL's ``DPOTrainer`` on the same pairs, launched with torchrun
(one process per worker, DDP over gloo on CPU). Used by ``bench_train.py``; writes one JSON per rank.

    torchrun --nproc_per_node 2 benchmarks/trl_dpo.py --model DIR --pairs DIR --batch 4 --steps 20 --out DIR

TRL refuses precomputed reference log-probs for vision-language models, so it scores the reference (a
frozen copy) in every step, as our ``train.reference: live`` does.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def conversation(pair: dict) -> dict:
    import io

    from PIL import Image

    return {"images": [Image.open(io.BytesIO(pair["image"])).convert("RGB")],
            "prompt": json.loads(pair["messages"]),
            "chosen": [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": [{"role": "assistant", "content": pair["rejected"]}]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--pairs", required=True, help="our reference/pairs parquet folder")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import pyarrow.parquet as pq
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from bpo_ray.data.images import rows_with_images

    rows = pq.read_table(args.pairs, columns=["image", "image_file", "messages", "chosen", "rejected"]).to_pylist()
    rows = rows_with_images(rows, str(Path(args.pairs).resolve().parents[1]))  # <run>/reference/pairs
    data = Dataset.from_list([conversation(r) for r in rows])
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(args.model)
    reference = copy.deepcopy(model).eval().requires_grad_(False)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter())

    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps + args.warmup,
                           learning_rate=5e-4, beta=0.1, loss_type=["sigmoid"], max_length=None, use_cpu=True,
                           report_to="none", save_strategy="no", logging_strategy="no", dataloader_num_workers=0,
                           ddp_backend="gloo", seed=0)
        trainer = DPOTrainer(model=model, ref_model=reference, args=config, train_dataset=data,
                             processing_class=processor, callbacks=[clock])
        trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps = clock.times[args.warmup:]
    seconds = (steps[-1] - steps[0]) / (len(steps) - 1)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps({
        "samples_per_second": args.batch * world / seconds, "seconds_per_step": seconds,
        "peak_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "world": world}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
