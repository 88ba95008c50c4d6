"""Resume bookkeeping: finished stages are skipped for the same inputs, re-run when their inputs change."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from bpo_ray import storage
from bpo_ray.config import load_config
from bpo_ray.pipeline import Pipeline, RunDir, Stage


def _stages(calls, fail_in=None):
    def make(name):
        def fn(cfg, run, key):
            calls.append(name)
            storage.write_text(run.path(name, "out.txt"), name)
            if name == fail_in:
                raise RuntimeError("crash mid-stage")
            return {"n": len(calls)}
        return fn
    return [Stage("data", make("data"), ("data",)), Stage("train", make("train"), ("train",))]


def _run(cfg, calls, fail_in=None, **kwargs):
    pipeline = Pipeline(cfg, RunDir.for_config(cfg), _stages(calls, fail_in), **kwargs)
    pending = [s.name for s in pipeline.pending()]
    pipeline.run_all()
    assert calls[len(calls) - len(pending):] == pending  # what it said would run is what ran
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


def test_a_rerun_keeps_what_the_stage_says_it_keeps(tmp_path):
    """A training stage's log survives the re-run of its unfinished stage (its checkpoints resume, and the log
    goes on); every other output of the stage is cleared."""
    cfg = load_config(None, [f"storage_path={tmp_path}"])
    run = RunDir.for_config(cfg)

    def train(cfg, run, key, fail=True):
        storage.write_text(run.path("train", "log.jsonl"), storage.read_text(run.path("train", "log.jsonl"))
                           + "step\n" if storage.exists(run.path("train", "log.jsonl")) else "step\n")
        storage.write_text(run.path("train", "partial.bin"), "x")
        if fail:
            raise RuntimeError("stopped mid-training")
        return {}

    with pytest.raises(RuntimeError):
        Pipeline(cfg, run, [Stage("train", train, ("train",), keep=("log.jsonl",))]).run_all()
    Pipeline(cfg, run, [Stage("train", lambda c, r, k: train(c, r, k, fail=False), ("train",),
                              keep=("log.jsonl",))]).run_all()
    assert storage.read_text(run.path("train", "log.jsonl")) == "step\nstep\n"
    (tmp_path / "bpo-tiny" / "train" / "partial.bin").unlink()
    storage.write_text(run.path("train", "stale.bin"), "x")
    Pipeline(cfg, run, [Stage("train", lambda c, r, k: {}, ("train",), keep=("log.jsonl",))], force=True).run_all()
    assert sorted(p.name for p in (tmp_path / "bpo-tiny" / "train").iterdir()) == ["log.jsonl", "manifest.json"]


def test_torn_manifest_means_not_finished(tmp_path):
    cfg = load_config(None, [f"storage_path={tmp_path}"])
    calls: list[str] = []
    _run(cfg, calls)
    (tmp_path / "bpo-tiny" / "data" / "manifest.json").write_text('{"finished": tr')
    calls.clear()
    _run(cfg, calls)
    assert calls == ["data", "train"]


# ------------------------------------------------------------------ a run directory from before bpo_ray.pipeline
BEFORE = Path(__file__).parent / "data" / "rundir-before-pipeline" / "bpo-tiny"


def test_a_torn_checkpoint_record_is_named_not_parsed(tmp_path):
    """Ray Train rewrites its checkpoint record in place; a job stopped mid-write leaves it cut short. Resuming
    says which file and what to do, instead of a bare JSON error from inside Ray Train."""
    from bpo_ray.train.fit import RAY_TRAIN_SNAPSHOT, latest_checkpoint

    train_dir = tmp_path / "train-f1a24c88189f"
    shutil.copytree(BEFORE / "checkpoints" / train_dir.name, train_dir)
    record = train_dir / RAY_TRAIN_SNAPSHOT
    assert latest_checkpoint(str(train_dir))[1] == 12  # whole, it names the checkpoint at micro-step 12
    record.write_bytes(record.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"{RAY_TRAIN_SNAPSHOT} is cut short .*Remove it to train this stage"):
        latest_checkpoint(str(train_dir))


def test_a_run_directory_from_before_the_pipeline_package_resumes(tmp_path):
    """Written by 8b7a36b (README beside it): the same config finds every stage finished, so nothing re-runs,
    and each training stage's checkpoint folder is the one that run wrote, so an interrupted one resumes."""
    import shutil

    from bpo_ray.pipeline import STAGES, stage_key
    from bpo_ray.pipeline.sft import _checkpoints
    from bpo_ray.train.fit import latest_checkpoint

    shutil.copytree(BEFORE, tmp_path / "bpo-tiny")
    cfg = load_config(tmp_path / "bpo-tiny" / "config.yaml", [f"storage_path={tmp_path}"])
    run = RunDir.for_config(cfg)
    calls: list[str] = []
    pipeline = Pipeline(cfg, run, [dataclasses.replace(s, run=lambda c, r, k, name=s.name: calls.append(name))
                                   for s in STAGES])
    assert not pipeline.pending()
    pipeline.run_all()
    assert calls == [] and pipeline.manifests["train"]["steps"] == 12

    # The keys the stages ran under are the ones this code computes as that code did (``earlier``: with the
    # pools, checkpoint cadence and serving address, keyed then), stage after stage; the reference stage ran
    # under the whole train section, which it read then (``read_before``), before its reads were narrowed.
    upstream, moved = "", []
    for stage in STAGES:
        reads = ("model", "train") if stage.name == "reference" else stage.reads
        assert run.read_manifest(stage.name)["inputs_hash"] == stage_key(upstream, cfg, reads, earlier=True), stage.name
        if stage_key(upstream, cfg, stage.reads) != stage_key(upstream, cfg, reads, earlier=True):
            moved.append(stage.name)
        upstream = run.read_manifest(stage.name)["output_id"]
    assert moved == ["sft", "negatives", "reference", "train", "eval"]  # today's keys: all but data's and report's
    train_key = run.read_manifest("train")["inputs_hash"]
    assert latest_checkpoint(run.checkpoint_run("train", train_key)) == (
        run.path("checkpoints", "train-f1a24c88189f", "checkpoint_2026-11-30_16-37-53.919453"), 12)
    # Interrupted there (no finished manifest), training resumes from that folder, not from nothing under
    # today's key; the manifest it then writes carries today's key.
    (tmp_path / "bpo-tiny" / "train" / "manifest.json").unlink()
    keys: dict[str, str] = {}
    Pipeline(cfg, run, [dataclasses.replace(s, run=lambda c, r, k, name=s.name: keys.setdefault(name, k) and {})
                        for s in STAGES]).run_all()
    assert list(keys) == ["train", "eval", "report"] and keys["train"] == train_key
    assert run.read_manifest("train")["inputs_hash"] != train_key
    # sft checkpoints were named by the config hash alone then; an interrupted sft resumes from that folder.
    sft_dir = _checkpoints(cfg, run, run.read_manifest("sft")["inputs_hash"])
    assert sft_dir == run.path("checkpoints", "sft-18552de4e9df") and latest_checkpoint(sft_dir)[1] == 2


