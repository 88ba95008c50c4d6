"""Shared by the benchmarks: the models they run (the tiny LLaVA, and a ~75M-parameter one where compute
dominates), and one way to print and save a table."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def models(root: Path) -> dict[str, Path]:
    """{"tiny": ~0.6M-parameter LLaVA, "small": ~75M-parameter LLaVA}, built from configs (no hub)."""
    from bpo_ray.models.tiny import make_tiny

    tiny = make_tiny("llava", root / "tiny-llava")
    small = root / "small-llava"
    if not (small / "model.safetensors").exists():
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        from bpo_ray.models.loader import load_processor

        processor = load_processor(str(tiny))
        config = LlavaConfig.from_pretrained(tiny)
        text = config.text_config
        text.hidden_size, text.intermediate_size, text.num_hidden_layers = 768, 3072, 8
        text.num_attention_heads = text.num_key_value_heads = 768 // 32
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config)
        model.save_pretrained(small)
        processor.save_pretrained(small)
    return {"tiny": tiny, "small": small}


def parameters(path: Path) -> int:
    import math

    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 - safe_open is not iterable


def machine() -> dict:
    import os

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available(), "date": time.strftime("%Y-%m-%d")}


def table(title: str, columns: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def save(name: str, payload: dict, markdown: str) -> Path:
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown + "\n")
    print(markdown)
    print(f"\nwritten: {out}")
    return out
