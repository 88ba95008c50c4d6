"""Resume bookkeeping: finished stages are skipped for the same inputs, re-run when their inputs change."""

from __future__ import annotations

import pytest

from bpo_ray import storage
from bpo_ray.config import load_config
from bpo_ray.stages import Pipeline, RunDir


def _stages(calls, fail_in=None):
    def make(name):
        def fn(cfg, run):
            calls.append(name)
            storage.write_text(run.path(name, "out.txt"), name)
            if name == fail_in:
                raise RuntimeError("crash mid-stage")
            return {"n": len(calls)}
        return fn
    return [("data", make("data"), ("data",)), ("train", make("train"), ("train",))]


def _run(cfg, calls, fail_in=None, **kwargs):
    run = RunDir.for_config(cfg)
    stages = _stages(calls, fail_in)
    pipeline = Pipeline(cfg, run, order=[s[0] for s in stages], **kwargs)
    for name, fn, sections in stages:
        pipeline.stage(name, fn, sections)
    return pipeline


def test_crash_then_resume_at_first_incomplete_stage(tmp_path):
    cfg = load_config(None, [f"storage_path={tmp_path}"])
    calls: list[str] = []
    with pytest.raises(RuntimeError):
        _run(cfg, calls, fail_in="train")
    assert calls == ["data", "train"]
    run = RunDir.for_config(cfg)
    assert run.read_manifest("data")["finished"] and run.read_manifest("train") is None
    calls.clear()
    _run(cfg, calls)
    assert calls == ["train"]
    calls.clear()
    _run(cfg, calls)
    assert calls == []


def test_changed_inputs_rerun_the_stage_and_everything_after(tmp_path):
    calls: list[str] = []
    _run(load_config(None, [f"storage_path={tmp_path}"]), calls)
    calls.clear()
    _run(load_config(None, [f"storage_path={tmp_path}", "train.lr=1e-3"]), calls)
    assert calls == ["train"]
    calls.clear()
    _run(load_config(None, [f"storage_path={tmp_path}", "train.lr=1e-3", "data.synthetic.seed=9"]), calls)
    assert calls == ["data", "train"]  # train's inputs include data's


def test_stage_selection(tmp_path):
    cfg = load_config(None, [f"storage_path={tmp_path}"])
    calls: list[str] = []
    _run(cfg, calls)
    calls.clear()
    _run(cfg, calls, only_stage="data", force=True)
    assert calls == ["data"]
    calls.clear()
    _run(cfg, calls, from_stage="train", force=True)
    assert calls == ["train"]
    with pytest.raises(ValueError, match="unknown stage"):
        _run(cfg, calls, from_stage="nope")


def test_torn_manifest_means_not_finished(tmp_path):
    cfg = load_config(None, [f"storage_path={tmp_path}"])
    calls: list[str] = []
    _run(cfg, calls)
    (tmp_path / "bpo-tiny" / "data" / "manifest.json").write_text('{"finished": tr')
    calls.clear()
    _run(cfg, calls)
    assert calls == ["data", "train"]
