"""Generation engines behind one interface: ``engine.generate(conversations, images, sampling, seeds)``.

``HFEngine`` is transformers ``generate``, batched; the CPU default in Ray Data actors and Serve
replicas. Sampling is seeded *per row*: each row draws from its own generator, so a sample's output does
not depend on which batch it landed in (Ray Data batches differ between runs and cluster sizes).
The vLLM engine lives with Ray's own vLLM stages (``negatives/generation.py``, ``serve/``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from bpo_ray.models.prompts import adds_bos, build_prompt, tokenizer_of


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 → greedy
    top_p: float = 1.0
    max_new_tokens: int = 64


class PerRowSampler(LogitsProcessor):
    """Temperature + top-p sampling with one generator per row (and, for serving, per-row temperature and
    top-p; a row at temperature 0 stays greedy). Returns scores where only the drawn token is finite, so
    ``generate`` runs greedy on top of it."""

    def __init__(self, seeds: list[int], temperature: float | list[float], top_p: float | list[float]):
        n = len(seeds)
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature = torch.tensor(temperature if isinstance(temperature, list) else [temperature] * n)
        self.top_p = torch.tensor(top_p if isinstance(top_p, list) else [top_p] * n)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        sampled = self.temperature > 0
        temperature = torch.where(sampled, self.temperature, 1.0).to(scores.device)
        probs = torch.softmax(scores.float() / temperature[:, None], dim=-1)
        top_p = self.top_p.to(scores.device)
        if bool((top_p < 1.0).any()):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > top_p[:, None]  # keep the smallest nucleus
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        drawn = torch.stack([torch.multinomial(p.cpu(), 1, generator=g) if s else p.argmax(-1, keepdim=True).cpu()
                             for p, g, s in zip(probs, self.generators, sampled.tolist(), strict=True)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, drawn.to(scores.device), 0.0)


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str  # "stop": the model ended its answer; "length": cut at max_new_tokens


def generate(model, processor, conversations: list[list[dict]], images: list | None = None,
             sampling: Sampling = Sampling(), seeds: list[int] | None = None) -> list[str]:
    """One batch: plain chat messages (+ one PIL image each, or None for text-only models) → answers."""
    return [g.text for g in generate_detailed(model, processor, conversations, images, sampling, seeds)]


def eos_ids(model, tokenizer) -> set[int]:
    """Every token that ends an answer: the generation config's (one or several) and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    return {int(e) for e in [*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id] if e is not None}


@torch.inference_mode()
def generate_detailed(model, processor, conversations: list[list[dict]], images: list | None = None,
                      sampling: Sampling = Sampling(), seeds: list[int] | None = None) -> list[Generation]:
    """``generate``, with each answer's finish reason."""
    tokenizer = tokenizer_of(processor)
    with_image = images is not None
    prompts = [build_prompt(processor, messages, with_image=with_image) for messages in conversations]
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    special = adds_bos(processor, prompts[0])  # one template: the same answer for every prompt
    if with_image:
        inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt", add_special_tokens=special)
    else:
        inputs = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=special)
    inputs = inputs.to(model.device)
    extra = {}
    if sampling.temperature > 0:
        seeds = seeds if seeds is not None else list(range(len(prompts)))
        extra["logits_processor"] = LogitsProcessorList([PerRowSampler(seeds, sampling.temperature, sampling.top_p)])
    output = model.generate(**inputs, do_sample=False, max_new_tokens=sampling.max_new_tokens,
                            pad_token_id=tokenizer.pad_token_id, **extra)
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    stops = torch.tensor(sorted(eos_ids(model, tokenizer)), device=new_tokens.device)
    ended = torch.isin(new_tokens, stops).any(dim=-1).tolist()
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [Generation(text.strip(), "stop" if end else "length") for text, end in zip(texts, ended, strict=True)]


class HFEngine:
    """A loaded model + processor; ``vision=False`` for text-only LMs (error injection)."""

    def __init__(self, model_path: str, vision: bool = True, model_cfg=None):
        from bpo_ray.models.device import actor_device
        from bpo_ray.models.loader import load_llm, load_vlm

        self.vision = vision
        self.model, self.processor = (load_vlm if vision else load_llm)(model_path, model_cfg, device=actor_device())
        self.model.eval()
        self.name = model_path

    def generate(self, conversations: list[list[dict]], images: list | None, sampling: Sampling,
                 seeds: list[int] | None = None) -> list[str]:
        return [g.text for g in self.generate_detailed(conversations, images, sampling, seeds)]

    def generate_detailed(self, conversations: list[list[dict]], images: list | None, sampling: Sampling,
                          seeds: list[int] | None = None) -> list[Generation]:
        return generate_detailed(self.model, self.processor, conversations, images if self.vision else None,
                                 sampling, seeds)
