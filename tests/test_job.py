"""The real entry points (``bpo run`` and ``python jobs/bpo.py``) on the embedded default, on local Ray."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import yaml

from conftest import run_cli


def test_job_runs_the_embedded_default_and_resumes(tmp_path):
    common = [f"storage_path={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}", "resources.ray_address=local",
              "data.synthetic.num_images=8", "train.max_steps=3", "negatives.weakening.sampling.max_new_tokens=8"]
    first = run_cli("run", "--config", "configs/tiny.yaml", *common)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "runs" / "bpo-tiny"
    assert f"run directory: {run_dir}" in first.stdout
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["synthetic"]["num_images"] == 8 and saved["resources"]["ray_address"] == "local"
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert manifest["finished"] and manifest["records_in"] == 16 and manifest["records_rejected"] == 0
    assert pq.read_table(run_dir / "data" / "samples").num_rows == manifest["samples"] == 8 * 3
    assert (tmp_path / "cache" / "models" / "tiny-llava" / "model.safetensors").is_file()
    train = json.loads((run_dir / "train" / "manifest.json").read_text())
    assert train["finished"] and train["steps"] == 3 and train["workers"] == 2
    assert (run_dir / "model" / "model.safetensors").is_file() and "train: 3 steps on 2 workers" in first.stdout

    again = run_cli("jobs/bpo.py", "--config", "configs/tiny.yaml", *common)
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("data", "negatives", "reference", "train"):
        assert f"stage {stage}: finished earlier for the same inputs, skipped" in again.stderr
    assert json.loads((run_dir / "data" / "manifest.json").read_text()) == manifest
