"""The GPU path without Ray (``make test-gpu``): every component that holds a model, run on one GPU as its
Ray actor runs it, for a ~1B LLaVA and a ~1B Qwen2-VL built from config (random weights, saved, then
loaded through the actors' own ``from_pretrained`` calls).

    python tests/gpu_smoke.py [--size 1b|tiny] [--allow-cpu]

- negatives: ``HFEngine`` answers on images weakened at the model's input size (diffusion step 900);
- reference: ``ReferenceScorer`` scores the pairs in the policy's training precision;
- train: one optimizer step of the worker's objective (bf16, LoRA, gradient checkpointing, dropout off;
  plain torch AdamW where DeepSpeed is not installed); its first loss must be ln 2 (the policy is the
  reference) and the precomputed reference must equal the same model scored live;
- serve: ``ChatEngine`` answers a chat request with an image.
Every parameter and buffer must sit on the GPU. Prints the DPO step's tokens/s and model-FLOPs utilisation
(6·N per token against the card's dense bf16 peak). No GPU: says so and exits 0; ``--allow-cpu`` runs it
on the CPU in fp32 (a check of this script; the suite runs it so).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}  # dense, no sparsity
QUESTION = [{"role": "user", "content": "Describe the image."}]


def build(arch: str, size: str, out: Path, device: torch.device) -> Path:
    """A model and processor from config, saved where the components load them from."""
    from bpo_ray.models.tiny import BUILDERS, train_tokenizer

    tokenizer = train_tokenizer(arch)
    torch.manual_seed(0)
    with torch.device(device):  # a 1B model initialises in seconds on the GPU
        model, processor = BUILDERS[arch](tokenizer) if size == "tiny" else ONE_B[arch](tokenizer)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(torch.bfloat16 if device.type == "cuda" else torch.float32).save_pretrained(out)
    processor.save_pretrained(out)
    return out


def llava_1b(tokenizer):
    """CLIP-style tower at 336 px (576 image tokens), Llama LM 2048 wide × 16 layers."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from bpo_ray.models.tiny import LLAVA_CHAT_TEMPLATE

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=12, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=1024)
    text = LlamaConfig(**_lm(tokenizer))
    config = LlavaConfig(vision_config=vision, text_config=text, image_seq_length=576,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE)
    return LlavaForConditionalGeneration(config), processor


