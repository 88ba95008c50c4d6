"""Preference pairs → one concatenated, left-padded batch (chosen rows, then rejected rows, then, for the
image-conditional term, the chosen answer again on the weakened image) → log-probs.

One forward over chosen and rejected together. Sequences are left-padded so every response ends at the
right edge; the model returns logits only for the last ``K + 1`` positions (``logits_to_keep``), K being
the longest response in the batch: full-vocabulary logits are never materialised for prompt or image
tokens. RoPE attention depends on relative positions only, so left padding does not change the result.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bpo_ray.data.images import rows_with_images
from bpo_ray.data.records import decode_image
from bpo_ray.models.prompts import Encoded, SampleTooLong, encode_prompt_response, tokenizer_of
from bpo_ray.models.vision import ModelInputSize, model_input_size
from bpo_ray.negatives.batches import weakened_image
from bpo_ray.train.logprobs import IGNORE, sequence_logps


@dataclass(frozen=True)
class WeakImages:
    """How each pair's weakened image is rebuilt for the image-conditional term (``train.image_weight``): the
    negatives stage's distortions (or ``train.image_distortions``) and seed, at the model's input size, so it
    is the image the weakening negative was generated on unless the term names its own."""

    distortions: list[dict]
    seed: int
    size: ModelInputSize | None = None

    @classmethod
    def for_config(cls, cfg) -> WeakImages | None:
        """None when the run has no image-conditional term. ``cfg``: the run config."""
        if not cfg.train.image_weight:
            return None
        own = cfg.train.image_distortions
        distortions = cfg.negatives.weakening.distortions if own is None else own
        return cls([d.model_dump() for d in distortions], cfg.negatives.seed)

    def sized_for(self, processor) -> WeakImages:
        return WeakImages(self.distortions, self.seed, model_input_size(processor.image_processor))

    def __call__(self, pair: dict) -> bytes:
        return weakened_image(pair["image"], pair["sample_id"], self.distortions, self.seed, self.size)


def encode_pair(processor, pair: dict, max_length: int, min_response_tokens: int = 1,
                weak: WeakImages | None = None) -> tuple[Encoded, ...]:
    """A pairs-table row → (chosen, rejected) encodings, and with ``weak`` the chosen answer on the weakened
    image third; raises SampleTooLong."""
    messages = json.loads(pair["messages"])
    image = decode_image(pair["image"])
    chosen = encode_prompt_response(processor, messages, image, pair["chosen"], max_length, min_response_tokens)
    cut = bool(pair.get("rejected_truncated") or False)  # a negative kept though cut at max_new_tokens
    rejected = encode_prompt_response(processor, messages, image, pair["rejected"], max_length, min_response_tokens,
                                      ends_turn=not cut)
    if weak is None:
        return chosen, rejected
    chosen_weak = encode_prompt_response(processor, messages, decode_image(weak(pair)), pair["chosen"], max_length,
                                         min_response_tokens)
    return chosen, rejected, chosen_weak


class EncodingCache:
    """Encoded rows kept across epochs, up to ``budget_gib`` of memory: every epoch reads the same rows again,
    and fetching, decoding, resizing and tokenising them again can cost a small model as much as its forward
    pass (and, from a bucket, one image download per row per epoch at any model size). A row is keyed by its
    stored content (an image by its image-store file, or its inline bytes), so one key never stands for two
    encodings and a cached row encodes exactly as a fresh one. Once the budget is spent, further rows are
    encoded each time they come: with shuffled epochs, evicting one row for another gains nothing."""

    def __init__(self, budget_gib: float, images_root: str = ""):
        self.budget, self.used, self.images_root = int(budget_gib * 2**30), 0, images_root
        self._rows: dict[bytes, object] = {}
        self.hits = self.misses = 0

    def encode(self, rows: list[dict], encode_row: Callable[[dict], object]) -> list:
        """``encode_row(row)`` for each stored row (images by reference; fetched here for the rows not kept),
        None for a row it raised SampleTooLong on."""
        keys = [row_key(r) for r in rows]
        out = [self._rows.get(k, _MISSING) for k in keys]
        todo = [i for i, value in enumerate(out) if value is _MISSING]
        self.hits, self.misses = self.hits + len(rows) - len(todo), self.misses + len(todo)
        loaded = rows_with_images([rows[i] for i in todo], self.images_root) if todo else []
        for i, row in zip(todo, loaded, strict=True):
            try:
                out[i] = encode_row(row)
            except SampleTooLong:
                out[i] = None
            size = encoded_bytes(out[i])
            if self.used + size <= self.budget:
                self._rows[keys[i]], self.used = out[i], self.used + size
        return out


_MISSING = object()


def row_key(row: dict) -> bytes:
    """A digest of a stored row's content; an image-store row's empty ``image`` stands for its file's name."""
    return hashlib.blake2b(pickle.dumps(sorted(row.items()), protocol=5), digest_size=16).digest()


