"""The DPO step on one GPU (bf16): ours against TRL's ``DPOTrainer`` step, same model, same rows.

    python benchmarks/bench_dpo_gpu.py [--size 1b|tiny] [--pairs 8] [--steps 10]

The model is a ~1B-parameter LLaVA built from config (CLIP-style tower at 336 px → 576 image tokens,
Llama LM 2048 wide × 16 layers, 32k vocabulary), random weights, bf16. Both sides get the same
preference rows (shapes images, annotated caption vs rule-injected caption) and each step is policy forward + backward over chosen and rejected together:
- ours: ``train.batch.collate`` (left-padded, one forward) + ``pair_logps`` (``logits_to_keep``: no
  full-vocabulary logits for prompt and image tokens) + ``dpo_loss``;
- TRL: the batch its ``DataCollatorForVisionPreference`` builds, through ``DPOTrainer.training_step``. TRL
  refuses precomputed reference log-probs for VLMs, so its step also runs the reference forward; ours is
  measured both ways (precomputed, our default; and live, a frozen copy scored in the step).
Reports step time, tokens/s (non-padding tokens), model-FLOPs utilisation (6·N per token, against the
card's dense bf16 peak) and peak memory. Needs torch, transformers and (for the TRL side) trl + datasets;
no Ray. ``--size tiny`` runs the same code on CPU in seconds (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bpo_ray.data.synthetic import DESCRIBE_PROMPT, describe  # noqa: E402
from bpo_ray.data.synthetic import generate as shapes  # noqa: E402
from bpo_ray.models.tiny import LLAVA_CHAT_TEMPLATE, train_tokenizer  # noqa: E402
from bpo_ray.negatives.inject import rules_inject  # noqa: E402
from bpo_ray.negatives.vocabulary import SHAPES  # noqa: E402
from bpo_ray.train.batch import collate, encode_pair, pad_id, pair_logps  # noqa: E402
from bpo_ray.train.losses import dpo_loss  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, no sparsity
SIZES = {  # (vision width, vision layers, image px, patch, LM width, LM layers, LM ffn, vocab)
    "1b": (1024, 6, 336, 14, 2048, 16, 5632, 32000),
    "tiny": (64, 2, 64, 8, 128, 2, 256, 1024),
}


def build(size: str, device: str):
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    vw, vl, px, patch, w, layers, ffn, vocab = SIZES[size]
    tokenizer = train_tokenizer("llava")
    vision = CLIPVisionConfig(hidden_size=vw, intermediate_size=4 * vw, num_hidden_layers=vl,
                              num_attention_heads=vw // 64 or 1, image_size=px, patch_size=patch, projection_dim=vw)
    text = LlamaConfig(vocab_size=max(vocab, len(tokenizer)), hidden_size=w, intermediate_size=ffn,
                       num_hidden_layers=layers, num_attention_heads=w // 128 or 1,
                       num_key_value_heads=w // 128 or 1, max_position_embeddings=4096,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=(px // patch) ** 2, vision_feature_select_strategy="default",
                         vision_feature_layer=-1)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": px}, crop_size={"height": px, "width": px}),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    return model, processor


def rows(n: int) -> list[dict]:
    """Preference rows as our pairs table holds them (image bytes, messages JSON, chosen, rejected)."""
    import io

    out = []
    for sample in shapes(n, seed=5):
        buf = io.BytesIO()
        sample.image.save(buf, format="PNG")
        chosen = describe(sample.objects)
        rejected = rules_inject(chosen, seed=len(out), vocabulary=SHAPES)[0]
        out.append({"image": buf.getvalue(), "pil": sample.image, "chosen": chosen, "rejected": rejected,
                    "messages": json.dumps([{"role": "user", "content": DESCRIBE_PROMPT}])})
    return out


def _time(step, steps: int, device: str) -> float:
    for _ in range(3):  # warm-up: kernels, allocator
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def _peak_reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def ours(model, processor, pairs: list[dict], steps: int, device: str, reference=None) -> dict:
    """``reference``: None → precomputed reference log-probs (our default); a frozen model → scored live in
    every step (our ``train.reference: live``, and what TRL does for VLMs)."""
    batch = collate([encode_pair(processor, p, max_length=4096) for p in pairs], pad_id(processor))
    batch.inputs = {k: (v.to(device, model.dtype) if v.is_floating_point() else v.to(device))
                    for k, v in batch.inputs.items()}
    with torch.no_grad():
        ref = pair_logps(model, batch)
    model.train()

    def step():
        ref_logps = ref
        if reference is not None:
            with torch.no_grad():
                ref_logps = pair_logps(reference, batch)
        logps = pair_logps(model, batch)
        dpo_loss(logps.chosen, logps.rejected, ref_logps.chosen, ref_logps.rejected, beta=0.1).loss.backward()
        model.zero_grad(set_to_none=True)

    _peak_reset(device)
    seconds = _time(step, steps, device)
    tokens = int(batch.inputs["attention_mask"].sum())
    return {"seconds_per_step": seconds, "tokens": tokens, "peak_gib": _peak(device)}


def trl(model, processor, pairs: list[dict], steps: int, device: str) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_list([{"images": [p["pil"]], "prompt": [{"role": "user", "content": DESCRIBE_PROMPT}],
                               "chosen": [{"role": "assistant", "content": p["chosen"]}],
                               "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=len(pairs), bf16=device == "cuda",
                         use_cpu=device == "cpu", beta=0.1, loss_type=["sigmoid"], max_length=None,
                         report_to="none", dataloader_num_workers=0)
        import copy

        reference = copy.deepcopy(model).eval().requires_grad_(False)  # TRL would load it by hub id
        trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=data,
                             processing_class=processor)
        inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.current_gradient_accumulation_steps = 1  # set by train(); training_step alone needs it

        def step():
            trainer.training_step(trainer.model, inputs)
            trainer.model.zero_grad(set_to_none=True)

        _peak_reset(device)
        seconds = _time(step, steps, device)
    return {"seconds_per_step": seconds, "tokens": int(inputs["attention_mask"].sum()), "peak_gib": _peak(device)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="1b")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "dpo_gpu.json"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = build(args.size, device)
    params = sum(p.numel() for p in model.parameters())
    pairs = rows(args.pairs)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    results = {"ours": ours(model, processor, pairs, args.steps, device)}
    import copy

    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    results["ours_live_ref"] = ours(model, processor, pairs, args.steps, device, reference=frozen)
    del frozen
    try:
        results["trl"] = trl(model, processor, pairs, args.steps, device)
    except Exception as err:  # noqa: BLE001 - TRL missing or incompatible: report ours alone, say why
        results["trl"] = {"error": f"{type(err).__name__}: {err}"[:500]}
    for r in results.values():
        if "seconds_per_step" in r:
            r["tokens_per_s"] = r["tokens"] / r["seconds_per_step"]
            r["mfu"] = 6 * params * r["tokens_per_s"] / peak if peak else None
    vs_trl = {}
    if "tokens_per_s" in results["trl"]:
        for key in ("ours", "ours_live_ref"):
            vs_trl[key] = {"tokens_per_s": results[key]["tokens_per_s"] / results["trl"]["tokens_per_s"],
                           "peak_memory": results[key]["peak_gib"] / results["trl"]["peak_gib"]}
    payload = {"device": name, "params": params, "pairs": args.pairs, "steps": args.steps,
               "torch": torch.__version__, "results": results, "ratio_to_trl": vs_trl}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2))
    print(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
