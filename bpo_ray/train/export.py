"""Export: a standalone Hugging Face model directory (safetensors + processor) from the trained engine.

ZeRO-3 leaves each rank with a shard (ray#43285): every rank joins the gather, rank 0 loads the full
weights into a fresh copy of the base model (with the same LoRA wrapping), merges LoRA (or saves just
the adapter when ``train.merge_lora_on_export`` is false) and saves. The result loads with plain
``from_pretrained`` and with vLLM.
"""

from __future__ import annotations

import logging
import tempfile

import torch

from bpo_ray import storage
from bpo_ray.config import RunConfig
from bpo_ray.models.loader import load_vlm
from bpo_ray.train.setup import prepare_model

log = logging.getLogger("bpo_ray.train")


def full_state_dict(engine, zero_stage: int, rank: int) -> dict | None:
    """All ranks must call this (ZeRO-3 gathers collectively); rank 0 gets the weights, others None."""
    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if rank == 0 else None
    return {k: v.detach().to("cpu", torch.float32) for k, v in state.items()} if rank == 0 else None


def export_model(engine, cfg: RunConfig, base_path: str, out_dir: str, rank: int) -> None:
    state = full_state_dict(engine, cfg.train.zero_stage, rank)
    if rank != 0:
        return
    base, processor = load_vlm(base_path, cfg.model, dtype=torch.float32)
    model = prepare_model(base, cfg.train.model_copy(update={"gradient_checkpointing": False}))
    model.load_state_dict(state, strict=True)
    lora = cfg.train.lora.enabled
    if lora and cfg.train.merge_lora_on_export:
        model = model.merge_and_unload()
    model.config.use_cache = True
    with tempfile.TemporaryDirectory() as tmp:
        target = out_dir if not storage.is_uri(out_dir) else tmp
        model.save_pretrained(target, safe_serialization=True)  # a peft model saves just its adapter
        processor.save_pretrained(target)
        if storage.is_uri(out_dir):
            storage.upload_dir(tmp, out_dir)
    log.info("exported %s to %s", "LoRA adapter" if lora and not cfg.train.merge_lora_on_export else "model",
             out_dir)