def encoded_bytes(value) -> int:
    """Memory held by an encoding (or a tuple of them): its image tensors, plus token ids as Python ints."""
    if value is None:
        return 0
    if isinstance(value, tuple):
        return sum(map(encoded_bytes, value))
    tensors = sum(t.numel() * t.element_size() for t in value.vision_inputs.values())
    tokens = len(value.input_ids) + sum(len(v) for v in value.token_types.values())
    return tensors + 36 * tokens + 512  # a list slot and an int object per token; the objects around them


@dataclass
class PairBatch:
    inputs: dict[str, torch.Tensor]  # model kwargs (input_ids, attention_mask, vision tensors, ...)
    labels: torch.Tensor  # (2B, K): next-token targets for the last K positions, IGNORE off-response
    logits_to_keep: int
    num_pairs: int


def collate(pairs: list[tuple[Encoded, ...]], pad_token_id: int) -> PairBatch:
    """``encode_pair`` results → one batch: every pair's first encoding, then every second one, ..."""
    groups = len(pairs[0])
    inputs, labels, keep = collate_rows([p[g] for g in range(groups) for p in pairs], pad_token_id)
    return PairBatch(inputs, labels, keep, len(pairs))


def collate_rows(rows: list[Encoded], pad_token_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """Encoded rows → (model inputs, response labels for the last K positions, logits_to_keep = K + 1)."""
    length = max(len(e.input_ids) for e in rows)
    keep = max(len(e.response_ids) for e in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), keep), IGNORE, dtype=torch.long)
    token_types = {k: torch.zeros((len(rows), length), dtype=torch.long) for k in rows[0].token_types}
    for i, e in enumerate(rows):
        n, r = len(e.input_ids), len(e.response_ids)
        input_ids[i, length - n:] = torch.tensor(e.input_ids)
        attention[i, length - n:] = 1
        labels[i, keep - r:] = torch.tensor(e.response_ids)
        for k, values in e.token_types.items():
            token_types[k][i, length - n:] = torch.tensor(values)
    vision = {k: torch.cat([e.vision_inputs[k] for e in rows], dim=0) for k in rows[0].vision_inputs}
    return {"input_ids": input_ids, "attention_mask": attention, **token_types, **vision}, labels, keep + 1


def response_nll(model, inputs: dict[str, torch.Tensor], labels: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
    """Mean negative log-likelihood per response token (SFT), with the same kept-logits forward as DPO."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    logits = model(**inputs, logits_to_keep=logits_to_keep, use_cache=False).logits[:, :-1]
    logps, counts = sequence_logps(logits, labels.to(device))
    return -(logps.sum() / counts.sum().clamp(min=1))


@dataclass
class PairLogps:
    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_token_sum: torch.Tensor  # summed log-probs of chosen (for the SFT term, whatever ``average``)
    chosen_tokens: torch.Tensor
    chosen_weak: torch.Tensor | None = None  # the chosen answer on the weakened image, when the batch has it


def pair_logps(model, batch: PairBatch, average: bool = False) -> PairLogps:
    """Forward the concatenated batch; (mean, for IPO) response log-probs for chosen and rejected (and the
    chosen answer on the weakened image, for batches of ``encode_pair(..., weak=...)``)."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.inputs.items()}
    logits = model(**inputs, logits_to_keep=batch.logits_to_keep, use_cache=False).logits[:, :-1]
    labels = batch.labels.to(device)
    logps, counts = sequence_logps(logits, labels, average=average)
    summed = logps * counts if average else logps
    b = batch.num_pairs
    weak = logps[2 * b:] if len(logps) == 3 * b else None
    return PairLogps(logps[:b], logps[b:2 * b], summed[:b], counts[:b], weak)


def pad_id(processor) -> int:
    tokenizer = tokenizer_of(processor)
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
