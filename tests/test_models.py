"""Tiny LLaVA, tiny Qwen2-VL and the tiny LM: build, save, load through the one loader, generate."""

from __future__ import annotations

import json

import pytest
import torch

from bpo_ray.config import ModelConfig
from bpo_ray.data.synthetic import generate as shapes
from bpo_ray.models.generate import HFEngine, Sampling, generate
from bpo_ray.models.loader import load_llm, load_vlm, resolve_model_path
from bpo_ray.models.prompts import SampleTooLong, build_prompt, encode_prompt_response, image_token_id
from conftest import run_cli

IMAGE = next(shapes(1, seed=0)).image
QUESTION = [{"role": "user", "content": "Describe the image in detail."}]
# Image placeholder tokens per 64×64 image: LLaVA resizes to 48 px, 3×3 patches (CLS dropped); Qwen2-VL 4×4 patches merged 2×2.
IMAGE_TOKENS = {"llava": 9, "qwen2_vl": 4}


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "llm"])
def test_saved_as_safetensors_with_wide_heads(tiny_models, arch):
    path = tiny_models[arch]
    assert (path / "model.safetensors").is_file()
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))
    config = json.loads((path / "config.json").read_text())
    text = config.get("text_config", config)
    assert text["hidden_size"] // text["num_attention_heads"] >= 32  # vLLM on CPU rejects 16


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_vlm_loads_and_answers_about_an_image(tiny_models, arch):
    model, processor = load_vlm(str(tiny_models[arch]))
    assert type(model).__name__ in ("LlavaForConditionalGeneration", "Qwen2VLForConditionalGeneration")
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    answers = generate(model, processor, [QUESTION, QUESTION], [IMAGE, IMAGE], Sampling(max_new_tokens=6))
    assert len(answers) == 2 and answers[0] == answers[1]  # greedy, same input: same answer
    assert answers[0]


def test_sampling_is_seeded_per_row_not_per_batch(tiny_models):
    engine = HFEngine(str(tiny_models["llava"]))
    hot = Sampling(temperature=1.5, max_new_tokens=8)
    alone = engine.generate([QUESTION], [IMAGE], hot, seeds=[11])
    in_batch = engine.generate([QUESTION, QUESTION, QUESTION], [IMAGE] * 3, hot, seeds=[5, 11, 7])
    assert in_batch[1] == alone[0]  # the row's seed decides, not its batch
    assert len({*in_batch}) > 1  # different seeds, different samples (a random tiny model is near-uniform)


def test_llm_generates_text(tiny_models):
    model, tokenizer = load_llm(str(tiny_models["llm"]))
    out = generate(model, tokenizer, [[{"role": "user", "content": "Rewrite: a red circle."}]], None,
                   Sampling(max_new_tokens=5))
    assert isinstance(out[0], str)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_image_token_accounting_and_response_side_truncation(tiny_models, arch):
    model, processor = load_vlm(str(tiny_models[arch]))
    answer = "There are two shapes. A large red circle is at the top left. " * 4
    full = encode_prompt_response(processor, QUESTION, IMAGE, answer, max_length=1024)
    assert full.num_image_tokens == IMAGE_TOKENS[arch] and not full.truncated
    image_id = image_token_id(processor)
    # All image placeholders sit in the prompt; the response holds none.
    assert full.input_ids[:full.prompt_length].count(image_id) == IMAGE_TOKENS[arch]
    assert image_id not in full.response_ids
    assert processor.tokenizer.decode(full.response_ids, skip_special_tokens=True).strip() == answer.strip()

    cut = encode_prompt_response(processor, QUESTION, IMAGE, answer, max_length=full.prompt_length + 5)
    assert cut.truncated and len(cut.input_ids) == full.prompt_length + 5
    assert cut.input_ids[:cut.prompt_length] == full.input_ids[:full.prompt_length]  # prompt untouched
    logits = model(**cut.model_inputs()).logits  # image features still match placeholders
    assert logits.shape[1] == len(cut.input_ids)

    with pytest.raises(SampleTooLong, match=f"{IMAGE_TOKENS[arch]} image tokens"):
        encode_prompt_response(processor, QUESTION, IMAGE, answer, max_length=full.prompt_length)


