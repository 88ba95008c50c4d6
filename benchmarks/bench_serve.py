"""Serving benchmark: p50/p99 latency and requests/s at 1, 4 and 16 concurrent clients, with dynamic
batching (max_batch_size 16) and without (1), the HTTP path's overhead against in-process generate, and
the ceiling batching can reach here (one in-process generate of 16 rows against 16 of one).
Everything in one run on the same machine; the table reports ratios against the baselines measured here.

    python benchmarks/bench_serve.py [--requests 64] [--max-tokens 16] [--models tiny,small]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from common import models, parameters, save, table  # noqa: E402

CLIENTS = (1, 4, 16)
REPLICA_CPUS = 2  # one replica with both cores: the comparison is batching, not parallel replicas


def image_url(seed: int) -> str:
    from bpo_ray.data.synthetic import generate

    sample = next(iter(generate(1, seed=seed)))
    buf = io.BytesIO()
    sample.image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def payload(model_id: str, url: str, max_tokens: int) -> dict:
    return {"model": model_id, "temperature": 0, "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe the image in detail."}]}]}


async def load(base_url: str, body: dict, clients: int, requests: int) -> dict:
    import httpx

    latencies, statuses = [], []
    gate = asyncio.Semaphore(clients)
    async with httpx.AsyncClient(timeout=600) as client:
        async def one():
            async with gate:
                start = time.perf_counter()
                response = await client.post(f"{base_url}/chat/completions", json=body)
                latencies.append(time.perf_counter() - start)
                statuses.append(response.status_code)

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(requests)))
        wall = time.perf_counter() - start
    assert set(statuses) == {200}, statuses
    latencies.sort()
    return {"rps": requests / wall, "p50_s": statistics.median(latencies),
            "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def in_process(path: Path, body: dict, repeats: int, threads: int, rows: int = 1) -> float:
    """Median seconds per ``generate`` call of ``rows`` requests through the same engine, no HTTP, no Serve,
    as many threads as a replica. With rows = 16 it is the ceiling of what batching can give on this machine."""
    import torch

    from bpo_ray.serve.engine import ChatEngine

    torch.set_num_threads(threads)
    from bpo_ray.serve.protocol import ImagePolicy, parse_request

    engine = ChatEngine(str(path))
    raw = json.dumps(body).encode()

    def batch():
        return [engine.encode(parse_request(raw, ImagePolicy())) for _ in range(rows)]

    engine.run(batch())  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.run(batch())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64, help="requests per (model, batching, clients) cell")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--models", default="tiny,small")
    args = parser.parse_args()

    import ray
    from ray import serve

    from bpo_ray.config import ServeConfig
    from bpo_ray.serve.app import build_app
    from bpo_ray.serve.launch import wait_healthy

    root = Path(tempfile.mkdtemp(prefix="bpo-bench-serve-"))
    paths = models(root)
    url = image_url(7)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8765})
    rows, results = [], {}
    for name in args.models.split(","):
        body = payload("bench", url, args.max_tokens)
        single = in_process(paths[name], body, repeats=8, threads=REPLICA_CPUS)
        full = in_process(paths[name], body, repeats=3, threads=REPLICA_CPUS, rows=max(CLIENTS))
        results[name] = {"parameters": parameters(paths[name]), "in_process_s": single,
                         "in_process_batch_s": full, "cells": {}}
        for batching, batch_size in (("on", 16), ("off", 1)):
            cfg = ServeConfig(model_id="bench", max_batch_size=batch_size, num_cpus_per_replica=REPLICA_CPUS,
                              max_ongoing_requests=64)  # the default batch wait (serve.batch_wait_timeout_s)
            app_name = f"{name}-{batching}"
            serve.run(build_app(str(paths[name]), cfg), name=app_name, route_prefix=f"/{app_name}", blocking=False)
            base = f"http://127.0.0.1:8765/{app_name}/v1"
            wait_healthy(base, timeout_s=300)
            asyncio.run(load(base, body, 1, 4))  # warm-up
            for clients in CLIENTS:
                cell = asyncio.run(load(base, body, clients, args.requests))
                results[name]["cells"][f"{batching}-{clients}"] = cell
            serve.delete(app_name)
        cells = results[name]["cells"]
        for clients in CLIENTS:
            on, off = cells[f"on-{clients}"], cells[f"off-{clients}"]
            rows.append([name, clients, on["rps"], off["rps"], on["rps"] / off["rps"], on["p50_s"] * 1000,
                         on["p99_s"] * 1000, off["p50_s"] * 1000, off["p99_s"] * 1000])
        results[name]["http_overhead"] = cells["off-1"]["p50_s"] / single
        results[name]["batching_speedup_16"] = cells["on-16"]["rps"] / cells["off-16"]["rps"]
        # What one generate call of 16 rows gives over 16 calls of one, with no HTTP or Serve: the ceiling.
        results[name]["batched_engine_speedup_16"] = max(CLIENTS) * single / full
        results[name]["serve_share_of_ceiling"] = (results[name]["batching_speedup_16"]
                                                   / results[name]["batched_engine_speedup_16"])
    serve.shutdown()
    ray.shutdown()

    markdown = "\n\n".join([
        table("Serving: requests/s and latency, dynamic batching on (max 16) vs off (1)",
              ["model", "clients", "req/s on", "req/s off", "on/off", "p50 on ms", "p99 on ms", "p50 off ms",
               "p99 off ms"], rows),
        table("HTTP path vs in-process generate (1 client, no batching)",
              ["model", "params", "in-process ms", "HTTP p50 ms", "HTTP / in-process"],
              [[n, r["parameters"], r["in_process_s"] * 1000, r["cells"]["off-1"]["p50_s"] * 1000, r["http_overhead"]]
               for n, r in results.items()]),
        table("Batching at 16 clients against its ceiling: one in-process generate of 16 rows vs 16 of one",
              ["model", "in-process 16 rows ms", "ceiling (16 × one / 16 rows)", "served on/off at 16",
               "served / ceiling"],
              [[n, r["in_process_batch_s"] * 1000, r["batched_engine_speedup_16"], r["batching_speedup_16"],
                r["serve_share_of_ceiling"]] for n, r in results.items()]),
    ])
    save("serve", {"args": vars(args), "results": results}, markdown)


if __name__ == "__main__":
    main()
