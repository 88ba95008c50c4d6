"""The OpenAI-compatible Ray Serve application (``hf`` engine), and how to start it.

One deployment, ``ChatServer``, owns the FastAPI ingress and a ``ChatEngine``. A request is parsed,
checked and encoded on its own (so its errors are its own 4xx), then joins a dynamic batch
(``@serve.batch``) for one ``generate`` call. Admission is Serve's: ``max_ongoing_requests`` per replica,
then a bounded queue per proxy (``max_queued_requests``), past which the proxy answers 503 with
Retry-After. Serve restarts a replica whose health check fails or whose process dies.

Entry points: ``build_app`` (Python) and ``app_builder`` (``serve run bpo_ray.serve.app:app_builder
model=DIR``); ``serve/launch.py`` starts and stops them (``bpo serve``, the job's evaluation).
"""

# No `from __future__ import annotations`: FastAPI resolves the route signatures (Request) at runtime,
# and Serve's ingress rebinds the methods outside this module's namespace.
import asyncio
import hmac
import logging
import os
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from bpo_ray.config import ModelConfig, ServeConfig
from bpo_ray.data.records import ImageLimits
from bpo_ray.resources import serve_replica_request, serve_scaling, torch_threads
from bpo_ray.serve.protocol import (
    APIError,
    ChatRequest,
    ImagePolicy,
    chunk_body,
    completion_body,
    error_body,
    models_body,
    parse_request,
    sse,
    usage_chunk,
)

log = logging.getLogger(__name__)
api = FastAPI(title="bpo-ray", docs_url=None, redoc_url=None)


# Every error leaves as OpenAI's body, whatever raised it.
@api.exception_handler(APIError)
async def _api_error(request: Request, err: APIError):
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
    return JSONResponse(error_body(str(err.detail), "invalid_request_error", None, code), status_code=err.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError):
    return JSONResponse(error_body(str(err), "invalid_request_error", None, "invalid_value"), status_code=400)


@api.exception_handler(Exception)
async def _internal_error(request: Request, err: Exception):
    log.exception("internal error")
    return JSONResponse(error_body(f"internal error: {err.__class__.__name__}", "server_error", None,
                                   "internal_error"), status_code=500)


def _raise_failed(result):
    # Defined before the deployment: serve.ingress captures the module's names when the class is made.
    if isinstance(result, Exception):
        raise result
    return result


