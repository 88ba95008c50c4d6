"""The one model loader: hub id, local directory or ``tiny://<arch>`` → model + processor.

Real checkpoints and the tiny ones the project builds go through the same ``from_pretrained`` calls.
Safetensors only; ``trust_remote_code`` only when the config says so.
"""

from __future__ import annotations

import fcntl
import logging
from pathlib import Path

import torch

from bpo_ray.config import TINY_SCHEME, ModelConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def _common_kwargs(cfg: ModelConfig) -> dict:
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    return kwargs


def load_processor(path: str, cfg: ModelConfig | None = None):
    """AutoProcessor of a vision-language model (text-only models use ``load_llm``'s tokenizer)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path, **_common_kwargs(cfg or ModelConfig()))


def load_vlm(path: str, cfg: ModelConfig | None = None, dtype: torch.dtype | None = None):
    """Image-text-to-text model (LLaVA, Qwen2-VL, …) and its processor."""
    from transformers import AutoModelForImageTextToText

    cfg = cfg or ModelConfig()
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype or _dtype(cfg), use_safetensors=True, **_common_kwargs(cfg))
    return model, load_processor(path, cfg)


def load_llm(path: str, cfg: ModelConfig | None = None, dtype: torch.dtype | None = None):
    """Text-only causal LM (the error-injection rewriter) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = cfg or ModelConfig()
    kwargs = _common_kwargs(cfg)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or _dtype(cfg), use_safetensors=True, **kwargs)
    return model, AutoTokenizer.from_pretrained(path, **kwargs)


def _dtype(cfg: ModelConfig):
    if cfg.dtype == "auto":
        # bf16 where the hardware has it; fp32 on CPU (our CPU path must be exact and fast enough).
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return DTYPES[cfg.dtype]


def save_model(model, processor, out_dir: str | Path) -> Path:
    """Save in the layout ``load_vlm``/``load_llm`` read back (safetensors)."""
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out
