"""The one device rule: a model goes to the accelerator Ray gave the actor that holds it, in the precision
the config names for it (``auto``: bf16 on a GPU, fp32 on the CPU); tensors meet on the model's device.

Used by every actor that holds a model outside DeepSpeed (generation, reference scoring, serve replicas);
training workers hand their model to DeepSpeed, which places it on the same device.
"""

from __future__ import annotations

import torch

# Model dtypes (``model.dtype``) and training precisions (``train.precision``) by name.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def actor_device() -> torch.device:
    """The first accelerator Ray assigned to this process, else the CPU.

    Ray sets ``CUDA_VISIBLE_DEVICES`` to an actor's own GPUs, so its first is ``cuda:0`` in-process. An actor
    that reserved none runs on the CPU even where the node's GPUs are visible to it; outside Ray (scripts,
    the GPU smoke test) the first visible GPU is used."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    try:
        import ray
    except ImportError:  # a GPU machine without Ray (the GPU smoke check)
        return torch.device("cuda", 0)
    if ray.is_initialized() and not ray.get_gpu_ids():
        return torch.device("cpu")
    return torch.device("cuda", 0)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A dtype or precision name for a model on ``device``; ``auto`` is bf16 on a GPU and fp32 on the CPU
    (our CPU path must be exact)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def on_device(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` where ``like`` lives (log-probs read from a table enter the loss on the policy's device)."""
    return tensor.to(device=like.device, dtype=like.dtype, non_blocking=True)
