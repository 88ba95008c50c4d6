"""eval: serve the base and the aligned model (the last bootstrapping round's) side by side (Ray Serve,
OpenAI-compatible), score both over HTTP the same way (POPE + CHAIR on held-out images; POPE on COCO when
configured) → ``eval/metrics.json`` and ``eval/predictions.jsonl`` (every request, its answer or its error)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from bpo_ray import storage
from bpo_ray.config import RunConfig
from bpo_ray.eval.client import Endpoint
from bpo_ray.eval.evaluate import evaluate, heldout_dir
from bpo_ray.pipeline.rundir import RunDir, policy_path

log = logging.getLogger(__name__)


def run(cfg: RunConfig, run_dir: RunDir, key: str) -> dict:
    """Serve base and aligned side by side (Ray Serve), evaluate both over HTTP, write eval/."""
    from bpo_ray.serve.launch import deploy, undeploy, wait_healthy

    if not cfg.eval.enabled:
        return {"skipped": "eval.enabled is false"}
    dataset = heldout_dir(cfg)
    models = {"base": (policy_path(cfg, run_dir.at_round(1)), f"{cfg.serve.model_id}-base"),
              "aligned": (run_dir.model, cfg.serve.model_id)}
    if not cfg.eval.base:
        del models["base"]
    # Without access logs: the eval's requests (2,300 in the demo) would each be a line of the job's log; what
    # failed is counted in the results.
    urls = deploy(models, cfg.serve, cfg.model, access_log=False)
    results, rows = {}, []
    try:
        for url in urls.values():  # a 7B model downloading and loading on a fresh GPU node takes minutes
            wait_healthy(url, timeout_s=1800, api_key=cfg.serve.api_key)
        # Both models at once: each has its own replicas, so evaluating one after the other would only wait.
        with ThreadPoolExecutor(len(urls)) as pool:
            running = {}
            for name, url in urls.items():
                log.info("eval: %s at %s", name, url)
                running[name] = pool.submit(evaluate, Endpoint(url, models[name][1], cfg.serve.api_key), cfg, dataset)
        for name, done in running.items():
            metrics, model_rows = done.result()
            results[name] = metrics
            rows += [{"model": name, **r} for r in model_rows]
    finally:
        undeploy(list(urls))
    storage.write_text(run_dir.eval_metrics, json.dumps(results, indent=2))
    storage.write_text(run_dir.predictions, "".join(json.dumps(r) + "\n" for r in rows))
    errors = Counter(r["error"].split(":")[0] for r in rows if r["error"])
    return {"metrics": results, "dataset": str(dataset), "requests": len(rows), "errors_by_reason": dict(errors),
            "models": {name: path for name, (path, _) in models.items()}}
