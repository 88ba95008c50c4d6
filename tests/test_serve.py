"""The OpenAI-compatible endpoint for real: Ray Serve on the test cluster, the official ``openai`` client,
raw HTTP for every bad-input class, a bounded concurrent load, auth, overload, a killed replica, and
``bpo serve`` started and stopped as a user would."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from bpo_ray.config import ServeConfig
from bpo_ray.serve.launch import wait_healthy
from conftest import free_ports

pytestmark = pytest.mark.slow
API_KEY = "sk-test-key"
MODEL = "bpo-test"


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def chat(content, **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 6,
            "temperature": 0, **fields}


def image_chat(url: str, **fields) -> dict:
    return chat([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe the image."}],
                **fields)


@pytest.fixture(scope="module")
def shape_png(shapes_dir) -> bytes:
    return sorted((shapes_dir / "images").iterdir())[0].read_bytes()


@pytest.fixture(scope="module")
def endpoints(ray_local, tiny_models, shapes_dir):
    """Four apps on one Serve proxy: open LLaVA (local files under the data dir and remote URLs allowed),
    Qwen2-VL, LLaVA behind an API key, and a LLaVA with room for one request at a time."""
    from ray import serve

    from bpo_ray.serve.app import build_app

    port = free_ports()[0]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    small = {"num_cpus_per_replica": 0.5, "model_id": MODEL}
    apps = {
        "llava": (tiny_models["llava"], ServeConfig(**small, local_image_root=str(shapes_dir),
                                                    allow_remote_images=True, max_request_bytes=256 * 1024)),
        "qwen": (tiny_models["qwen2_vl"], ServeConfig(**small)),
        "locked": (tiny_models["llava"], ServeConfig(**small, api_key=API_KEY)),
        "tight": (tiny_models["llava"], ServeConfig(**small, max_ongoing_requests=1, max_queued_requests=1,
                                                    max_batch_size=1, retry_after_s=2)),
    }
    serve.run_many([serve.RunTarget(build_app(str(path), cfg), name=name, route_prefix=f"/{name}")
                    for name, (path, cfg) in apps.items()])
    urls = {name: f"http://127.0.0.1:{port}/{name}/v1" for name in apps}
    for name, url in urls.items():
        wait_healthy(url, timeout_s=180, api_key=API_KEY if name == "locked" else None)
    yield urls
    serve.shutdown()


def post(url: str, payload=None, raw: bytes | None = None, headers: dict | None = None) -> httpx.Response:
    content = raw if raw is not None else json.dumps(payload).encode()
    return httpx.post(f"{url}/chat/completions", content=content, timeout=60,
                      headers={"content-type": "application/json", **(headers or {})})


# ------------------------------------------------------------------------------------------ happy path
@pytest.mark.parametrize("app", ["llava", "qwen"])
def test_openai_client_answers_text_image_and_streams(endpoints, shape_png, app):
    from openai import OpenAI

    client = OpenAI(base_url=endpoints[app], api_key="unused")
    assert [m.id for m in client.models.list()] == [MODEL]
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(shape_png)}},
                                             {"type": "text", "text": "What shapes are in the image?"}]}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens <= 8 and answer.usage.prompt_tokens > 4  # image tokens count

    text_only = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}],
                                               max_tokens=4, temperature=0)
    assert text_only.usage.prompt_tokens < answer.usage.prompt_tokens

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice.message.content  # greedy: the stream spells the same answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.total_tokens == answer.usage.total_tokens


def test_sampling_is_seeded_per_request(endpoints, shape_png):
    url = endpoints["llava"]
    ask = image_chat(data_url(shape_png), temperature=1.0, max_tokens=10)
    first, again = (post(url, {**ask, "seed": 11}).json() for _ in range(2))
    other = post(url, {**ask, "seed": 12}).json()
    text = [r["choices"][0]["message"]["content"] for r in (first, again, other)]
    assert text[0] == text[1] and text[0] != text[2]


def test_local_files_under_the_root_and_remote_urls_when_allowed(endpoints, shapes_dir, shape_png, tmp_path):
    image = sorted((shapes_dir / "images").iterdir())[0]
    ok = post(endpoints["llava"], image_chat(f"file://{image}"))
    assert ok.status_code == 200, ok.text
    outside = tmp_path / "secret.png"
    outside.write_bytes(shape_png)
    denied = post(endpoints["llava"], image_chat(f"file://{shapes_dir}/../{outside.relative_to(outside.anchor)}"))
    assert denied.status_code == 400

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.end_headers()
            self.wfile.write(shape_png)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        remote = f"http://127.0.0.1:{server.server_address[1]}/shape.png"
        assert post(endpoints["llava"], image_chat(remote)).status_code == 200
        # The same URLs on an endpoint with the defaults (both off): refused, with the setting named.
        for url in (remote, f"file://{image}"):
            off = post(endpoints["locked"], image_chat(url), headers={"Authorization": f"Bearer {API_KEY}"})
            assert off.status_code == 400 and off.json()["error"]["code"] == "image_url_not_allowed", off.text
    finally:
        server.shutdown()


# ------------------------------------------------------------------------------------------- bad input
def _bomb() -> bytes:
    return png(Image.new("L", (5000, 5000)))  # 25M pixels in a few KB: over the 16.7M default limit


BAD_INPUTS = {
    "malformed JSON": (b'{"model": "bpo-test", "messages": [', 400),
    "not an object": (b'["hello"]', 400),
    "missing messages": ({"model": MODEL}, 400),
    "missing model": ({"messages": [{"role": "user", "content": "hi"}]}, 400),
    "mistyped max_tokens": (chat("hi", max_tokens="ten"), 400),
    "mistyped content": (chat(42), 400),
    "empty messages": ({"model": MODEL, "messages": []}, 400),
    "unknown role": ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400),
    "unknown model": ({**chat("hi"), "model": "gpt-17"}, 404),
    "non-image data URL": (image_chat(data_url(b"just text", "text/plain")), 400),
    "bad base64": (image_chat("data:image/png;base64,@@not-base64@@"), 400),
    "corrupt image": (image_chat(data_url(b"\x89PNG\r\n\x1a\nthis is not a png")), 400),
    "image over the pixel limit": (image_chat(data_url(_bomb())), 400),
    "too many images": (chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}] * 2
                             + [{"type": "text", "text": "compare"}]), 400),
    "image in an assistant turn": ({"model": MODEL, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]},
        {"role": "user", "content": "and?"}]}, 400),
    "prompt over the context length": (chat("circle " * 4000), 400),
    "max_tokens over the context length": (chat("hi", max_tokens=100_000), 400),
    "temperature out of range": (chat("hi", temperature=7), 400),
    "top_p out of range": (chat("hi", top_p=1.5), 400),
    "negative max_tokens": (chat("hi", max_tokens=-1), 400),
    "too many stop strings": (chat("hi", stop=list("abcde")), 400),
    "n > 1": (chat("hi", n=3), 400),
    "ftp URL": (image_chat("ftp://example.com/cat.png"), 400),
    "javascript URL": (image_chat("javascript:alert(1)"), 400),
    "body too large": (chat("x" * 300 * 1024), 413),
}


def test_every_bad_input_class_gets_a_4xx_with_an_openai_error_body(endpoints, shape_png):
    url = endpoints["llava"]
    statuses = {}
    for name, (payload, status) in BAD_INPUTS.items():
        response = post(url, raw=payload) if isinstance(payload, bytes) else post(url, payload)
        statuses[name] = response.status_code
        assert response.status_code == status, (name, response.status_code, response.text[:300])
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], (name, error)
    # Wrong route and wrong method: OpenAI's body too.
    missing = httpx.get(url.replace("/v1", "/v2/nothing"))
    assert missing.status_code == 404 and "error" in missing.json()
    assert httpx.get(f"{url}/chat/completions").status_code == 405
    # Nothing above took the replica down: a good request right after still works.
    assert post(url, image_chat(data_url(shape_png))).status_code == 200


def test_auth_on_and_off(endpoints):
    locked, open_ = endpoints["locked"], endpoints["llava"]
    assert post(locked, chat("hi")).status_code == 401
    wrong = post(locked, chat("hi"), headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{locked}/models").status_code == 401
    assert post(locked, chat("hi"), headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert httpx.get(locked.replace("/v1", "/health")).status_code == 200  # probes need no key
    assert post(open_, chat("hi")).status_code == 200  # no key configured: none needed


def test_app_builder_is_what_serve_run_and_rayservice_import(endpoints, tiny_models):
    """``serve run bpo_ray.serve.app:app_builder model=DIR key=value...`` (and RayService's import_path):
    arguments are dotted config overrides, validated like any run config."""
    from ray import serve

    from bpo_ray.config import ConfigError
    from bpo_ray.serve.app import app_builder

    with pytest.raises(ConfigError, match="serve.api_key"):
        app_builder({"model": str(tiny_models["llava"]), "serve.host": "0.0.0.0"})
    app = app_builder({"model": str(tiny_models["llava"]), "serve.model_id": "built", "serve.num_cpus_per_replica": 0.5,
                       "serve.max_batch_size": 2})
    serve.run(app, name="built", route_prefix="/built", blocking=False)
    url = endpoints["llava"].replace("/llava/", "/built/")
    try:
        wait_healthy(url, timeout_s=120)
        reply = post(url, {**chat("hi"), "model": "built"})
        assert reply.status_code == 200 and reply.json()["model"] == "built"
    finally:
        serve.delete("built")


def test_undeploy_takes_down_its_apps_together_and_leaves_the_others(endpoints, tiny_models):
    """What the eval stage does with its two models: deployed at once, deleted at once; undeploy returns when
    both are gone, and Serve keeps running for the applications that are not ours."""
    from ray import serve

    from bpo_ray.serve.launch import deploy, undeploy

    port = int(endpoints["llava"].split(":")[2].split("/")[0])
    ours = {name: (str(tiny_models["llava"]), MODEL) for name in ("ours-base", "ours-aligned")}
    urls = deploy(ours, ServeConfig(host="127.0.0.1", port=port, num_cpus_per_replica=0.5), access_log=False)
    for url in urls.values():
        wait_healthy(url, timeout_s=120)
    undeploy(list(urls))
    assert not set(ours) & set(serve.status().applications)
    assert {"llava", "qwen", "locked", "tight"} <= set(serve.status().applications)
    assert post(endpoints["llava"], chat("hi")).status_code == 200
    assert post(urls["ours-base"], chat("hi")).status_code == 404


# ---------------------------------------------------------------------------------------------- load
async def _load(url: str, payloads: list[dict], concurrency: int) -> list[int]:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120) as client:
        async def one(payload):
            async with gate:
                if payload.get("stream"):
                    async with client.stream("POST", f"{url}/chat/completions", json=payload) as response:
                        body = b"".join([chunk async for chunk in response.aiter_bytes()])
                        assert response.status_code != 200 or body.endswith(b"data: [DONE]\n\n")
                        return response.status_code
                return (await client.post(f"{url}/chat/completions", json=payload)).status_code

        return await asyncio.gather(*(one(p) for p in payloads))


def test_bounded_concurrent_load_has_no_5xx(endpoints, shape_png):
    image = data_url(shape_png)
    payloads = []
    for i in range(200):
        kind = i % 4
        payload = image_chat(image, seed=i, temperature=0.7) if kind < 2 else chat(f"Say {i}", seed=i)
        if kind == 3:
            payload["stream"] = True
        if i % 25 == 0:
            payload["max_tokens"] = "bad"  # a few bad requests mixed in must not disturb the rest
        payloads.append(payload)
    start = time.monotonic()
    statuses = asyncio.run(_load(endpoints["llava"], payloads, concurrency=16))
    elapsed = time.monotonic() - start
    assert not [s for s in statuses if s >= 500], statuses
    assert statuses.count(400) == 8 and statuses.count(200) == 192
    print(f"200 requests, 16 at a time: {elapsed:.1f}s ({200 / elapsed:.1f} req/s)")


def test_overload_is_503_with_retry_after_not_an_unbounded_queue(endpoints):
    url = endpoints["tight"]
    payloads = [chat(f"Count to {i}", max_tokens=48) for i in range(12)]

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(f"{url}/chat/completions", json=p) for p in payloads))

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    rejected = [r for r in responses if r.status_code == 503]
    assert rejected and statuses.count(200) >= 1, statuses
    assert all(r.headers.get("retry-after") == "2" for r in rejected)
    assert post(url, chat("hi")).status_code == 200  # and it serves again once the burst is over


def _replica_pids(app: str) -> list[int]:
    """Replica processes of one app among this session's own processes (the test cluster is our child)."""
    import psutil

    title = f"ray::ServeReplica:{app}:ChatServer"
    pids = []
    for p in psutil.Process().children(recursive=True):
        try:  # a worker may exit between the listing and this look at it
            if p.status() != psutil.STATUS_ZOMBIE and " ".join(p.cmdline()).startswith(title):
                pids.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def test_a_killed_replica_is_restarted_by_serve(endpoints):
    url = endpoints["tight"]
    before = _replica_pids("tight")
    assert len(before) == 1
    os.kill(before[0], signal.SIGKILL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if post(url, chat("hi")).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        pytest.fail("the endpoint did not come back after its replica was killed")
    after = _replica_pids("tight")
    assert len(after) == 1 and after != before


# ------------------------------------------------------------------------------------------ bpo serve
def test_bpo_serve_starts_answers_and_stops_cleanly(tiny_models, tmp_path):
    port = free_ports()[0]
    bpo = Path(sys.executable).parent / "bpo"
    process = subprocess.Popen(
        [str(bpo), "serve", "--model", str(tiny_models["llava"]), "--port", str(port), "--model-id", MODEL,
         "resources.ray_address=local", "resources.local_num_cpus=2", f"serve.api_key={API_KEY}",
         f"cache_dir={tmp_path / 'cache'}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output: list[str] = []
    threading.Thread(target=lambda: output.extend(process.stdout), daemon=True).start()
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 180
        while True:  # healthy, or fail as soon as the process has exited
            assert process.poll() is None, f"bpo serve exited {process.returncode}:\n" + "".join(output[-40:])
            try:
                wait_healthy(url, timeout_s=2, api_key=API_KEY)
                break
            except TimeoutError:
                assert time.monotonic() < deadline, "".join(output[-40:])
        deadline = time.monotonic() + 10
        while not any("serving" in line for line in output) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert any(f"at {url}" in line for line in output), output[-20:]
        assert post(url, chat("hi"), headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 0, "".join(output[-40:])
    finally:
        if process.poll() is None:
            process.kill()
    assert any(line.strip() == "stopped" for line in output)
    with pytest.raises(httpx.HTTPError):  # the port is released
        httpx.get(f"{url}/models", timeout=2)
