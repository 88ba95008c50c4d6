"""Evaluation over HTTP: POPE probes and CHAIR captions on held-out synthetic images (truth known), POPE on
a user's COCO annotations. ``evaluate`` scores one OpenAI-compatible endpoint (``bpo eval`` and the eval
stage call it)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from bpo_ray.config import RunConfig, SyntheticDataConfig
from bpo_ray.data.synthetic import COLORS, COMPANIONS, DESCRIBE_PROMPT, SHAPES
from bpo_ray.eval.client import Endpoint, ask_all, image_message
from bpo_ray.eval.metrics import (
    chair_caption,
    chair_metrics,
    companion_hallucination,
    normalize_caption,
    parse_yes_no,
    pope_metrics,
)
from bpo_ray.eval.probes import build_probes, coco_images, synthetic_images

log = logging.getLogger(__name__)
POPE_MAX_TOKENS = 12
CAPTION_MAX_TOKENS = 64


def _pope(endpoint: Endpoint, images, vocabulary, splits, seed, concurrency, task: str):
    metrics, rows = {}, []
    for split in splits:
        probes = build_probes(images, vocabulary, split, seed)
        answers = ask_all(endpoint, [image_message(p.image, p.question) for p in probes], POPE_MAX_TOKENS,
                          concurrency)
        said, labels, unclear = [], [], 0
        for probe, answer in zip(probes, answers, strict=True):
            rows.append({"task": task, "split": split, "image_id": probe.image_id, "question": probe.question,
                         "label": probe.label, "answer": answer.text, "error": answer.error})
            if answer.error is None:
                yes, understood = parse_yes_no(answer.text)
                said.append(yes)
                labels.append(probe.label)
                unclear += not understood
        metrics[split] = {**pope_metrics(said, labels), "unclear": unclear,
                          "errors": sum(a.error is not None for a in answers)}
    return metrics, rows


def evaluate_synthetic(endpoint: Endpoint, dataset_dir: str | Path, splits, seed: int = 0,
                       concurrency: int = 16) -> tuple[dict, list[dict]]:
    """POPE (each split) + CHAIR on a shapes dataset directory (truth.jsonl, records.json, images/)."""
    dataset_dir = Path(dataset_dir)
    images = synthetic_images(dataset_dir)
    vocabulary = [f"{c} {s}" for c in COLORS for s in SHAPES]
    pope, rows = _pope(endpoint, images, vocabulary, splits, seed, concurrency, "pope")

    truth_captions = {r["id"].removesuffix("-desc"): r["conversations"][1]["value"]
                      for r in json.loads((dataset_dir / "records.json").read_text()) if r["id"].endswith("-desc")}
    answers = ask_all(endpoint, [image_message(img.image, DESCRIBE_PROMPT) for img in images], CAPTION_MAX_TOKENS,
                      concurrency)
    scored, exact, captions, objects = [], [], [], []
    for img, answer in zip(images, answers, strict=True):
        truth = [tuple(name.split(" ", 1)) for name in img.objects]
        row = {"task": "chair", "split": "caption", "image_id": img.image_id, "question": DESCRIBE_PROMPT,
               "label": truth_captions.get(img.image_id), "answer": answer.text, "error": answer.error}
        if answer.error is None:
            score = chair_caption(answer.text, truth, COLORS, SHAPES)
            scored.append(score)
            exact.append(normalize_caption(answer.text) == normalize_caption(row["label"] or ""))
            captions.append(answer.text)
            objects.append(truth)
            row["hallucinated"] = score["hallucinated_objects"]
        rows.append(row)
    chair = {**chair_metrics(scored, exact), "errors": sum(a.error is not None for a in answers),
             "companion_hallucination": companion_hallucination(captions, objects, COMPANIONS, COLORS, SHAPES)}
    return {"pope": pope, "chair": chair, "images": len(images)}, rows


def evaluate_coco(endpoint: Endpoint, annotations: str, image_root: str, num_images: int, splits, seed: int = 0,
                  concurrency: int = 16) -> tuple[dict, list[dict]]:
    images, vocabulary = coco_images(annotations, image_root, num_images, seed)
    pope, rows = _pope(endpoint, images, vocabulary, splits, seed, concurrency, "coco_pope")
    return {"coco_pope": pope, "coco_images": len(images)}, rows


def evaluate(endpoint: Endpoint, cfg: RunConfig, dataset_dir: str | Path) -> tuple[dict, list[dict]]:
    """Everything the eval section asks for, against one endpoint."""
    ev = cfg.eval
    metrics, rows = evaluate_synthetic(endpoint, dataset_dir, ev.pope_splits, ev.seed, ev.concurrency)
    if ev.coco_annotations:
        coco, coco_rows = evaluate_coco(endpoint, ev.coco_annotations, ev.coco_image_root, ev.num_images,
                                        ev.pope_splits, ev.seed, ev.concurrency)
        metrics.update(coco)
        rows += coco_rows
    return metrics, rows


def heldout_dir(cfg: RunConfig) -> Path:
    """Held-out shapes: the training generator's settings with the eval seed and size (and companion rate,
    when the eval section sets one)."""
    from bpo_ray.data.dataset import synthetic_dir

    settings = cfg.data.synthetic.model_dump() | {"num_images": cfg.eval.num_images, "seed": cfg.eval.seed}
    if cfg.eval.cooccurrence is not None:
        settings["cooccurrence"] = cfg.eval.cooccurrence
    return synthetic_dir(SyntheticDataConfig(**settings), cfg.cache_dir)
