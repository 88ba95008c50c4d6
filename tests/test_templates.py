"""Real checkpoints' prompt formats on tiny models: tiny LLaVA and Qwen2-VL models carrying the chat
templates of llava-hf/llava-1.5-7b-hf and Qwen/Qwen2.5-VL-7B-Instruct (tests/data/chat_templates), and
LLaVA-1.5's BOS-adding Llama tokenizer. Answers end with EOS (llava-hf's template ends the assistant turn
with a space), prompts start with BOS where the checkpoint was trained so, image tokens never reach the
labels, an answer cut at max_new_tokens gets no EOS, and serving builds the prompt tokens training used."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bpo_ray.data.synthetic import generate as shapes
from bpo_ray.models.prompts import encode_prompt_response, image_token_id, to_chat, tokenizer_of

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
MESSAGES = [{"role": "user", "content": "Describe the image."}]
IMAGE = next(shapes(1, seed=5)).image
# checkpoint → (tiny arch, template file, its tokenizer adds BOS, the answer's tokens as the model sees them)
CHECKPOINTS = {
    "llava-1.5-7b-hf": ("llava", "llava-1.5-7b-hf.jinja", True, " {answer}</s>"),
    "qwen2.5-vl-7b-instruct": ("qwen2_vl", "qwen2.5-vl-7b-instruct.jinja", False, "{answer}<|im_end|>\n"),
}
RENDERED = {  # a question and its answer, as each checkpoint's template writes them
    "llava-1.5-7b-hf": "USER: <image>\nDescribe the image. ASSISTANT: a red circle ",
    "qwen2.5-vl-7b-instruct": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                               "<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n"
                               "<|im_start|>assistant\na red circle<|im_end|>\n"),
}


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def checkpoint(request, tiny_models, tmp_path_factory) -> tuple[str, Path]:
    from tokenizers import processors
    from transformers import AutoProcessor

    arch, template, adds_bos, _ = CHECKPOINTS[request.param]
    path = shutil.copytree(tiny_models[arch], tmp_path_factory.mktemp(request.param) / "model")
    processor = AutoProcessor.from_pretrained(path)
    tokenizer = processor.tokenizer
    if adds_bos:  # LlamaTokenizer's post-processor: "<s>" before every sequence, nothing after
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.bos_token_id)])
    processor.chat_template = (TEMPLATES / template).read_text()
    processor.save_pretrained(path)
    return request.param, path


def _processor(path):
    from bpo_ray.models.loader import load_processor

    return load_processor(str(path))


def test_the_checkpoints_template_is_in_place(checkpoint):
    name, path = checkpoint
    chat = to_chat([*MESSAGES, {"role": "assistant", "content": "a red circle"}])
    assert _processor(path).apply_chat_template(chat, tokenize=False) == RENDERED[name]


@pytest.mark.parametrize("answer", ["a red circle", "a blue square in the middle"])  # chosen and rejected alike
def test_answers_end_with_eos_and_prompts_start_as_trained(checkpoint, answer):
    name, path = checkpoint
    _, _, adds_bos, as_seen = CHECKPOINTS[name]
    processor = _processor(path)
    tokenizer = tokenizer_of(processor)
    encoded = encode_prompt_response(processor, MESSAGES, IMAGE, answer, max_length=512)
    bos = tokenizer.bos_token_id
    assert (encoded.input_ids[0] == bos) == adds_bos and encoded.input_ids.count(bos) == int(adds_bos)
    assert tokenizer.eos_token_id in encoded.response_ids
    assert tokenizer.decode(encoded.response_ids) == as_seen.format(answer=answer)  # EOS right after the answer
    assert image_token_id(processor) not in encoded.response_ids
    assert encoded.num_image_tokens > 0


def test_an_answer_cut_at_max_new_tokens_gets_no_eos(checkpoint):
    _, path = checkpoint
    processor = _processor(path)
    encoded = encode_prompt_response(processor, MESSAGES, IMAGE, "a red circle and a", max_length=512,
                                     ends_turn=False)
    assert tokenizer_of(processor).decode(encoded.response_ids).strip() == "a red circle and a"
    assert tokenizer_of(processor).eos_token_id not in encoded.response_ids


def test_serving_builds_the_prompt_training_used(checkpoint):
    from bpo_ray.serve.engine import ChatEngine
    from bpo_ray.serve.protocol import ChatRequest, Sampling

    _, path = checkpoint
    processor = _processor(path)
    encoded = encode_prompt_response(processor, MESSAGES, IMAGE, "a red circle", max_length=512)
    request = ChatRequest(model="m", chat=to_chat(MESSAGES), images=[IMAGE], stream=False, include_usage=False,
                          sampling=Sampling(temperature=0.0, top_p=1.0, max_tokens=4, seed=0, stop=[]))
    job = ChatEngine(str(path)).encode(request)
    assert job.input_ids == encoded.input_ids[:encoded.prompt_length]
