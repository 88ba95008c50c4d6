"""Batched generation with transformers: the core of the ``hf`` engine (Ray Data actors, Serve replicas)."""

from __future__ import annotations

import torch

from bpo_ray.models.prompts import build_prompt, tokenizer_of


def sampling_kwargs(temperature: float, top_p: float, max_new_tokens: int) -> dict:
    if temperature <= 0:
        return {"do_sample": False, "max_new_tokens": max_new_tokens}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}


@torch.inference_mode()
def generate(model, processor, conversations: list[list[dict]], images: list | None = None, *,
             temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 64,
             seed: int | None = None) -> list[str]:
    """One batch: plain chat messages (+ one PIL image each, or None for text-only models) → answers."""
    tokenizer = tokenizer_of(processor)
    with_image = images is not None
    prompts = [build_prompt(processor, messages, with_image=with_image) for messages in conversations]
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    if with_image:
        inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt", add_special_tokens=False)
    else:
        inputs = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    inputs = inputs.to(model.device)
    if seed is not None:
        torch.manual_seed(seed)
    output = model.generate(**inputs, **sampling_kwargs(temperature, top_p, max_new_tokens),
                            pad_token_id=tokenizer.pad_token_id)
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
