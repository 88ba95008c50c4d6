"""Prompts through the processor's own chat template, and image-token accounting.

Samples carry plain chat messages (``[{"role", "content": str}]``, the image implied in the first user
turn). ``to_chat`` turns them into the multimodal form chat templates expect; ``encode_prompt_response``
tokenises prompt (with the image placeholders expanded by the processor) and response, and fits them to
``max_length`` without ever cutting into the prompt: image placeholder tokens must match the image
features one for one, so an over-long sample loses response tokens, or is skipped with a reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# Processor outputs that run along the token axis (the rest are image tensors).
TEXT_ALIGNED = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


class SampleTooLong(ValueError):
    reason = "prompt_too_long"


def to_chat(messages: list[dict], with_image: bool = True) -> list[dict]:
    """Plain messages → chat-template messages with an image part in the first user turn."""
    chat, image_placed = [], not with_image
    for message in messages:
        parts = [{"type": "text", "text": message["content"]}]
        if message["role"] == "user" and not image_placed:
            parts.insert(0, {"type": "image"})
            image_placed = True
        chat.append({"role": message["role"], "content": parts})
    return chat


# Vicuna v1.1's conversation format ("<system> USER: … ASSISTANT: …</s>"), in which the BPO authors wrap
# their injection prompts for Vicuna: the format a text LLM that ships no chat template gets (base LMs such
# as lmsys/vicuna-7b-v1.5, the shipped LLaVA-1.5 config's rewriter). Content may be a string or text parts.
VICUNA_V1_1 = (
    "{%- macro text(c) -%}{%- if c is string -%}{{ c }}{%- else -%}{%- for p in c -%}{{ p['text'] }}"
    "{%- endfor -%}{%- endif -%}{%- endmacro -%}"
    "{%- if messages[0]['role'] == 'system' -%}{{ text(messages[0]['content']) }}{%- else -%}"
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.{%- endif -%}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{%- if m['role'] == 'user' %} USER: {{ text(m['content']) }}"
    "{%- else %} ASSISTANT: {{ text(m['content']) }}{{ eos_token }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %} ASSISTANT:{% endif -%}"
)


def with_chat_template(tokenizer, name: str):
    """The tokenizer of a text LLM, given the Vicuna v1.1 format when it ships no chat template."""
    if getattr(tokenizer, "chat_template", None) is None:
        log.warning("%s has no chat template: prompts use the Vicuna v1.1 format", name)
        tokenizer.chat_template = VICUNA_V1_1
    return tokenizer


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def build_prompt(processor, messages: list[dict], with_image: bool = True) -> str:
    """The generation prompt (ends where the assistant's answer begins)."""
    return processor.apply_chat_template(to_chat(messages, with_image), tokenize=False, add_generation_prompt=True)


def response_text(processor, messages: list[dict], response: str, with_image: bool = True,
                  ends_turn: bool = True) -> str:
    """The text the template puts after the prompt for this answer, ending with the end-of-sequence token.

    Some templates end the assistant turn without it (llava-hf's LLaVA-1.5 template ends it with a space):
    the model must still learn, and DPO score, the decision to stop, so EOS takes the place of the
    trailing whitespace, as LLaVA-1.5 was trained ("ASSISTANT: answer</s>"). ``ends_turn=False`` (an answer
    cut at max_new_tokens): the answer as the template writes it, and nothing after it."""
    prompt = build_prompt(processor, messages, with_image)
    full = processor.apply_chat_template(
        to_chat([*messages, {"role": "assistant", "content": response}], with_image),
        tokenize=False, add_generation_prompt=False)
    # Templates that rewrite earlier turns: fall back to the answer alone.
    tail = full[len(prompt):] if full.startswith(prompt) else response
    if not ends_turn:
        at = tail.find(response)
        return tail[:at + len(response)] if at >= 0 else response
    eos = tokenizer_of(processor).eos_token
    if eos and eos not in tail:
        tail = tail.rstrip() + eos
    return tail


def adds_bos(processor, prompt: str) -> bool:
    """Whether to tokenise ``prompt`` with the tokenizer's special tokens: yes when they are exactly a leading
    BOS (LLaVA-1.5's Llama tokenizer: the checkpoint was trained with <s>) that the template did not write
    itself. Qwen's tokenizers add none. Training, generation and serving all ask this, so they build the
    same prompt tokens."""
    tokenizer = tokenizer_of(processor)
    bos = tokenizer.bos_token_id
    if bos is None or (tokenizer.bos_token and prompt.startswith(tokenizer.bos_token)):
        return False
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return tokenizer("a", add_special_tokens=True)["input_ids"] == [bos, *plain]


def image_token_id(processor) -> int | None:
    token = getattr(processor, "image_token", None)
    if token is None:
        return None
    return tokenizer_of(processor).convert_tokens_to_ids(token)


@dataclass
class Encoded:
    input_ids: list[int]
    prompt_length: int  # tokens before the response (image placeholders included)
    num_image_tokens: int
    truncated: bool  # the response lost tokens to max_length
    vision_inputs: dict[str, torch.Tensor]  # pixel_values (+ image_grid_thw for Qwen-VL)
    # Other per-token processor outputs over the whole sequence (Qwen-VL's mm_token_type_ids for M-RoPE).
    token_types: dict[str, list[int]]

    @property
    def response_ids(self) -> list[int]:
        return self.input_ids[self.prompt_length:]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Batch-of-one tensors for a forward pass over prompt + response."""
        ids = torch.tensor([self.input_ids])
        extra = {k: torch.tensor([v]) for k, v in self.token_types.items()}
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **extra, **self.vision_inputs}


def encode_prompt_response(processor, messages: list[dict], image, response: str, max_length: int,
                           min_response_tokens: int = 1, ends_turn: bool = True) -> Encoded:
    """Tokenise (prompt with image, response) within max_length; truncates the response side only.
    ``ends_turn=False``: the response was cut mid-answer and gets no end-of-turn tokens.

    Raises SampleTooLong when the prompt (image tokens included) leaves fewer than ``min_response_tokens``.
    """
    prompt = build_prompt(processor, messages, with_image=image is not None)
    images = [image] if image is not None else None
    prompt_inputs = processor(text=[prompt], images=images, return_tensors="pt",
                              add_special_tokens=adds_bos(processor, prompt))
    prompt_ids = prompt_inputs["input_ids"][0].tolist()
    image_id = image_token_id(processor)
    num_image_tokens = sum(1 for t in prompt_ids if t == image_id) if image_id is not None else 0
    tail = response_text(processor, messages, response, with_image=image is not None, ends_turn=ends_turn)
    response_ids = tokenizer_of(processor)(tail, add_special_tokens=False)["input_ids"]
    budget = max_length - len(prompt_ids)
    if budget < min_response_tokens:
        raise SampleTooLong(
            f"prompt is {len(prompt_ids)} tokens ({num_image_tokens} image tokens) and max_length is "
            f"{max_length}: fewer than {min_response_tokens} response tokens would remain")
    truncated = len(response_ids) > budget
    kept = response_ids[:budget]
    vision = {k: v for k, v in prompt_inputs.items() if k not in TEXT_ALIGNED}
    # Response tokens are text: type 0.
    token_types = {k: prompt_inputs[k][0].tolist() + [0] * len(kept)
                   for k in TEXT_ALIGNED[2:] if k in prompt_inputs}
    return Encoded(prompt_ids + kept, len(prompt_ids), num_image_tokens, truncated, vision, token_types)
