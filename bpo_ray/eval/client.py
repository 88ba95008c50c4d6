"""A small client for any OpenAI-compatible chat endpoint (ours, vLLM's, anyone's): bounded concurrency,
retries on overload (503/429, honouring Retry-After) and dropped connections; a request that still fails
comes back as an error string, never as an exception that loses the rest."""

from __future__ import annotations

import asyncio
import base64
import mimetypes
from dataclasses import dataclass
from pathlib import Path

import httpx

RETRYABLE = {429, 502, 503, 504}


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # ends in /v1
    model: str
    api_key: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass(frozen=True)
class Answer:
    text: str | None
    error: str | None = None


def image_message(image_path: str, question: str) -> list[dict]:
    data = Path(image_path).read_bytes()
    mime = mimetypes.guess_type(image_path)[0] or "image/png"
    url = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


async def _ask(client: httpx.AsyncClient, endpoint: Endpoint, messages: list[dict], max_tokens: int,
               gate: asyncio.Semaphore, attempts: int) -> Answer:
    payload = {"model": endpoint.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
               "seed": 0}
    error = "no attempt made"
    for attempt in range(attempts):
        async with gate:
            try:
                response = await client.post(f"{endpoint.base_url}/chat/completions", json=payload,
                                             headers=endpoint.headers)
            except httpx.TransportError as err:
                response, error = None, f"{err.__class__.__name__}: {err}"
        if response is not None:
            if response.status_code == 200:
                return Answer(response.json()["choices"][0]["message"]["content"] or "")
            error = f"HTTP {response.status_code}: {response.text[:300]}"
            if response.status_code not in RETRYABLE:
                return Answer(None, error)
            wait = float(response.headers.get("retry-after") or 0) or min(2 ** attempt, 10)
        else:
            wait = min(2 ** attempt, 10)
        await asyncio.sleep(wait)
    return Answer(None, f"gave up after {attempts} attempts: {error}")


def ask_all(endpoint: Endpoint, conversations: list[list[dict]], max_tokens: int, concurrency: int = 16,
            attempts: int = 6, timeout_s: float = 300.0) -> list[Answer]:
    """Send every conversation (temperature 0) and return the answers in order."""

    async def run():
        gate = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            return await asyncio.gather(*(_ask(client, endpoint, m, max_tokens, gate, attempts)
                                          for m in conversations))

    return asyncio.run(run())
