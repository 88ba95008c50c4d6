"""The sft stage: fine-tunes the base on Ray Train × DeepSpeed (2 CPU workers, ZeRO-0 as the demo runs it; the
DPO tests cover ZeRO-3 on the same worker loop), records the records it
rejects, exports a model that loads with plain ``from_pretrained``, and every later stage aligns that model."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from bpo_ray.config import PAPER_BPO, ConfigError, load_config
from bpo_ray.pipeline import Pipeline, RunDir, policy_path, run_stages, stages_until
from conftest import REPO, run_cli


def test_sft_fine_tunes_the_base_that_later_stages_align(tmp_path, tiny_models, mixed_records, ray_local):
    records, good, lines = mixed_records
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"storage_path={tmp_path}", f"cache_dir={tmp_path / 'cache'}", f"model.name_or_path={tiny_models['llava']}",
        "sft.enabled=true", "sft.zero_stage=0", "sft.data.format=llava_json", f"sft.data.path={records}", "sft.max_steps=6",
        "sft.per_device_batch_size=2", "sft.lr=1e-2", "sft.warmup_ratio=0", "sft.checkpoint_every=3",
        "data.synthetic.num_images=2", "negatives.injection.enabled=false",
        "negatives.weakening.sampling.max_new_tokens=4", "negatives.truncated=keep", *PAPER_BPO])
    run = RunDir.for_config(cfg)
    run_stages(cfg, until="negatives")

    sft = run.read_manifest("sft")
    # Every record is accounted for: kept or rejected with its reason, as in the data stage.
    assert sft["data"]["records_in"] == lines and sft["data"]["records_ok"] == good
    assert sft["data"]["records_rejected"] == lines - good
    assert {"missing_image", "undecodable_image", "image_too_large"} <= set(sft["data"]["errors_by_reason"])
    errors = pq.read_table(run.errors("sft")).to_pylist()
    assert len(errors) == lines - good and all(e["stage"] == "data" and e["reason"] for e in errors)
    assert sft["steps"] == 6 and sft["workers"] == 2 and sft["skipped_too_long"] == 0

    metrics = run.read_training_log("sft")
    losses = [m["loss"] for m in metrics]
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0], losses
    # ZeRO-0 in fp32: DeepSpeed keeps no gradient norm there, the loop measures it
    assert all(m["grad_norm"] > 0 for m in metrics), [m["grad_norm"] for m in metrics]

    # The export is a plain HF model directory, and it is the policy of every later stage.
    from transformers import AutoModelForImageTextToText

    assert policy_path(cfg, run) == run.sft_model
    model = AutoModelForImageTextToText.from_pretrained(run.sft_model)
    assert sum(p.numel() for p in model.parameters()) > 0
    pairs = pq.read_table(run.pairs).to_pylist()
    assert pairs and {p["generator"] for p in pairs} == {run.sft_model}

    # Re-running the job skips the finished sft stage (the demo trains its base once).
    assert not Pipeline(cfg, run, stages_until("negatives")).pending()


def test_sft_settings_that_cannot_work_fail_at_config_time():
    with pytest.raises(ConfigError, match="sft.precision 'bf16' needs GPUs"):
        load_config(REPO / "configs" / "tiny.yaml", ["sft.enabled=true", "sft.precision=bf16"])
    with pytest.raises(ConfigError, match="sft.data.synthetic.seed equals eval.seed"):
        load_config(REPO / "configs" / "tiny.yaml", ["sft.enabled=true", "sft.data.synthetic.seed=1234"])
    with pytest.raises(ConfigError, match="unknown key 'sft.lrr' \\(did you mean 'sft.lr'\\?\\)"):
        load_config(REPO / "configs" / "tiny.yaml", ["sft.lrr=1"])


def test_bpo_sft_refuses_a_config_without_sft(tmp_path):
    done = run_cli("sft", "--config", "configs/tiny.yaml", "sft.enabled=false", f"storage_path={tmp_path}")
    assert done.returncode == 2 and "sft.enabled is false" in done.stderr