def test_bootstrapping_rounds_each_align_the_model_the_round_before_made_and_extend_a_finished_run(tmp_path):
    """rounds: N repeats negatives → reference → train in round-<k>/ after round 1's, each round's stages on the
    previous round's model; eval comes after the last. Round 1 does not depend on N: a finished one-round run
    extended to two rounds runs round 2 and what follows it, nothing else."""
    from bpo_ray.pipeline.job import stages_for, stages_until
    from bpo_ray.pipeline.rundir import policy_path
    from bpo_ray.pipeline.summary import stage_rows

    calls: list[tuple[str, int]] = []

    def make(kind):
        def fn(cfg, run, key):
            calls.append((kind, run.round))
            out = {"negatives": run.pairs, "reference": run.scored_pairs, "train": run.model}.get(kind)
            storage.write_text(storage.join(out or run.stage_dir(kind), "out.txt"), kind)
            used = policy_path(cfg, run) if run.round > 1 else "base"
            return {"policy": used, "steps": 1, "pairs": 2, "scored": 2}
        return fn

    table = [Stage(kind, make(kind), (kind,) if kind in ("data", "train") else ()) for kind in
             ("data", "negatives", "reference", "train", "eval")]
    two = stages_for(2, table)
    assert [s.name for s in two] == ["data", "negatives", "reference", "train", "round-2/negatives",
                                     "round-2/reference", "round-2/train", "eval"]
    assert [s.name for s in stages_until("train", two)][-1] == "round-2/train"  # what it is: its last round
    assert [s.name for s in stages_until("round-2/negatives", two)][-1] == "round-2/negatives"  # a stage's name
    assert [s.name for s in stages_until("negatives", stages_for(3, table))][-1] == "round-3/negatives"
    with pytest.raises(ValueError, match="unknown stage 'round-3/train'"):
        stages_until("round-3/train", two)
    assert [s.name for s in stages_for(1, table)] == [s.name for s in table]

    one_round = load_config(None, [f"storage_path={tmp_path}"])
    Pipeline(one_round, RunDir.for_config(one_round), stages_for(1, table)).run_all()
    calls.clear()
    three = load_config(None, [f"storage_path={tmp_path}", "rounds=3"])
    run = RunDir.for_config(three)
    with pytest.raises(ValueError, match="unknown stage"):
        Pipeline(three, run, stages_for(3, table), only_stage="round-4/train")
    pipeline = Pipeline(three, run, stages_for(3, table))
    pipeline.run_all()
    assert calls == [("negatives", 2), ("reference", 2), ("train", 2), ("negatives", 3), ("reference", 3),
                     ("train", 3), ("eval", 3)]
    root = Path(run.root)
    assert (root / "round-2" / "negatives" / "pairs" / "out.txt").is_file()
    assert (root / "round-3" / "model" / "out.txt").is_file() and (root / "model" / "out.txt").is_file()
    manifests = run.read_manifests()
    assert manifests["round-2/negatives"]["policy"] == str(root / "model")  # round 1's aligned model
    assert manifests["round-3/train"]["policy"] == str(root / "round-2" / "model")
    assert manifests["eval"]["policy"] == str(root / "round-2" / "model")  # eval's view is the last round's
    assert [name for name, _, _ in stage_rows(manifests)] == [
        "data", "negatives", "reference", "train", "round-2/negatives", "round-2/reference", "round-2/train",
        "round-3/negatives", "round-3/reference", "round-3/train", "eval"]

    calls.clear()  # everything finished: a rerun runs nothing
    Pipeline(three, run, stages_for(3, table)).run_all()
    assert calls == []


