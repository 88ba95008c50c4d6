"""OpenAI Chat Completions on the wire: request parsing and validation, response and error bodies.

Pure (no Ray, no model): bytes in, a validated ``ChatRequest`` (chat-template messages + decoded images +
sampling) out, or an ``APIError`` that the server turns into a 4xx with OpenAI's body
``{"error": {"message", "type", "param", "code"}}``. Every way a request can be wrong ends here, before
it reaches a batch, so one bad request never fails anyone else's.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bpo_ray.data.records import ImageLimits, RecordError, check_image, decode_image


class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -------------------------------------------------------------------------------------- request schema
class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class ImageURL(_Strict):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] = "auto"


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionBody(_Strict):
    """The fields we read; others that change nothing (user, metadata, ...) are ignored like OpenAI's
    optional hints, and ones that would change the answer but are unsupported are refused below."""

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    temperature: float | int = Field(1.0, ge=0.0, le=2.0)
    top_p: float | int = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    presence_penalty: float | int = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | int = Field(0.0, ge=-2.0, le=2.0)
    logprobs: bool | None = None
    tools: list | None = None
    response_format: dict | None = None


# What the engine cannot do, refused rather than silently ignored (param → why).
def _unsupported(body: ChatCompletionBody) -> tuple[str, str] | None:
    if body.n != 1:
        return "n", "only n=1 is supported; send several requests (they are batched together)"
    if body.presence_penalty or body.frequency_penalty:
        which = "presence_penalty" if body.presence_penalty else "frequency_penalty"
        return which, f"{which} is not supported by this server"
    if body.logprobs:
        return "logprobs", "logprobs are not supported by this server"
    if body.tools:
        return "tools", "tool calls are not supported by this server"
    if body.response_format and body.response_format.get("type", "text") != "text":
        return "response_format", "only response_format type 'text' is supported"
    return None


# ------------------------------------------------------------------------------------ parsed request
@dataclass
class Sampling:
    temperature: float
    top_p: float
    max_tokens: int | None  # None: up to the server default, within the context window
    seed: int
    stop: list[str]


@dataclass
class ChatRequest:
    model: str
    chat: list[dict]  # chat-template messages: {"role", "content": [{"type": "text"|"image", ...}]}
    images: list  # PIL images, in the order of their parts
    sampling: Sampling
    stream: bool
    include_usage: bool
    id: str = field(default_factory=lambda: f"chatcmpl-{secrets.token_hex(12)}")
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass(frozen=True)
class ImagePolicy:
    limits: ImageLimits = ImageLimits()
    max_images: int = 1
    local_root: str | None = None  # file:// paths under this directory are allowed
    allow_remote: bool = False  # http(s) URLs are fetched
    fetch_timeout_s: float = 10.0


def parse_request(raw: bytes, policy: ImagePolicy) -> ChatRequest:
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from err
    if not isinstance(payload, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(payload).__name__}",
                       code="invalid_json")
    try:
        body = ChatCompletionBody.model_validate(payload)
    except ValidationError as err:
        # Of a union's alternatives, the error that got furthest into the input says the most.
        first = max(err.errors(), key=lambda e: len(_param(e["loc"]).split(".")))
        param = _param(first["loc"]) or None
        code = "missing_required_parameter" if first["type"] == "missing" else "invalid_value"
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param, code=code) from err
    refused = _unsupported(body)
    if refused:
        raise APIError(400, refused[1], param=refused[0], code="unsupported_parameter")
    chat, images = _chat_messages(body.messages, policy)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise APIError(400, "stop: up to 4 non-empty strings", param="stop", code="invalid_value")
    seed = body.seed if body.seed is not None else secrets.randbits(31)
    sampling = Sampling(float(body.temperature), float(body.top_p), body.max_completion_tokens or body.max_tokens,
                        seed, stop)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return ChatRequest(body.model, chat, images, sampling, body.stream, include_usage)


def _param(loc: tuple) -> str:
    """A pydantic error location as the request's own path (``messages.0.content``), without the names of
    union alternatives that pydantic puts in it."""
    keep = [str(p) for p in loc if isinstance(p, int) or re.fullmatch(r"[a-z_]+", p) and p not in _TYPE_NAMES]
    return ".".join(keep)


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


def _chat_messages(messages: list[Message], policy: ImagePolicy) -> tuple[list[dict], list]:
    chat, images = [], []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if message.content is None or message.content == "" or message.content == []:
            raise APIError(400, f"messages.{i}.content: a {message.role} message needs content",
                           param=f"messages.{i}.content", code="invalid_value")
        parts = [TextPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content
        content = []
        for j, part in enumerate(parts):
            if isinstance(part, TextPart):
                content.append({"type": "text", "text": part.text})
                continue
            param = f"messages.{i}.content.{j}.image_url"
            if role != "user":
                raise APIError(400, f"{param}: images are only allowed in user messages", param=param,
                               code="invalid_value")
            if len(images) >= policy.max_images:
                raise APIError(400, f"too many images: at most {policy.max_images} per request", param=param,
                               code="too_many_images")
            images.append(load_image(part.image_url.url, policy, param))
            content.append({"type": "image"})
        chat.append({"role": role, "content": content})
    if chat[-1]["role"] == "assistant":
        raise APIError(400, "the last message must not be the assistant's (continuing it is not supported)",
                       param=f"messages.{len(chat) - 1}.role", code="invalid_value")
    return chat, images


def load_image(url: str, policy: ImagePolicy, param: str):
    """``data:image/...;base64,``, ``file://`` (under the allowed root) or http(s) (when allowed) → PIL."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
            raise APIError(400, f"{param}: expected a data:image/<type>;base64,<data> URL", param=param,
                           code="invalid_image_url")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as err:
            raise APIError(400, f"{param}: the base64 image data does not decode: {err}", param=param,
                           code="invalid_image_url") from err
    elif url.startswith("file://"):
        data = _read_local(url[len("file://"):], policy, param)
    elif url.startswith(("http://", "https://")):
        data = _fetch_remote(url, policy, param)
    else:
        scheme = url.split(":", 1)[0] if ":" in url else url[:16]
        raise APIError(400, f"{param}: unsupported image URL scheme {scheme!r} (use data:image/...;base64)",
                       param=param, code="invalid_image_url")
    try:
        check_image(data, policy.limits)
        return decode_image(data)
    except RecordError as err:
        raise APIError(400, f"{param}: {err.reason}: {err.detail}", param=param, code=err.reason) from err


