"""Model preparation, the generated DeepSpeed config (plain functions of the train config) and DeepSpeed's
start in a worker (the process group it adopts, the CPU probe it repeats)."""

from __future__ import annotations

import logging
import math
import os
import warnings

from bpo_ray.config import TrainConfig

# Where vision-language models keep their parts (LLaVA, Qwen-VL, Idefics/SmolVLM, Gemma3, …).
VISION_NAMES = ("vision_tower", "visual", "vision_model")
PROJECTOR_NAMES = ("multi_modal_projector", "merger", "connector")
LM_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


def precision(train: TrainConfig, use_gpu: bool) -> str:
    if train.precision == "auto":
        return "bf16" if use_gpu else "fp32"
    return train.precision


def _named_modules(model, names) -> list[tuple[str, object]]:
    """(full name, module) for every module whose own name is one of ``names``."""
    return [(name, module) for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in names]


def _modules(model, names):
    return [module for _, module in _named_modules(model, names)]


def full_copies(model, train: TrainConfig, freeze_projector: bool) -> list[str] | None:
    """The vision parts a LoRA run trains in full. peft freezes everything but its adapters; a part listed
    here trains as a copy that the adapter saves and ``disable_adapter`` switches off (so the
    adapter_disabled reference stays the base model). A projector inside a trained tower goes with it."""
    towers = [] if train.freeze_vision_tower else [n for n, _ in _named_modules(model, VISION_NAMES)]
    projectors = [] if freeze_projector else [n for n, _ in _named_modules(model, PROJECTOR_NAMES)
                                              if not any(n.startswith(t + ".") for t in towers)]
    return [n.rsplit(".", 1)[-1] for n in towers + projectors] or None


def prepare_model(model, train: TrainConfig):
    """Freeze what the config freezes, add LoRA to the language model, enable gradient checkpointing.

    Reentrant checkpointing + input embeddings that require grad: the combination that works with a frozen
    vision tower and with a LoRA base under ZeRO-3 (non-reentrant raises CheckpointError there).
    """
    lora = train.lora.enabled
    freeze_projector = lora if train.freeze_projector is None else train.freeze_projector
    if train.freeze_vision_tower:
        for module in _modules(model, VISION_NAMES):
            module.requires_grad_(False)
    projectors = _modules(model, PROJECTOR_NAMES)
    for module in projectors:  # Qwen's merger sits inside the vision tower: decide it explicitly
        module.requires_grad_(not freeze_projector)
    if lora:
        from peft import LoraConfig, get_peft_model

        targets = LM_LINEAR if train.lora.target_modules == "all-linear" else train.lora.target_modules
        with warnings.catch_warnings():  # peft asks the model through transformers' old, warning name
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            model = get_peft_model(model, LoraConfig(r=train.lora.r, lora_alpha=train.lora.alpha,
                                                     lora_dropout=train.lora.dropout, target_modules=targets,
                                                     modules_to_save=full_copies(model, train, freeze_projector)))
    if train.gradient_checkpointing:
        reentrant = {"use_reentrant": True}
        if hasattr(model, "activation_checkpointing_enable"):  # its name since transformers 5.23
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=reentrant)
        else:  # older 5.x: the old name (it warns from 5.23 on, and goes in 6)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=reentrant)
        model.enable_input_require_grads()
    model.config.use_cache = False
    return model


def disable_dropout(model) -> None:
    """Every dropout off (LoRA's included), as TRL does for DPO: log-probs the loss compares with the
    reference's must not carry random masks."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def param_groups(model, train: TrainConfig) -> list[dict]:
    """The optimizer's parameter groups: what trains, the vision tower at ``train.vision_lr`` when set (its
    projector, Qwen's merger included, stays at ``lr``). The first group's rate is the one the metrics log.
    (DeepSpeed's WarmupCosineLR scales each group's own rate.)"""
    if train.vision_lr is None:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    language, tower = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            parts = set(name.split("."))
            on_tower = not parts.isdisjoint(VISION_NAMES) and parts.isdisjoint(PROJECTOR_NAMES)
            (tower if on_tower else language).append(param)
    groups = [{"params": language}, {"params": tower, "lr": train.vision_lr}]
    return [g for g in groups if g["params"]]


def trainable_parameters(model) -> tuple[int, int]:
    def size(p):  # ZeRO-3 leaves a 0-element placeholder; ds_numel is the real size
        return getattr(p, "ds_numel", p.numel())

    return sum(size(p) for p in model.parameters() if p.requires_grad), sum(size(p) for p in model.parameters())


def optimizer_steps(num_pairs: int, train: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro-batches per epoch per worker, total optimizer steps)."""
    per_worker = num_pairs // world_size
    micro_per_epoch = max(1, math.ceil(per_worker / train.per_device_batch_size))
    total = max(1, math.ceil(train.epochs * micro_per_epoch / train.gradient_accumulation_steps))
    if train.max_steps:
        total = min(total, train.max_steps)
    return micro_per_epoch, total


