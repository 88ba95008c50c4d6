"""Prompts through the processor's own chat template, and image-token accounting.

Samples carry plain chat messages (``[{"role", "content": str}]``, the image implied in the first user
turn). ``to_chat`` turns them into the multimodal form chat templates expect; ``encode_prompt_response``
tokenises prompt (with the image placeholders expanded by the processor) and response, and fits them to
``max_length`` without ever cutting into the prompt: image placeholder tokens must match the image
features one for one, so an over-long sample loses response tokens, or is skipped with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def build_prompt(processor, messages: list[dict], with_image: bool = True) -> str:
    """The generation prompt (ends where the assistant's answer begins)."""
    return processor.apply_chat_template(to_chat(messages, with_image), tokenize=False, add_generation_prompt=True)


def response_text(processor, messages: list[dict], response: str, with_image: bool = True) -> str:
    """The exact text the template puts after the prompt for this answer (end-of-turn tokens included)."""
    prompt = build_prompt(processor, messages, with_image)
    full = processor.apply_chat_template(
        to_chat([*messages, {"role": "assistant", "content": response}], with_image),
        tokenize=False, add_generation_prompt=False)
    if full.startswith(prompt):
        return full[len(prompt):]
    # Templates that rewrite earlier turns: fall back to the answer and the end-of-sequence token.
    return response + (tokenizer_of(processor).eos_token or "")


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
                           min_response_tokens: int = 1) -> Encoded:
    """Tokenise (prompt with image, response) within max_length; truncates the response side only.

    Raises SampleTooLong when the prompt (image tokens included) leaves fewer than ``min_response_tokens``.
    """
    prompt = build_prompt(processor, messages, with_image=image is not None)
    images = [image] if image is not None else None
    prompt_inputs = processor(text=[prompt], images=images, return_tensors="pt", add_special_tokens=False)
    prompt_ids = prompt_inputs["input_ids"][0].tolist()
    image_id = image_token_id(processor)
    num_image_tokens = sum(1 for t in prompt_ids if t == image_id) if image_id is not None else 0
    tail = response_text(processor, messages, response, with_image=image is not None)
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