@serve.deployment(name="ChatServer")
@serve.ingress(api)
class ChatServer:
    def __init__(self, model_path: str, model_id: str, cfg: ServeConfig, model: ModelConfig | None = None):
        import torch

        from bpo_ray.serve.engine import ChatEngine

        torch.set_num_threads(torch_threads(cfg.num_cpus_per_replica))
        # ``model``: how to load it (dtype, attention kernel, remote code), as every other actor loads models.
        self.engine = ChatEngine(model_path, model, max_model_len=cfg.max_model_len,
                                 default_max_tokens=cfg.default_max_tokens)
        self.model_id, self.api_key, self.max_body = model_id, cfg.api_key, cfg.max_request_bytes
        self.policy = ImagePolicy(ImageLimits(max_pixels=cfg.max_image_pixels, max_bytes=cfg.max_request_bytes),
                                  cfg.max_images_per_request, cfg.local_image_root, cfg.allow_remote_images)
        self.created = int(time.time())
        self._generate.set_max_batch_size(cfg.max_batch_size)
        self._generate.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        log.info("serving %s as %r (max_model_len %d)", model_path, model_id, self.engine.max_model_len)

    # ------------------------------------------------------------------------------------- routes
    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.model_id}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        return models_body([self.model_id], self.created)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self._authorize(request)
        raw = await self._read_body(request)
        # Image decoding and tokenisation are CPU work: off the event loop, which keeps streaming.
        chat = await asyncio.to_thread(parse_request, raw, self.policy)
        if chat.model != self.model_id:
            raise APIError(404, f"the model {chat.model!r} does not exist here; this endpoint serves "
                                f"{self.model_id!r}", param="model", code="model_not_found")
        if chat.stream:
            return await self._stream(chat)
        job = await asyncio.to_thread(self.engine.encode, chat)
        done = _raise_failed(await self._generate(job))
        return completion_body(chat, done.text, done.finish_reason, done.prompt_tokens, done.completion_tokens)

    def check_health(self) -> None:
        """Serve calls this periodically; raising restarts the replica."""
        if self.engine.model is None:
            raise RuntimeError("model not loaded")

    # ---------------------------------------------------------------------------------- internals
    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise APIError(413, f"request body over {self.max_body} bytes", code="request_too_large")
        raw = await request.body()
        if len(raw) > self.max_body:
            raise APIError(413, f"request body over {self.max_body} bytes", code="request_too_large")
        return raw

    async def _stream(self, chat: ChatRequest) -> StreamingResponse:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        job = await asyncio.to_thread(self.engine.encode, chat,
                                      lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text))
        task = asyncio.ensure_future(self._generate(job))
        # Runs after every delta the generate thread scheduled: the end marker comes last.
        task.add_done_callback(lambda _: pieces.put_nowait(None))

        async def events():
            try:
                yield sse(chunk_body(chat, {"role": "assistant", "content": ""}))
                while (text := await pieces.get()) is not None:
                    yield sse(chunk_body(chat, {"content": text}))
                try:
                    done = _raise_failed(await task)
                except Exception as err:  # noqa: BLE001 - the status line is gone; report in-stream
                    log.exception("generation failed mid-stream")
                    yield sse(error_body(f"generation failed: {err.__class__.__name__}", "server_error"))
                else:
                    yield sse(chunk_body(chat, {}, done.finish_reason))
                    if chat.include_usage:
                        yield sse(usage_chunk(chat, done.prompt_tokens, done.completion_tokens))
                yield sse("[DONE]")
            finally:
                if not task.done():  # the client went away: stop spending tokens on it
                    job.cancelled.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)  # both reset from the config in __init__
    async def _generate(self, jobs: list) -> list:
        try:
            return await asyncio.to_thread(self.engine.run, jobs)
        except Exception:
            if len(jobs) == 1:
                raise
        # One job broke the batch: run them alone so only that one fails.
        results = []
        for job in jobs:
            try:
                results.append((await asyncio.to_thread(self.engine.run, [job]))[0])
            except Exception as err:  # noqa: BLE001 - returned to its own caller
                results.append(err)
        return results


# ------------------------------------------------------------------------------------------ building
def deployment_options(cfg: ServeConfig) -> dict:
    """Replicas, resources and admission from the serve config."""
    actor = {**serve_replica_request(cfg),
             "runtime_env": {"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                                          "TOKENIZERS_PARALLELISM": "false"}}}
    options = {"ray_actor_options": actor, "max_ongoing_requests": cfg.max_ongoing_requests,
               "max_queued_requests": cfg.max_queued_requests,
               "backpressure_config": {"status_code": 503, "retry_after_s": cfg.retry_after_s},
               "health_check_period_s": 10.0}
    options.update(serve_scaling(cfg))
    return options


def build_app(model_path: str, cfg: ServeConfig, model_id: str | None = None, model: ModelConfig | None = None):
    """The Serve application for one model: ``hf`` (ours) or ``vllm`` (``ray.serve.llm``). ``model``: the
    run's model settings the hf engine loads with (default: ModelConfig's)."""
    model_id = model_id or cfg.model_id
    if cfg.engine == "vllm":
        from bpo_ray.serve.vllm import build_vllm_app

        return build_vllm_app(model_path, cfg, model_id)
    return ChatServer.options(**deployment_options(cfg)).bind(model_path, model_id, cfg, model)


def app_builder(args: dict):
    """``serve run bpo_ray.serve.app:app_builder model=DIR [config=run.yaml] [serve.port=...]``: the serve
    section of a run config (or the defaults) plus dotted overrides given as arguments."""
    from bpo_ray.config import load_config
    from bpo_ray.models.loader import resolve_model_path
    from bpo_ray.pipeline.rundir import RunDir

    args = dict(args)
    model = args.pop("model", None)
    config = args.pop("config", None)
    cfg = load_config(config, [f"{k}={v}" for k, v in args.items()])
    path = resolve_model_path(model, cfg.cache_dir) if model else RunDir.for_config(cfg).model
    return build_app(path, cfg.serve, model=cfg.model)