def test_prompt_uses_the_processor_chat_template(tiny_models):
    _, processor = load_vlm(str(tiny_models["llava"]))
    assert build_prompt(processor, QUESTION) == "USER: <image>\nDescribe the image in detail. ASSISTANT:"
    _, qwen = load_vlm(str(tiny_models["qwen2_vl"]))
    assert build_prompt(qwen, QUESTION).endswith("<|vision_end|>Describe the image in detail.<|im_end|>\n"
                                                 "<|im_start|>assistant\n")


def test_tiny_scheme_builds_once_into_cache(tmp_path):
    from bpo_ray.models import TINY_VERSION

    first = resolve_model_path("tiny://llm", tmp_path)
    built = tmp_path / "models" / f"tiny-llm-v{TINY_VERSION}" / "config.json"  # versioned: a new builder rebuilds
    assert first == str(built.parent)
    stamp = built.stat().st_mtime_ns
    assert resolve_model_path("tiny://llm", tmp_path) == first
    assert built.stat().st_mtime_ns == stamp
    assert resolve_model_path("org/some-model", tmp_path) == "org/some-model"


def test_remote_code_is_off_unless_asked(tiny_models, monkeypatch):
    seen = {}
    import transformers

    real = transformers.AutoModelForImageTextToText.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", spy)
    load_vlm(str(tiny_models["llava"]))
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True
    load_vlm(str(tiny_models["llava"]), ModelConfig(trust_remote_code=True), dtype=torch.float32)
    assert seen["trust_remote_code"] is True


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "llm"])
def test_make_tiny_cli_round_trip(tmp_path, arch):
    result = run_cli("make-tiny", "--arch", arch, "--out", str(tmp_path / arch))
    assert result.returncode == 0, result.stderr
    loader = load_llm if arch == "llm" else load_vlm
    model, _ = loader(str(tmp_path / arch))
    assert model.config.model_type == {"llava": "llava", "qwen2_vl": "qwen2_vl", "llm": "llama"}[arch]


def test_a_text_llm_without_a_chat_template_gets_the_vicuna_format(tiny_models, tmp_path):
    """lmsys/vicuna-7b-v1.5 (the LLaVA-1.5 config's rewriter) ships no chat template: the injection engine
    wraps prompts as the authors do instead of failing on every row."""
    import shutil

    bare = shutil.copytree(tiny_models["llm"], tmp_path / "bare")
    (bare / "chat_template.jinja").unlink()
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    engine = HFEngine(str(bare), vision=False)
    messages = [{"role": "user", "content": "Rewrite: a red circle."}]
    assert build_prompt(engine.processor, messages, with_image=False) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: Rewrite: a red circle. ASSISTANT:")
    assert isinstance(engine.generate([messages], None, Sampling(max_new_tokens=4))[0], str)
    # Serving loads it through the same loader, so a request is prompted the same way.
    from bpo_ray.serve.engine import ChatEngine
    from bpo_ray.serve.protocol import ChatRequest
    from bpo_ray.serve.protocol import Sampling as RequestSampling

    request = ChatRequest(model="m", chat=[{"role": "user", "content": [{"type": "text", "text": messages[0]["content"]}]}],
                          images=[], stream=False, include_usage=False,
                          sampling=RequestSampling(temperature=0.0, top_p=1.0, max_tokens=4, seed=0, stop=[]))
    prompt = build_prompt(engine.processor, messages, with_image=False)
    assert ChatEngine(str(bare)).encode(request).input_ids == engine.processor(prompt)["input_ids"]


def test_each_answer_says_whether_it_ended_or_was_cut(tiny_models):
    from bpo_ray.models.generate import generate_detailed

    model, processor = load_vlm(str(tiny_models["llava"]))
    cut = generate_detailed(model, processor, [QUESTION], [IMAGE], Sampling(max_new_tokens=1))[0]
    first_token = processor.tokenizer(cut.text, add_special_tokens=False)["input_ids"][0]
    assert cut.finish_reason == "length"
    model.generation_config.eos_token_id = first_token  # the greedy answer now ends at once
    ended = generate_detailed(model, processor, [QUESTION], [IMAGE], Sampling(max_new_tokens=4))[0]
    assert ended.finish_reason == "stop"
