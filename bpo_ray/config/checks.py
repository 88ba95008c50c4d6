"""Config combinations that cannot work, each with a message that names its keys (checked when the run
config is validated, before Ray starts)."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bpo_ray.config.sections import RunConfig, ServeConfig

# ``tiny://<arch>`` names a tiny random model that the project builds itself (bpo make-tiny) on first use.
TINY_SCHEME = "tiny://"
TINY_ARCHS = ("llava", "qwen2_vl", "llm")


def bootstraps(cfg: RunConfig) -> bool:
    """Whether the negatives stage makes pairs from the run's own data (else it only reads extra_pairs)."""
    neg = cfg.negatives
    return neg.weakening.enabled or neg.injection.enabled or neg.existence.enabled


def impossible_combinations(cfg: RunConfig):
    model = cfg.model.name_or_path
    if model.startswith(TINY_SCHEME) and model[len(TINY_SCHEME):] not in ("llava", "qwen2_vl"):
        yield f"model.name_or_path {model!r}: the policy must be a vision model (tiny://llava or tiny://qwen2_vl)"
    injector = cfg.negatives.injection.model
    if injector.startswith(TINY_SCHEME) and injector[len(TINY_SCHEME):] not in TINY_ARCHS:
        yield f"negatives.injection.model {injector!r}: unknown tiny arch (choose from {', '.join(TINY_ARCHS)})"
    neg = cfg.negatives
    if not bootstraps(cfg) and neg.extra_pairs is None:
        yield ("negatives: weakening, injection and existence are all disabled and there are no extra_pairs, "
               "so no rejected answers can be made")
    vocabulary = neg.injection.vocabulary
    if neg.injection.enabled and neg.injection.engine == "rules" and vocabulary not in ("auto", "general", "shapes"):
        from bpo_ray.negatives.vocabulary import load

        try:
            load(vocabulary)
        except ValueError as err:
            yield f"negatives.injection.vocabulary: {err}"
    if neg.existence.enabled and neg.existence.annotations is None and cfg.data.format != "synthetic":
        yield ("negatives.existence needs object annotations for these images: set negatives.existence.annotations "
               "(a COCO instances file), or negatives.existence.enabled=false; only the bundled shapes carry their own")
    if neg.weakening.enabled and not neg.weakening.distortions:
        yield "negatives.weakening.distortions is empty while weakening is enabled"
    if not cfg.resources.use_gpu:
        if neg.weakening.enabled and neg.weakening.engine == "vllm":
            yield ("negatives.weakening.engine 'vllm' needs GPUs (multimodal vLLM runs on GPU clusters); "
                   "set resources.use_gpu=true or use engine 'hf'")
        if cfg.serve.engine == "vllm" and cfg.serve.num_gpus_per_replica == 0:
            yield "serve.engine 'vllm' serves the multimodal model on GPUs; set serve.num_gpus_per_replica"
        if cfg.train.precision in ("bf16", "fp16"):
            yield f"train.precision {cfg.train.precision!r} needs GPUs; CPU training runs in fp32 (use 'auto')"
        if cfg.resources.gpus_per_worker > 0:
            yield "resources.gpus_per_worker > 0 but resources.use_gpu is false"
    train = cfg.train
    if train.reference == "adapter_disabled" and not train.lora.enabled:
        yield "train.reference 'adapter_disabled' needs train.lora.enabled=true (the reference is the base without adapters)"
    if train.loss == "robust" and train.label_smoothing == 0.0:
        yield "train.loss 'robust' needs train.label_smoothing > 0 (with 0 it is plain sigmoid DPO)"
    if cfg.rounds > 1 and train.lora.enabled and not train.merge_lora_on_export:
        yield ("rounds > 1 needs train.merge_lora_on_export=true: each round starts from the model the round "
               "before exported, which must be a whole model")
    image_distortions = neg.weakening.distortions if train.image_distortions is None else train.image_distortions
    if train.image_weight and not image_distortions:
        yield ("train.image_weight needs distortions to make the image it prefers less: train.image_distortions, "
               "or negatives.weakening.distortions when that is unset")
    if train.loss != "robust" and train.loss != "sigmoid" and train.label_smoothing > 0:
        yield f"train.label_smoothing applies to 'sigmoid'/'robust' losses, not {train.loss!r}"
    if cfg.sft.enabled and not cfg.resources.use_gpu and cfg.sft.precision in ("bf16", "fp16"):
        yield f"sft.precision {cfg.sft.precision!r} needs GPUs; CPU training runs in fp32 (use 'auto')"
    if cfg.sft.enabled and cfg.sft.data.format == "synthetic" and cfg.eval.enabled \
            and cfg.sft.data.synthetic.seed == cfg.eval.seed:
        yield "sft.data.synthetic.seed equals eval.seed: the base would be fine-tuned on the evaluation images"
    for name, section in (("train", train), ("sft", cfg.sft)):
        if section.vision_lr is not None and section.freeze_vision_tower and (name == "train" or cfg.sft.enabled):
            yield f"{name}.vision_lr is set, but the vision tower is frozen (set {name}.freeze_vision_tower=false)"
    if train.offload_params and train.zero_stage != 3:
        yield "train.offload_params needs train.zero_stage=3 (parameter offload is a ZeRO-3 feature)"
    if train.offload_optimizer and train.zero_stage == 0:
        yield "train.offload_optimizer needs train.zero_stage 2 or 3"
    if cfg.eval.enabled and cfg.data.format == "synthetic" and cfg.eval.seed == cfg.data.synthetic.seed:
        yield "eval.seed equals data.synthetic.seed: the evaluation images would be the training images"
    if bool(cfg.eval.coco_annotations) != bool(cfg.eval.coco_image_root):
        yield "eval.coco_annotations and eval.coco_image_root go together (the file and where its images are)"
    local = {"cache_dir": cfg.cache_dir, "serve.local_image_root": cfg.serve.local_image_root,
             "tracking.wandb.dir": cfg.tracking.wandb.dir if cfg.tracking.wandb else None}
    for key, path in local.items():
        if path and "://" in path:  # read as a plain local path: s3://b/x became a folder named s3: here
            yield f"{key} {path!r} must be a local path (a folder on each node), not a URI"
    for backend, module in (("mlflow", "mlflow"), ("wandb", "wandb")):
        if getattr(cfg.tracking, backend) is not None and importlib.util.find_spec(module) is None:
            yield f"tracking.{backend} is set but {module} is not installed: pip install 'bpo-ray[tracking]'"
    yield from serve_problems(cfg.serve)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve_problems(serve: ServeConfig):
    """Serve settings that cannot work together (also checked by ``bpo serve`` without a run config)."""
    if serve.engine == "vllm" and serve.api_key:
        yield ("serve.api_key is not enforced by the vllm engine (ray.serve.llm has no auth); use engine 'hf' "
               "or put the endpoint behind an authenticating proxy")
    if serve.host not in LOOPBACK and not serve.api_key:
        yield (f"serve.host {serve.host!r} exposes the endpoint beyond loopback without serve.api_key; "
               "set an api_key (engine 'hf') or bind to 127.0.0.1")
    if serve.engine == "vllm" and (serve.local_image_root or serve.allow_remote_images):
        yield "serve.local_image_root / allow_remote_images are hf-engine settings; vLLM has its own media policy"
