"""The request parser and the hf serving engine, without Ray or HTTP: what the server builds on."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import pytest
from PIL import Image

from bpo_ray.serve.engine import ChatEngine
from bpo_ray.serve.protocol import APIError, ImagePolicy, parse_request


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def body(**fields) -> bytes:
    base = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(Image.new("RGB", (64, 64), "red"))}},
        {"type": "text", "text": "What is in the image?"}]}], "temperature": 0, "max_tokens": 6}
    return json.dumps({**base, **fields}).encode()


def test_parse_keeps_part_order_roles_and_sampling():
    req = parse_request(body(seed=7, stop="x", top_p=0.5, temperature=0.7), ImagePolicy())
    assert req.chat == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    assert len(req.images) == 1 and req.images[0].size == (64, 64)
    assert (req.sampling.seed, req.sampling.stop, req.sampling.top_p, req.sampling.temperature) == (7, ["x"], 0.5, 0.7)
    # developer is OpenAI's newer name for system; max_completion_tokens wins over max_tokens
    req = parse_request(json.dumps({"model": "m", "messages": [{"role": "developer", "content": "be brief"},
                                                               {"role": "user", "content": "hi"}],
                                    "max_completion_tokens": 3, "max_tokens": 9}).encode(), ImagePolicy())
    assert req.chat[0]["role"] == "system" and req.sampling.max_tokens == 3 and req.images == []


@pytest.mark.parametrize(("raw", "param", "code"), [
    (b"{not json", None, "invalid_json"),
    (b"[]", None, "invalid_json"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), "model", "missing_required_parameter"),
    (body(max_tokens="many"), "max_tokens", "invalid_value"),
    (body(temperature=2.5), "temperature", "invalid_value"),
    (body(top_p=0), "top_p", "invalid_value"),
    (body(max_tokens=0), "max_tokens", "invalid_value"),
    (body(n=2), "n", "unsupported_parameter"),
    (body(stop=["a", "b", "c", "d", "e"]), "stop", "invalid_value"),
    (body(messages=[]), "messages", "invalid_value"),
    (body(messages=[{"role": "tool", "content": "x"}]), "messages.0.role", "invalid_value"),
    (body(messages=[{"role": "user", "content": [{"type": "audio"}]}]), "messages.0.content.0", "invalid_value"),
    (body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}]}]),
     "messages.0.content.0.image_url", "invalid_image_url"),
    (body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://host/x.png"}}]}]),
     "messages.0.content.0.image_url", "invalid_image_url"),
])
def test_parse_rejects_with_openai_fields(raw, param, code):
    with pytest.raises(APIError) as info:
        parse_request(raw, ImagePolicy())
    assert info.value.status == 400
    assert info.value.body()["error"]["param"] == param
    assert info.value.body()["error"]["code"] == code


@pytest.fixture(scope="module")
def engine(tiny_models):
    return ChatEngine(str(tiny_models["llava"]), default_max_tokens=12)


def test_rows_in_one_batch_match_rows_alone(engine):
    """Each row keeps its own temperature, seed, max_tokens and stop strings inside a shared batch."""
    requests = [parse_request(body(temperature=t, seed=s, max_tokens=m), ImagePolicy())
                for t, s, m in [(0, 0, 4), (0.9, 1, 7), (1.3, 2, 10)]]
    together = engine.run([engine.encode(r) for r in requests])
    alone = [engine.run([engine.encode(r)])[0] for r in requests]
    assert [c.text for c in together] == [c.text for c in alone]
    assert [c.completion_tokens for c in together] == [4, 7, 10]
    assert all(c.finish_reason == "length" for c in together)


def test_stop_strings_and_streaming_deltas(engine):
    full = engine.run([engine.encode(parse_request(body(max_tokens=12), ImagePolicy()))])[0].text
    assert len(full) > 4
    stop = full[3:5]
    pieces: list[str] = []
    job = engine.encode(parse_request(body(max_tokens=12, stop=[stop]), ImagePolicy()), on_text=pieces.append)
    done = engine.run([job])[0]
    assert done.finish_reason == "stop" and done.text == full[: full.index(stop)]
    assert "".join(pieces) == done.text  # the stream never shows text a stop string later removes


def test_context_window_is_checked_per_request(engine):
    long = "shape " * 3000
    with pytest.raises(APIError) as info:
        engine.encode(parse_request(body(messages=[{"role": "user", "content": long}]), ImagePolicy()))
    assert info.value.status == 400 and info.value.code == "context_length_exceeded"
    with pytest.raises(APIError):  # the prompt fits but the completion it asks for does not
        engine.encode(parse_request(body(max_tokens=engine.max_model_len), ImagePolicy()))


def test_text_only_model_refuses_images(tiny_models):
    llm = ChatEngine(str(tiny_models["llm"]))
    assert not llm.vision
    with pytest.raises(APIError):
        llm.encode(parse_request(body(), ImagePolicy()))
    text = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3,
                       "temperature": 0}).encode()
    assert llm.run([llm.encode(parse_request(text, ImagePolicy()))])[0].completion_tokens <= 3


def test_the_server_loads_its_model_with_the_runs_model_settings(tiny_models):
    """A serve replica loads the model as every other model-holding actor does: the run's attention kernel
    and dtype (it used transformers' defaults)."""
    import torch

    from bpo_ray.config import ModelConfig, ServeConfig
    from bpo_ray.serve.app import ChatServer

    cls = ChatServer.func_or_class  # the replica's class; Serve's ingress made its __init__ a coroutine
    server = cls.__new__(cls)
    asyncio.run(cls.__init__(server, str(tiny_models["llava"]), "m", ServeConfig(),
                             ModelConfig(attn_implementation="eager", dtype="bfloat16")))
    assert server.engine.model.config._attn_implementation == "eager"
    assert server.engine.model.dtype == torch.bfloat16