def _ran(root, *overrides) -> list[str]:
    """The stages of the real table (each a stub that records its name) that run on ``root`` with these
    overrides, after whatever ran there before."""
    from bpo_ray.pipeline import STAGES

    calls: list[str] = []
    cfg = load_config(None, [f"storage_path={root}", *overrides])
    stages = [dataclasses.replace(s, run=lambda c, r, k, name=s.name: calls.append(name) or {}) for s in STAGES]
    pipeline = Pipeline(cfg, RunDir.for_config(cfg), stages)
    pending = [s.name for s in pipeline.pending()]
    pipeline.run_all()
    assert calls == pending  # what it said would run is what ran
    return calls


def test_a_copied_run_directory_names_its_own_models(tmp_path):
    """A manifest keeps the path its stage wrote to; what a job prints after resuming a copied (or synced) run
    directory, and its report's table, name the models where that directory has them now."""
    from bpo_ray.pipeline.summary import stage_table, summary

    first = RunDir(str(tmp_path / "first"))
    first.write_manifest("sft", {"steps": 3, "samples": 6, "model_dir": first.sft_model})
    first.write_manifest("train", {"steps": 2, "workers": 2, "model_dir": first.model})
    first.write_manifest("round-2/train", {"steps": 2, "workers": 2, "model_dir": first.at_round(2).model})
    shutil.copytree(first.root, tmp_path / "copy")
    shutil.rmtree(first.root)
    copy = RunDir(str(tmp_path / "copy"))
    manifests = copy.read_manifests()
    for text in (summary(manifests, copy), stage_table(manifests, copy)):
        assert str(tmp_path / "first") not in text
        for model in (copy.sft_model, copy.model, copy.at_round(2).model):
            assert model in text
    assert first.sft_model in summary(manifests)  # without a run directory: as the manifest has it


def test_a_sweep_over_training_settings_scores_its_pairs_once(tmp_path):
    """Reference scores depend on a few fields of train (``reference.READS``): another lr, beta or step count
    re-runs training, not the scoring of every pair; another loss that scores differently (IPO) re-runs both."""
    from bpo_ray.pipeline import STAGES

    assert _ran(tmp_path) == [s.name for s in STAGES]
    swept = ["train.lr=1e-3", "train.beta=0.2", "train.max_steps=5", "train.reference_pool.max_size=2"]
    assert _ran(tmp_path, *swept) == ["train", "eval", "report"]
    assert _ran(tmp_path, *swept, "train.loss=ipo") == ["reference", "train", "eval", "report"]
    assert _ran(tmp_path, *swept, "train.loss=ipo", "model.max_length=256") == [s.name for s in STAGES]  # the model: all


