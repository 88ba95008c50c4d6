"""Tiny random models built from real configs, with tokenizers trained here (no hub at run time).

``make_tiny(arch, out_dir)`` saves a model + processor/tokenizer with ``save_pretrained`` (safetensors)
that loads back through ``models.loader`` exactly like a real checkpoint. Architectures:
- ``llava``: LLaVA-1.5 layout (CLIP vision tower, MLP projector, Llama LM) at 48×48 px, patch 16: one
  patch per cell of the shapes grid, so 9 image tokens (64 tokens at patch 8 learned no better and cost
  1.7× the time a step);
- ``qwen2_vl``: Qwen2-VL (its own ViT with 2×2 patch merging, M-RoPE) on ~56×56 px inputs;
- ``llm``: a text-only Llama for error injection.
Every attention head is 32 wide: vLLM on CPU rejects head_dim 16. Changing a builder? Bump
``bpo_ray.models.TINY_VERSION``: cached builds and finished stages are keyed by it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bpo_ray.data.synthetic import corpus

ARCHS = ("llava", "qwen2_vl", "llm")
HEAD_DIM = 32
LLAVA_VISION_WIDTH = 64
LLAVA_IMAGE_SIZE, LLAVA_PATCH = 48, 16  # the processor resizes the 64 px shapes images to 48

# Everyday words beyond the shapes vocabulary, so prompts a user types do not fall apart into bytes.
GENERAL_TEXT = [
    "You are a helpful assistant. Answer the question about the image.",
    "Rewrite the answer so it describes a similar but different image.",
    "Add or remove objects and change the counts, colors, shapes, sizes and positions.",
    "What is in the picture? Please describe what you see. Is it true? Yes. No.",
    "The quick brown fox jumps over the lazy dog. A cat sits on the table near a cup.",
    "one two three four five six seven eight nine ten left right top bottom center above below",
]

LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}{%- set n_images = 0 -%}"
    "{%- else -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
    "{%- set n_images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{ text }}{{ '\n' }}"
    "{%- elif message['role'] == 'user' -%}USER: {{ '<image>\n' * n_images }}{{ text }}{{ ' ' }}"
    "{%- else -%}ASSISTANT: {{ text }}</s>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] }}{{ '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|im_end|>{{ '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant{{ '\n' }}{%- endif -%}"
)

SPECIAL_TOKENS = {
    "llava": ["<unk>", "<s>", "</s>", "<pad>", "<image>"],
    "qwen2_vl": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"],
    "llm": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}


def train_tokenizer(arch: str, vocab_size: int = 1024):
    """Byte-level BPE trained on the shapes corpus: any text encodes (no unknown tokens), common words
    are single tokens, so tiny models learn fast."""
    from transformers import PreTrainedTokenizerFast

    specials = SPECIAL_TOKENS[arch]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus() + GENERAL_TEXT, trainer=trainer)
    if arch == "llava":
        kw = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                  extra_special_tokens=["<image>"], chat_template=LLAVA_CHAT_TEMPLATE)
    else:
        extra = [t for t in specials if t not in ("<|endoftext|>", "<|im_end|>")]
        kw = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", extra_special_tokens=extra,
                  chat_template=CHATML_TEMPLATE)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=2048, **kw)
    return tokenizer


def _llama_text_kwargs(tokenizer, hidden: int = 128, layers: int = 2) -> dict:
    return dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=hidden // HEAD_DIM, num_key_value_heads=hidden // HEAD_DIM,
        max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


def build_llava(tokenizer):
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    image_size, patch, width = LLAVA_IMAGE_SIZE, LLAVA_PATCH, LLAVA_VISION_WIDTH
    vision = CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                              num_attention_heads=width // HEAD_DIM, image_size=image_size, patch_size=patch,
                              projection_dim=width)
    text = LlamaConfig(**_llama_text_kwargs(tokenizer))
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         image_seq_length=(image_size // patch) ** 2, vision_feature_select_strategy="default",
                         vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_CHAT_TEMPLATE)
    return model, processor


def build_qwen2_vl(tokenizer):
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    hidden = 128
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text = _llama_text_kwargs(tokenizer, hidden=hidden)
    # M-RoPE splits head_dim/2 rotary frequencies over (time, height, width).
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}
    vision = dict(depth=2, embed_dim=64, hidden_size=hidden, num_heads=64 // HEAD_DIM, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    model = Qwen2VLForConditionalGeneration(config)
    # 64 px images round to 56×56: 4×4 patches of 14 px, merged 2×2 → 4 image tokens.
    pixels = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=pixels, patch_size=14, merge_size=2, temporal_patch_size=2),
        video_processor=Qwen2VLVideoProcessor(size=pixels, patch_size=14, merge_size=2, temporal_patch_size=2),
        tokenizer=tokenizer, chat_template=CHATML_TEMPLATE)
    return model, processor


def build_llm(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**_llama_text_kwargs(tokenizer)))
    return model, tokenizer


BUILDERS = {"llava": build_llava, "qwen2_vl": build_qwen2_vl, "llm": build_llm}


def make_tiny(arch: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build, then save atomically (a crash or a concurrent builder never leaves a half-written model)."""
    if arch not in BUILDERS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {', '.join(ARCHS)}")
    out = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(arch)
    model, processor = BUILDERS[arch](tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "BPO_TINY").write_text(f"{arch} seed={seed}\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
