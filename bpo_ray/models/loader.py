"""The one model loader: hub id, local directory or ``tiny://<arch>`` → model + processor.

Real checkpoints and the tiny ones the project builds go through the same ``from_pretrained`` calls.
Safetensors only; ``trust_remote_code`` only when the config says so.
"""

from __future__ import annotations

import fcntl
import logging
from pathlib import Path

import torch

from bpo_ray import storage
from bpo_ray.config import TINY_SCHEME, ModelConfig
from bpo_ray.models.device import resolve_dtype

log = logging.getLogger(__name__)


def resolve_model_path(name_or_path: str, cache_dir: str | Path) -> str:
    """``tiny://llava`` → a directory in the cache, built on first use (one builder at a time: Ray actors
    on one node may all ask at once). Anything else is returned as is (a hub id or a path)."""
    if not name_or_path.startswith(TINY_SCHEME):
        return name_or_path
    from bpo_ray.models import TINY_VERSION
    from bpo_ray.models.tiny import make_tiny

    arch = name_or_path[len(TINY_SCHEME):]
    root = Path(cache_dir).absolute() / "models"
    target = root / f"tiny-{arch}-v{TINY_VERSION}"  # a changed builder never reuses an old build
    if (target / "config.json").exists():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".tiny-{arch}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            log.info("building tiny %s model in %s", arch, target)
            make_tiny(arch, target)
    return str(target)


def local_model_path(path: str) -> str:
    """``from_pretrained`` reads hub ids and local directories: a model on cloud storage (``s3://``, ``gs://``,
    e.g. a run's ``sft/model``) is copied to this node first, once per version (``storage.local_dir``)."""
    return storage.local_dir(path) if storage.is_uri(path) else path


def _common_kwargs(cfg: ModelConfig) -> dict:
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    return kwargs


def load_processor(path: str, cfg: ModelConfig | None = None):
    """AutoProcessor of a vision-language model (text-only models use ``load_llm``'s tokenizer)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(local_model_path(path), **_common_kwargs(cfg or ModelConfig()))


def _placement(cfg: ModelConfig, dtype: torch.dtype | None, device: torch.device | None) -> dict:
    """from_pretrained arguments: the dtype (``model.dtype`` resolved for the device unless given), the
    attention kernel, and, for an accelerator, loading straight onto it (a 7B model never sits in host
    memory in full)."""
    kwargs = {"dtype": dtype or resolve_dtype(cfg.dtype, device or torch.device("cpu")),
              "attn_implementation": cfg.attn_implementation}
    if device is not None and device.type != "cpu":
        kwargs["device_map"] = str(device)
    return kwargs


def load_vlm(path: str, cfg: ModelConfig | None = None, dtype: torch.dtype | None = None,
             device: torch.device | None = None):
    """Image-text-to-text model (LLaVA, Qwen2-VL, …) and its processor. ``device``: where the model goes
    (None: the CPU, as a training worker loads it for DeepSpeed to place)."""
    from transformers import AutoModelForImageTextToText

    cfg = cfg or ModelConfig()
    path = local_model_path(path)
    model = AutoModelForImageTextToText.from_pretrained(
        path, use_safetensors=True, **_placement(cfg, dtype, device), **_common_kwargs(cfg))
    return model, load_processor(path, cfg)


def load_tokenizer(path: str, cfg: ModelConfig | None = None):
    """A text LLM's tokenizer, with the Vicuna v1.1 format where it ships no chat template (every engine that
    prompts it, hf, vLLM and serve alike, gets the same prompts)."""
    from transformers import AutoTokenizer

    from bpo_ray.models.prompts import with_chat_template

    path = local_model_path(path)
    return with_chat_template(AutoTokenizer.from_pretrained(path, **_common_kwargs(cfg or ModelConfig())), path)


def load_llm(path: str, cfg: ModelConfig | None = None, dtype: torch.dtype | None = None,
             device: torch.device | None = None):
    """Text-only causal LM (the error-injection rewriter) and its tokenizer (``load_tokenizer``)."""
    from transformers import AutoModelForCausalLM

    cfg = cfg or ModelConfig()
    path = local_model_path(path)
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **_placement(cfg, dtype, device),
                                                 **_common_kwargs(cfg))
    return model, load_tokenizer(path, cfg)


def save_model(model, processor, out_dir: str | Path) -> Path:
    """Save in the layout ``load_vlm``/``load_llm`` read back (safetensors)."""
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out