def deepspeed_config(train: TrainConfig, world_size: int, use_gpu: bool, total_steps: int) -> dict:
    prec = precision(train, use_gpu)
    zero: dict = {"stage": train.zero_stage}
    if train.zero_stage == 3:
        # Gather full weights on save: without it a ZeRO-3 LoRA export is empty (trl#4416).
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if train.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    warmup = max(1, int(round(train.warmup_ratio * total_steps)))  # DeepSpeed rejects 0
    adamw = {"lr": train.lr, "weight_decay": train.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8}
    if use_gpu and not train.offload_optimizer:
        # torch's AdamW on the GPU: DeepSpeed's FusedAdam is compiled with nvcc at first use, which runtime
        # images (and most clusters) do not have; torch's multi-tensor AdamW needs no build.
        adamw["torch_adam"] = True
    return {
        "train_micro_batch_size_per_gpu": train.per_device_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.per_device_batch_size * train.gradient_accumulation_steps * world_size,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": prec == "bf16"},
        "fp16": {"enabled": prec == "fp16"},
        "optimizer": {"type": "AdamW", "params": adamw},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": max(total_steps, warmup + 1), "warmup_num_steps": warmup,
            "warmup_min_ratio": 0.0, "cos_min_ratio": 0.0, "warmup_type": "linear"}},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def quiet_deepspeed(use_gpu: bool) -> None:
    """Keep out of the job's log what DeepSpeed prints in a worker that says nothing about the run: on the CPU
    path, its notice that it found no GPU (the config asked for none, so name the accelerator before DeepSpeed
    loads); torch's FutureWarning for the collectives ZeRO-3 calls by their deprecated names, which fires again
    after any ``warnings.catch_warnings`` block (in the demo, a line a step per rank); and its scheduler's
    warning, when DeepSpeed builds the schedule, that its rate was read before the first step."""
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
    logging.getLogger("DeepSpeed").addFilter(_not_the_schedule_build)  # added once however often it is called


def _not_the_schedule_build(record) -> bool:
    return "before it has started" not in record.getMessage()


def quiet_ray_train_reports() -> None:
    """Ray Train logs two INFO lines per rank at every checkpoint: "Checkpoint successfully created at" and
    "Reporting training result N: TrainingReport(...)" with the whole metrics dict (in the demo, 54 of the log's
    477 lines, a third of its bytes). Both modules log nothing else at INFO; warnings still print. Rank 0 logs one
    line per checkpoint itself (the loop)."""
    from ray.train.v2._internal.execution import context, storage

    for name in (context.__file__, storage.__name__):  # context.py names its logger after its file
        logging.getLogger(name).setLevel(logging.WARNING)


def adopt_process_group() -> None:
    """Hand the torch process group Ray Train created to DeepSpeed (before zero.Init or initialize, or it sees
    a world of one). On the CPU, DeepSpeed would also compile (~30 s on a fresh machine) and load a shared-memory
    all-reduce that only tensor-parallel inference calls (``inference_all_reduce``): ZeRO's collectives go
    through torch.distributed. Marked incompatible in ``deepspeed.ops.__compatible_ops__``, the dict DeepSpeed
    reads before building it, it is skipped. Accelerators without the op (CUDA) leave the dict unread, as
    DeepSpeed does: reading it probes every op."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    shm_all_reduce = get_accelerator().get_op_builder("ShareMemCommBuilder")
    if shm_all_reduce is not None:
        deepspeed.ops.__compatible_ops__[shm_all_reduce.NAME] = False
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())


def probe_the_cpu_once() -> None:
    """DeepSpeed's CPU op builders ask py-cpuinfo for an op's compile flags each time they load it, a cached
    build included, and ask twice (``-march``, then the SIMD width). Each answer is a new Python subprocess
    that probes the CPU: 1.1 to 2.3 s on 2 cores, per worker, per training run. The CPU does not change under
    a process, so its first answer serves both, and any later load."""
    import functools

    import cpuinfo  # a DeepSpeed dependency; its builders import the function from the module at each call

    if not hasattr(cpuinfo.get_cpu_info, "cache_info"):
        cpuinfo.get_cpu_info = functools.cache(cpuinfo.get_cpu_info)