def test_how_a_stage_runs_is_not_what_it_computes(tmp_path):
    """Actor pools, checkpoint cadence, activation checkpointing and where the eval stage serves change how a
    stage runs: resuming with a bigger pool, another port or more replicas re-runs nothing. What the models
    compute (the serving context, a GPU for generation) still re-runs what depends on it."""
    from bpo_ray.pipeline import STAGES

    assert _ran(tmp_path) == [s.name for s in STAGES]
    how = ["negatives.weakening.pool.max_size=8", "negatives.weakening.pool.batch_size=64",
           "negatives.injection.pool.num_cpus=2", "negatives.weakening.pool.accelerator_type=L4",
           "train.reference_pool.max_size=4", "train.checkpoint_every=5", "train.keep_checkpoints=3",
           "train.max_failures=5", "sft.checkpoint_every=7", "serve.port=9001", "serve.host=0.0.0.0",
           "serve.api_key=secret", "serve.max_replicas=2", "serve.max_batch_size=2", "eval.concurrency=4",
           "train.gradient_checkpointing=true", "sft.gradient_checkpointing=true"]
    assert _ran(tmp_path, *how) == []
    assert _ran(tmp_path, *how, "serve.max_model_len=128") == ["eval", "report"]
    assert _ran(tmp_path, *how, "serve.max_model_len=128", "negatives.weakening.pool.num_gpus=1",
               "negatives.weakening.pool.accelerator_type=L4") == [s.name for s in STAGES][2:]


def test_the_inputs_of_the_stages_about_to_run_are_looked_for_before_any_runs(tmp_path):
    """Each missing path is named with its key and the stages that would open it, before the first stage
    runs (in the demo, a mistyped pairs file was found after 10 minutes of sft, as a Ray Data traceback).
    Hub ids are not looked up; a finished stage's inputs are not needed to resume."""
    from bpo_ray.pipeline import STAGES, MissingInputs, run_stages

    records, pairs, model = tmp_path / "data" / "records.json", tmp_path / "pairs.parquet", tmp_path / "base"
    overrides = ["data.format=llava_json", f"data.path={records}", f"negatives.extra_pairs.path={pairs}",
                 f"model.name_or_path={model}", "eval.coco_annotations=/coco/instances_val2014.json",
                 "eval.coco_image_root=/coco/val2014"]
    calls: list[str] = []
    cfg = load_config(None, [f"storage_path={tmp_path / 'runs'}", *overrides])
    stages = [dataclasses.replace(s, run=lambda c, r, k, name=s.name: calls.append(name) or {}) for s in STAGES]
    pipeline = Pipeline(cfg, RunDir.for_config(cfg), stages)
    with pytest.raises(MissingInputs) as missing:
        run_stages(cfg, stages=stages)
    assert calls == []
    assert missing.value.missing == {
        "data.path": (str(records), ["data"], "does not exist"),
        "model.name_or_path": (str(model), ["negatives", "reference", "train", "eval"], "does not exist"),
        "negatives.extra_pairs.path": (str(pairs), ["negatives"], "does not exist"),
        "eval.coco_annotations": ("/coco/instances_val2014.json", ["eval"], "does not exist"),
        "eval.coco_image_root": ("/coco/val2014", ["eval"], "does not exist")}
    assert f"  negatives.extra_pairs.path: {pairs} (does not exist; read by negatives)" in str(missing.value)

    records.parent.mkdir()
    for path in (records, pairs):
        path.write_text("[]")
    model.mkdir()
    with pytest.raises(MissingInputs) as missing:  # the last stage's inputs stop the first one too
        pipeline.check_inputs()
    assert calls == [] and list(missing.value.missing) == ["eval.coco_annotations", "eval.coco_image_root"]
    on_shapes = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"coco_annotations": None,
                                                                           "coco_image_root": None})})
    run_stages(on_shapes, stages=stages)
    assert calls == [s.name for s in STAGES]
    records.unlink()  # gone once the stage that read it finished: resuming, or training again, needs it not
    calls.clear()
    retrained = on_shapes.model_copy(update={"train": on_shapes.train.model_copy(update={"lr": 1e-3})})
    run_stages(retrained, stages=stages)
    assert calls == ["train", "eval", "report"]

    hub = load_config(None, [f"storage_path={tmp_path / 'hub'}", "model.name_or_path=llava-hf/llava-1.5-7b-hf",
                             "negatives.extra_pairs.path=openbmb/RLAIF-V-Dataset", "sft.enabled=false"])
    assert Pipeline(hub, RunDir.for_config(hub), stages).pending()  # it would run, and names nothing to look for
    Pipeline(hub, RunDir.for_config(hub), stages).check_inputs()