def qwen2_vl_1b(tokenizer):
    """Qwen2-VL's tower (patch 14, 2×2 merge) 16 layers × 1024 wide, LM 2048 wide × 16 layers (M-RoPE)."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    from bpo_ray.models.tiny import CHATML_TEMPLATE

    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text = {**_lm(tokenizer), "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                  "mrope_section": [16, 24, 24]}}
    vision = dict(depth=16, embed_dim=1024, hidden_size=2048, num_heads=16, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    pixels = {"shortest_edge": 56 * 56, "longest_edge": 336 * 336}
    kw = dict(size=pixels, patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**kw), video_processor=Qwen2VLVideoProcessor(**kw),
                                 tokenizer=tokenizer, chat_template=CHATML_TEMPLATE)
    return Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **ids)), processor


def _lm(tokenizer) -> dict:
    return dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)


ONE_B = {"llava": llava_1b, "qwen2_vl": qwen2_vl_1b}


def on_device(model, device: torch.device, what: str) -> None:
    off = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.device.type != device.type]
    assert not off, f"{what}: {len(off)} tensors are not on {device}, e.g. {off[:3]}"


def pair_rows(n: int) -> list[dict]:
    """Preference rows as the pairs table holds them: image bytes, messages, annotated vs injected caption."""
    from bpo_ray.data.synthetic import DESCRIBE_PROMPT, describe
    from bpo_ray.data.synthetic import generate as shapes
    from bpo_ray.negatives.inject import rules_inject
    from bpo_ray.negatives.vocabulary import SHAPES

    rows = []
    for sample in shapes(n, seed=5, image_size=336):
        buf = io.BytesIO()
        sample.image.save(buf, format="PNG")
        chosen = describe(sample.objects)
        rows.append({"image": buf.getvalue(), "chosen": chosen, "rejected": rules_inject(chosen, seed=len(rows), vocabulary=SHAPES)[0],
                     "messages": json.dumps([{"role": "user", "content": DESCRIBE_PROMPT}])})
    return rows


def check(arch: str, path: Path, device: torch.device, steps: int) -> dict:
    import pandas as pd

    from bpo_ray.config import ModelConfig
    from bpo_ray.data.records import decode_image
    from bpo_ray.models.generate import HFEngine, Sampling
    from bpo_ray.models.vision import model_input_size
    from bpo_ray.negatives.distort import weaken_bytes
    from bpo_ray.serve.engine import ChatEngine
    from bpo_ray.serve.protocol import ChatRequest
    from bpo_ray.serve.protocol import Sampling as RequestSampling
    from bpo_ray.train.batch import collate, encode_pair, pad_id, pair_logps
    from bpo_ray.train.reference import ReferenceScorer

    gpu = device.type == "cuda"
    precision, dtype = ("bf16", torch.bfloat16) if gpu else ("fp32", torch.float32)
    rows = pair_rows(4)
    result: dict = {"arch": arch, "device": str(device)}

    # negatives: the hf engine on weakened images
    engine = HFEngine(str(path))
    on_device(engine.model, device, "generation")
    size = model_input_size(engine.processor.image_processor)
    weak = [decode_image(weaken_bytes(r["image"], [{"kind": "diffusion", "step": 900}], i, size))
            for i, r in enumerate(rows)]
    answers = engine.generate_detailed([QUESTION] * len(rows), weak, Sampling(temperature=0.2, max_new_tokens=16),
                                       list(range(len(rows))))
    result["generation_finish"] = [a.finish_reason for a in answers]
    del engine

    # reference: precomputed, in the policy's precision
    scorer = ReferenceScorer(str(path), ModelConfig(), average=False, precision=precision)
    on_device(scorer.model, device, "reference")
    scored = scorer(pd.DataFrame(rows))
    ref_chosen = torch.tensor(scored["ref_chosen_logp"].tolist())  # CPU tensors, as the worker reads them
    ref_rejected = torch.tensor(scored["ref_rejected_logp"].tolist())
    batch = collate([encode_pair(scorer.processor, r, 4096) for r in rows], pad_id(scorer.processor))
    with torch.no_grad():
        live = pair_logps(scorer.model, batch)
    result["precomputed_vs_live_max_abs"] = float(max((live.chosen.cpu() - ref_chosen).abs().max(),
                                                      (live.rejected.cpu() - ref_rejected).abs().max()))
    del scorer

    # train: the worker's objective
    result.update(dpo_steps(path, batch, ref_chosen, ref_rejected, device, dtype, steps))

    # serve: the hf serve engine answers a chat request with an image
    chat = ChatEngine(str(path))
    on_device(chat.model, device, "serve")
    request = ChatRequest(model="m", chat=[{"role": "user", "content": [{"type": "image"},
                                                                        {"type": "text", "text": "Describe it."}]}],
                          images=[decode_image(rows[0]["image"])], stream=False, include_usage=False,
                          sampling=RequestSampling(temperature=0.0, top_p=1.0, max_tokens=8, seed=0, stop=[]))
    completion = chat.run([chat.encode(request)])[0]
    result["serve_finish"] = completion.finish_reason
    assert completion.completion_tokens > 0, completion

    # Step 0: the LoRA policy (B = 0) is the reference; bf16 rounding only.
    assert abs(result["step0_loss"] - math.log(2)) < (2e-2 if gpu else 1e-4), result
    assert result["precomputed_vs_live_max_abs"] < (0.5 if gpu else 1e-3), result
    return result


def dpo_steps(path: Path, batch, ref_chosen, ref_rejected, device: torch.device, dtype, steps: int) -> dict:
    """The worker's objective on a LoRA policy (gradient checkpointing, dropout off): the first step's loss,
    then timed steps."""
    from bpo_ray.config import TrainConfig
    from bpo_ray.models.loader import load_vlm
    from bpo_ray.train.batch import pair_logps
    from bpo_ray.train.losses import to_floats, training_objective
    from bpo_ray.train.setup import disable_dropout, prepare_model

    train = TrainConfig(lora={"enabled": True, "r": 32, "alpha": 256, "dropout": 0.05}, gradient_checkpointing=True)
    policy, _ = load_vlm(str(path), dtype=dtype, device=device)
    policy = prepare_model(policy, train)
    disable_dropout(policy)
    on_device(policy, device, "policy")
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    policy.train()

    def step() -> dict:
        loss, terms = training_objective(pair_logps(policy, batch), ref_chosen, ref_rejected, train)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return to_floats(terms)

    gpu = device.type == "cuda"
    first = step()
    step()  # warm-up
    if gpu:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if gpu:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    tokens = int(batch.inputs["attention_mask"].sum())
    params = sum(p.numel() for p in policy.parameters())
    name = torch.cuda.get_device_name() if gpu else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    return {"step0_loss": first["loss"], "params": params, "seconds_per_step": seconds,
            "tokens_per_s": tokens / seconds, "mfu": 6 * params * tokens / seconds / peak if peak else None,
            "card": name, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["1b", "tiny"], default="1b")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU in fp32 (a check of this script)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("test-gpu: no CUDA device here, skipped (the last GPU run is in README.md)")
        return 0
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    with tempfile.TemporaryDirectory() as root:
        for arch in ("llava", "qwen2_vl"):
            path = build(arch, args.size, Path(root) / arch, device)
            result = check(arch, path, device, args.steps)
            print("GPU-SMOKE " + json.dumps(result), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    print("test-gpu: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
