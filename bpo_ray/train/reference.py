"""The frozen reference model's log-probs of each pair, as a Ray Data actor (``ReferenceScorer``).

With ``train.reference: precomputed`` (the default) the base model scores every pair once, before
training, so training workers hold only the policy. ``live`` / ``adapter_disabled`` score inside the
training step instead, and the scorer only checks lengths (``score=False``). A pair whose prompt leaves no
room for the response becomes an error row either way.
"""

from __future__ import annotations

import numpy as np
import torch

from bpo_ray.config import ModelConfig
from bpo_ray.models.device import DTYPES, actor_device
from bpo_ray.models.loader import load_processor, load_vlm
from bpo_ray.models.prompts import SampleTooLong
from bpo_ray.negatives.batches import PAIR_COLUMNS
from bpo_ray.train.batch import WeakImages, collate, encode_pair, pad_id, pair_logps

SCORES = ("ref_chosen_logp", "ref_rejected_logp")
WEAK_COLUMN = "ref_chosen_weak_logp"  # the chosen answer on the weakened image (train.image_weight)


def reference_columns(weak: WeakImages | None) -> tuple[str, ...]:
    """The reference log-prob columns, in ``pair_logps`` order (chosen, rejected, chosen on the weakened image):
    what this scorer writes and the training workers read."""
    return (*SCORES, WEAK_COLUMN) if weak else SCORES


def scored_columns(weak: WeakImages | None) -> tuple[str, ...]:
    return (*PAIR_COLUMNS, *reference_columns(weak))


class ReferenceScorer:
    """Ray Data actor: the frozen reference model scores (chosen, rejected) for a batch of pairs, and with
    ``weak`` the chosen answer on the weakened image too."""

    def __init__(self, model_path: str, model_cfg: ModelConfig, average: bool, precision: str, score: bool = True,
                 threads: int = 1, weak: WeakImages | None = None):
        torch.set_num_threads(threads)
        self.cfg = model_cfg
        if score:  # in the policy's training precision: another dtype offsets every pair's margin
            self.model, self.processor = load_vlm(model_path, self.cfg, dtype=DTYPES[precision],
                                                  device=actor_device())
            self.model.eval()
        else:  # length checks only: the reference is scored live during training
            self.model, self.processor = None, load_processor(model_path, self.cfg)
        self.average = average
        self.weak = weak.sized_for(self.processor) if weak else None

    @torch.inference_mode()
    def __call__(self, batch):
        rows = batch.to_dict("records")
        encoded, valid, problems = [], [], {}
        for i, row in enumerate(rows):
            try:
                encoded.append(encode_pair(self.processor, row, self.cfg.max_length, self.cfg.min_response_tokens,
                                           self.weak))
                valid.append(i)
            except SampleTooLong as err:
                problems[i] = str(err)
        columns = reference_columns(self.weak)
        scored = [[np.nan] * len(encoded) for _ in columns]
        if encoded and self.model is not None:
            logps = pair_logps(self.model, collate(encoded, pad_id(self.processor)), average=self.average)
            scored = [logps.chosen.tolist(), logps.rejected.tolist()]
            if self.weak:
                scored.append(logps.chosen_weak.tolist())
        for name, values in zip(columns, scored, strict=True):
            by_row = dict(zip(valid, values, strict=True))
            batch[name] = [by_row.get(i, np.nan) for i in range(len(rows))]
        batch["kind"] = ["error" if i in problems else "pair" for i in range(len(rows))]
        batch["stage"] = "reference"
        batch["reason"] = [SampleTooLong.reason if i in problems else "" for i in range(len(rows))]
        batch["detail"] = [problems.get(i, "") for i in range(len(rows))]
        return batch