def _read_local(path: str, policy: ImagePolicy, param: str) -> bytes:
    if policy.local_root is None:
        raise APIError(400, f"{param}: local image files are disabled on this server (serve.local_image_root)",
                       param=param, code="image_url_not_allowed")
    root = Path(policy.local_root).resolve()
    target = Path(path).resolve()
    if not target.is_relative_to(root) or not target.is_file():
        raise APIError(400, f"{param}: no such image under the allowed directory", param=param,
                       code="invalid_image_url")
    if target.stat().st_size > policy.limits.max_bytes:
        raise APIError(400, f"{param}: image file over {policy.limits.max_bytes} bytes", param=param,
                       code="image_too_large")
    return target.read_bytes()


def _fetch_remote(url: str, policy: ImagePolicy, param: str) -> bytes:
    if not policy.allow_remote:
        raise APIError(400, f"{param}: remote image URLs are disabled on this server (serve.allow_remote_images)",
                       param=param, code="image_url_not_allowed")
    import httpx

    try:
        with httpx.stream("GET", url, timeout=policy.fetch_timeout_s, follow_redirects=True) as response:
            response.raise_for_status()
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > policy.limits.max_bytes:
                    raise APIError(400, f"{param}: remote image over {policy.limits.max_bytes} bytes",
                                   param=param, code="image_too_large")
                chunks.append(chunk)
    except httpx.HTTPError as err:
        raise APIError(400, f"{param}: could not fetch the image: {err}", param=param,
                       code="image_fetch_failed") from err
    return b"".join(chunks)


# ------------------------------------------------------------------------------------------- responses
def completion_body(request: ChatRequest, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int) -> dict:
    return {
        "id": request.id, "object": "chat.completion", "created": request.created, "model": request.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish_reason, "logprobs": None}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_body(request: ChatRequest, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": request.id, "object": "chat.completion.chunk", "created": request.created,
            "model": request.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def usage_chunk(request: ChatRequest, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": request.id, "object": "chat.completion.chunk", "created": request.created,
            "model": request.model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(payload: Any) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


def models_body(model_ids: list[str], created: int) -> dict:
    return {"object": "list",
            "data": [{"id": m, "object": "model", "created": created, "owned_by": "bpo-ray"} for m in model_ids]}
