from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from bpo_ray.config import PAPER_BPO, ConfigError, RunConfig, apply_override, literal_override, load_config
from conftest import REPO, run_cli

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_code_defaults_run_the_papers_bpo_on_tiny_models():
    cfg = load_config()
    assert cfg.model.name_or_path == "tiny://llava"
    assert cfg.data.format == "synthetic"
    assert cfg.train.beta == 0.1 and cfg.train.loss == "sigmoid" and cfg.train.zero_stage == 3
    assert cfg.negatives.weakening.distortions[0].step == 900
    assert cfg.negatives.weakening.sampling.temperature == 0.2
    assert cfg.negatives.injection.sampling.temperature == 0.8
    assert cfg.serve.host == "127.0.0.1"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path):
    cfg = load_config(path)
    assert cfg.run_name


def test_realistic_configs_describe_gpu_runs():
    llava = load_config(REPO / "configs" / "llava-1.5-7b.yaml")
    assert llava.model.name_or_path == "llava-hf/llava-1.5-7b-hf"
    assert llava.resources.use_gpu and llava.negatives.weakening.engine == "vllm"
    qwen = load_config(REPO / "configs" / "qwen2.5-vl-7b.yaml")
    assert qwen.model.name_or_path.startswith("Qwen/Qwen2.5-VL")


def test_overrides_are_typed_and_dotted():
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      ["train.lr=1e-5", "storage_path=runs/exp1", "train.lora.r=4", "eval.pope_splits=[random]",
                       "data.max_records=null"])
    assert cfg.train.lr == pytest.approx(1e-5)
    assert cfg.storage_path == "runs/exp1" and cfg.run_dir == "runs/exp1/bpo-tiny"
    assert cfg.train.lora.r == 4 and cfg.eval.pope_splits == ["random"]


@pytest.mark.parametrize("override, named, suggested", [
    ("train.lrr=1e-5", "train.lrr", "train.lr"),
    ("negatives.weakening.engin=hf", "negatives.weakening.engin", "negatives.weakening.engine"),
    ("storage_pth=/tmp/x", "storage_pth", "storage_path"),
    ("trian.lr=1", "trian", "train"),
])
def test_unknown_key_is_named_with_closest_valid_one(override, named, suggested):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert f"unknown key '{named}'" in str(err.value)
    assert f"did you mean '{suggested}'" in str(err.value)


def test_typo_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"bta": 0.2}}))
    with pytest.raises(ConfigError, match=r"train\.bta.*train\.beta"):
        load_config(path)


@pytest.mark.parametrize("overrides, message", [
    (["negatives.weakening.enabled=false", "negatives.injection.enabled=false"], "no rejected answers"),
    (["negatives.weakening.engine=vllm"], "negatives.weakening.engine 'vllm' needs GPUs"),
    (["train.reference=adapter_disabled", "train.lora.enabled=false"], "train.lora.enabled"),
    (["train.precision=bf16"], "train.precision 'bf16' needs GPUs"),
    (["train.offload_params=true", "train.zero_stage=2"], "zero_stage=3"),
    (["train.loss=robust"], "label_smoothing > 0"),
    (["train.image_weight=1", "negatives.weakening.enabled=false", "negatives.weakening.distortions=[]"],
     "train.image_weight needs distortions"),
    (["train.image_weight=1", "train.image_distortions=[]"], "train.image_weight needs distortions"),
    (["serve.host=0.0.0.0"], "serve.api_key"),
    (["data.format=parquet"], "data.path is required"),
    (["model.name_or_path=tiny://llm"], "must be a vision model"),
    (["negatives.weakening.pool.min_size=3", "negatives.weakening.pool.max_size=1"], "min_size (3) > max_size (1)"),
    (["train.zero_stage=1"], "train.zero_stage"),
    (["negatives.weakening.distortions=[{kind: diffusion, step: 1000}]"], "step"),
    (["eval.seed=0"], "the evaluation images would be the training images"),
    (["eval.coco_annotations=/x/instances.json"], "eval.coco_image_root"),
    (["negatives.injection.vocabulary=/x/words.json"], "negatives.injection.vocabulary: '/x/words.json' is not"),
    (["serve.engine=vllm", "serve.num_gpus_per_replica=1", "serve.api_key=k"], "not enforced by the vllm engine"),
    (["serve.min_replicas=3", "serve.max_replicas=2"], "min_replicas (3) > max_replicas (2)"),
    (["cache_dir=s3://bucket/cache"], "cache_dir 's3://bucket/cache' must be a local path"),
    (["serve.local_image_root=gs://bucket/images"], "serve.local_image_root 'gs://bucket/images' must be a local"),
    (["tracking.wandb.dir=s3://bucket/wandb"], "tracking.wandb.dir 's3://bucket/wandb' must be a local path"),
    (["cache_dir=file:///tmp/cache"], "cache_dir 'file:///tmp/cache' must be a local path"),
])
def test_impossible_combinations_fail_with_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_gpu_config_allows_gpu_only_options():
    cfg = load_config(None, ["resources.use_gpu=true", "negatives.weakening.engine=vllm", "train.precision=bf16"])
    assert cfg.negatives.weakening.engine == "vllm"


@pytest.mark.parametrize("item", ["train.lr", "=3", "train.lr.x=1"])
def test_malformed_overrides(item):
    raw = {"train": {"lr": 1.0}}
    with pytest.raises(ConfigError):
        apply_override(raw, item)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_the_papers_bpo_is_one_switch_from_the_embedded_default():
    """The embedded default grounds yes/no answers too (steered existence pairs, two rounds); switched off, the
    existence section's other settings are read by nothing, so the paper's BPO keys every stage as a config
    without that section does (a run directory made under the earlier default resumes)."""
    tiny = REPO / "configs" / "tiny.yaml"
    grounded = load_config(tiny)
    assert grounded.rounds == 2 and grounded.negatives.existence.enabled
    assert grounded.negatives.existence.balance == "steer"
    paper = load_config(tiny, PAPER_BPO)
    raw = yaml.safe_load(tiny.read_text())
    del raw["rounds"], raw["negatives"]["existence"]
    without = RunConfig.model_validate(raw)
    assert paper.negatives.existence.balance == "steer"  # kept, as set, and inert
    for reads in (("model", "negatives"), ("model", "train"), ("data",), ("model", "sft")):
        assert paper.section_hash(*reads) == without.section_hash(*reads), reads
    assert grounded.section_hash("model", "negatives") != paper.section_hash("model", "negatives")
    for balance in ("mix", "errors", "steer"):  # any balance, with the section off, changes nothing
        off = load_config(None, [f"negatives.existence.balance={balance}"])
        assert off.section_hash("negatives") == load_config(None, []).section_hash("negatives")
        on = load_config(None, ["negatives.existence.enabled=true", f"negatives.existence.balance={balance}"])
        assert on.section_hash("negatives") != load_config(None, ["negatives.existence.enabled=true"]).section_hash(
            "negatives")


def test_section_hash_tracks_only_its_sections():
    a, b = RunConfig(), load_config(None, ["train.lr=1e-3"])
    assert a.section_hash("data") == b.section_hash("data")
    assert a.section_hash("train") != b.section_hash("train")


def test_a_stage_may_read_single_fields_of_a_section():
    base = RunConfig()
    assert base.section_hash("train.loss") == load_config(None, ["train.lr=1e-3"]).section_hash("train.loss")
    assert base.section_hash("train.loss") != load_config(None, ["train.loss=ipo"]).section_hash("train.loss")
    # A field keyed only once set adds nothing while unset, as in a whole section.
    assert base.section_hash("model", "train.image_weight") == base.section_hash("model")
    assert load_config(None, ["train.image_weight=1"]).section_hash("model", "train.image_weight") != \
        base.section_hash("model")
    with pytest.raises(ValueError, match="train.lrr"):
        base.section_hash("train.lrr")


def test_how_a_stage_runs_is_not_part_of_its_key():
    """The attention kernel changes how a model computes, not what: setting it keeps finished stages."""
    base = RunConfig()
    flash = load_config(None, ["model.attn_implementation=flash_attention_2"])
    assert flash.model.attn_implementation == "flash_attention_2"
    assert flash.section_hash("model", "train") == base.section_hash("model", "train")
    assert load_config(None, ["model.dtype=bfloat16"]).section_hash("model") != base.section_hash("model")
    # Fields keyed until 2026-12 (pools, checkpoint cadence, activation checkpointing, serving): out of the
    # key, in the earlier one, at any depth and through a single field as through its section.
    moved = load_config(None, ["serve.port=9001", "train.reference_pool.max_size=4", "train.checkpoint_every=9",
                               "train.gradient_checkpointing=false", "sft.gradient_checkpointing=true"])
    for reads in (("serve",), ("model", "train"), ("train.reference_pool",), ("train.gradient_checkpointing",),
                  ("sft",)):
        assert moved.section_hash(*reads) == base.section_hash(*reads), reads
        assert moved.section_hash(*reads, earlier=True) != base.section_hash(*reads, earlier=True), reads
    assert base.section_hash("data", earlier=True) == base.section_hash("data")  # nothing moved out of data


def test_section_hash_changes_with_the_tiny_builder(monkeypatch):
    """Stages built on a tiny model are not reused once its builder changes; a real checkpoint's are."""
    import bpo_ray.models

    tiny, real = RunConfig(), load_config(None, ["model.name_or_path=/ckpt/llava"])
    before = tiny.section_hash("model"), real.section_hash("model"), tiny.section_hash("data")
    monkeypatch.setattr(bpo_ray.models, "TINY_VERSION", bpo_ray.models.TINY_VERSION + 1)
    assert tiny.section_hash("model") != before[0]
    assert (real.section_hash("model"), tiny.section_hash("data")) == before[1:]


def test_resolved_config_round_trips():
    cfg = load_config(REPO / "configs" / "llava-1.5-7b.yaml")
    assert RunConfig.model_validate(yaml.safe_load(cfg.to_yaml())) == cfg


def test_cli_rejects_typo_before_ray_starts(tmp_path):
    started = time.time()
    result = run_cli("jobs/bpo.py", "--config", "configs/tiny.yaml", "train.lrr=1", f"storage_path={tmp_path}")
    assert result.returncode == 2
    assert "unknown key 'train.lrr' (did you mean 'train.lr'?)" in result.stderr
    assert "Started a local Ray instance" not in result.stderr + result.stdout
    assert not (tmp_path / "bpo-tiny").exists()  # nothing written for a config that cannot run
    assert time.time() - started < 60


def test_cli_names_a_missing_input_before_ray_starts(tmp_path):
    """A mistyped path is refused at once with its key and the stages that would open it: ``bpo train --pairs``
    on the embedded default, whose sft stage would otherwise run first, and ``bpo generate --data``."""
    pairs, records = tmp_path / "prefs.jsonl", tmp_path / "records.jsonl"
    trained = run_cli("train", "--pairs", str(pairs), f"storage_path={tmp_path / 'runs'}")
    assert trained.returncode == 2, trained.stderr[-2000:]
    assert f"negatives.extra_pairs.path: {pairs} (does not exist; read by negatives)" in trained.stderr
    assert not (tmp_path / "runs").exists()  # no stage ran, nothing was written
    generated = run_cli("generate", "--data", str(records), "--out", str(tmp_path / "pairs"))
    assert generated.returncode == 2, generated.stderr[-2000:]
    assert f"data.path: {records} (does not exist; read by data)" in generated.stderr
    assert not (tmp_path / "pairs").exists()


def test_a_leading_tilde_is_the_home_directory_in_every_path(tmp_path, monkeypatch):
    """As in a shell, for every path the config takes (file, overrides) and the config file itself: nothing
    downstream expands it (pyarrow, Ray, transformers), so ``storage_path: ~/runs`` made a folder named ``~``
    in the working directory. Hub ids, URIs and relative paths are left as they are."""
    monkeypatch.setenv("HOME", str(tmp_path))
    home = {
        "storage_path": "~/runs", "cache_dir": "~/cache", "model": {"name_or_path": "~/models/llava"},
        "data": {"format": "llava_json", "path": "~/data/records.json", "image_root": "~/data/images"},
        "sft": {"data": {"format": "parquet", "path": "~/sft"}},
        "negatives": {"injection": {"engine": "hf", "model": "~/models/llm", "vocabulary": "~/words.json"},
                      "existence": {"enabled": True, "annotations": "~/coco/train.json"},
                      "extra_pairs": {"path": "~/pairs.jsonl", "image_root": "~/pair-images"}},
        "serve": {"local_image_root": "~/served"},
        "eval": {"coco_annotations": "~/coco/val.json", "coco_image_root": "~/coco/val"},
        "tracking": {"mlflow": {"tracking_uri": "~/mlruns"}, "wandb": {"dir": "~/wandb"}},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(home))
    cfg = load_config("~/run.yaml", ["sft.data.image_root=~/sft-images"])
    assert "~" not in cfg.to_yaml()
    neg = cfg.negatives
    assert [cfg.storage_path, cfg.cache_dir, cfg.run_dir, cfg.model.name_or_path, cfg.data.path, cfg.data.image_root,
            cfg.sft.data.path, cfg.sft.data.image_root, neg.injection.model, neg.injection.vocabulary,
            neg.existence.annotations, neg.extra_pairs.path, neg.extra_pairs.image_root, cfg.serve.local_image_root,
            cfg.eval.coco_annotations, cfg.eval.coco_image_root, cfg.tracking.mlflow.tracking_uri,
            cfg.tracking.wandb.dir] == [
        f"{tmp_path}/{p}" for p in ("runs", "cache", "runs/bpo-tiny", "models/llava", "data/records.json",
                                    "data/images", "sft", "sft-images", "models/llm", "words.json", "coco/train.json",
                                    "pairs.jsonl", "pair-images", "served", "coco/val.json", "coco/val", "mlruns",
                                    "wandb")]
    others = load_config(None, ["storage_path=s3://bucket/runs", "model.name_or_path=llava-hf/llava-1.5-7b-hf",
                                "cache_dir=.cache/x", "data.format=llava_json", "data.path=data/records.json"])
    assert (others.storage_path, others.model.name_or_path, others.cache_dir, others.data.path) == (
        "s3://bucket/runs", "llava-hf/llava-1.5-7b-hf", ".cache/x", "data/records.json")


def test_command_line_paths_reach_the_config_as_given(tmp_path, monkeypatch):
    """The path flags: local paths absolute (``--out=~/x``, which a shell leaves as it is, in the home
    directory), URIs as given (``bpo generate`` made s3://b/x a folder under the working directory), and any
    name read back exactly (overrides are YAML: " #" began a comment, ": " a mapping, 2024 was a number)."""
    from bpo_ray.cli import build_parser, generate_overrides, pairs_overrides

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["generate", "--data=~/records.json", "--image-root=images", "--out=~/runs/gen"])
    cfg = load_config(None, generate_overrides(args.data, args.image_root, args.out))
    assert (cfg.data.format, cfg.data.path, cfg.data.image_root, cfg.storage_path, cfg.run_name) == (
        "llava_json", f"{tmp_path}/records.json", f"{tmp_path}/images", f"{tmp_path}/runs", "gen")
    on_s3 = load_config(None, generate_overrides("s3://bucket/data/records.parquet", "s3://bucket/data",
                                                 "s3://bucket/runs/gen/"))
    assert (on_s3.data.format, on_s3.data.path, on_s3.data.image_root, on_s3.storage_path, on_s3.run_name) == (
        "parquet", "s3://bucket/data/records.parquet", "s3://bucket/data", "s3://bucket/runs", "gen")
    odd = "my data: 1 #2/2024"
    assert load_config(None, generate_overrides(odd, None, None)).data.path == f"{tmp_path}/{odd}"
    for name in (odd, "2024", "null", "openbmb/RLAIF-V-Dataset"):
        assert load_config(None, pairs_overrides(name)).negatives.extra_pairs.path == name
        assert load_config(None, [literal_override("model.name_or_path", name)]).model.name_or_path == name
    for flags, attr in ((["train", "--pairs=~/p.jsonl"], "pairs"), (["serve", "--model=~/m"], "model"),
                        (["make-data", "--out=~/d"], "out"), (["eval", "--endpoint=x", "--model=~m", "--data=~/d"], "data")):
        assert getattr(build_parser().parse_args(flags), attr) == f"{tmp_path}/{flags[-1].split('/')[-1]}"
    assert build_parser().parse_args(["eval", "--endpoint=x", "--model=~m"]).model == "~m"  # a served name, not a path


def test_commands_on_their_own_data_leave_out_what_needs_the_shapes_or_bootstrapping():
    """On the embedded default (existence pairs, two rounds): ``bpo generate --data`` reads records with no
    object truth, so existence pairs are off unless the overrides after the flags bring annotations;
    ``bpo train --pairs`` bootstraps nothing, so one round (a second would train on the same pairs again)."""
    from bpo_ray.cli import generate_overrides, pairs_overrides

    tiny = REPO / "configs" / "tiny.yaml"
    own = generate_overrides("/x/records.json", None, None)
    assert not load_config(tiny, own).negatives.existence.enabled
    again = load_config(tiny, [*own, "negatives.existence.enabled=true", "negatives.existence.annotations=/x/i.json"])
    assert again.negatives.existence.enabled and again.negatives.existence.annotations == "/x/i.json"
    assert load_config(tiny, generate_overrides(None, None, "/x/out")).negatives.existence.enabled  # the shapes
    alone = load_config(tiny, pairs_overrides("/x/pairs.jsonl"))
    assert alone.rounds == 1 and not alone.negatives.existence.enabled
    assert load_config(tiny, [*pairs_overrides("/x/pairs.jsonl"), "rounds=3"]).rounds == 3


def test_bpo_eval_takes_the_coco_flags_together(tmp_path):
    """``--coco-annotations`` without ``--coco-image-root`` is refused with both keys, before any request is
    made (the absent flag was written into the config as the string "None", the folder images were then
    looked for in)."""
    annotations = tmp_path / "val.json"
    annotations.write_text('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [], '
                           '"categories": [{"id": 1, "name": "dog"}]}')
    alone = run_cli("eval", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--coco-annotations", str(annotations))
    assert alone.returncode == 2, alone.stderr[-2000:]
    assert "eval.coco_annotations and eval.coco_image_root go together" in alone.stderr


def test_without_config_every_command_line_runs_the_embedded_default():
    """No --config is the demo (configs/tiny.yaml: an SFT base to align, rates for tiny models), not the code's
    defaults, which train an untrained tiny model at a 7B model's learning rate."""
    demo = load_config(REPO / "configs" / "tiny.yaml")
    assert demo.sft.enabled and demo != RunConfig()
    printed = run_cli("config")
    assert printed.returncode == 0, printed.stderr
    assert RunConfig.model_validate(yaml.safe_load(printed.stdout)) == demo
    from bpo_ray.pipeline import job  # the job's own parser: bpo run, sft, train and jobs/bpo.py

    assert load_config(job.parse_args([], job.STAGES).config) == demo


def test_bpo_config_prints_resolved_yaml():
    result = run_cli("config", "--config", "configs/tiny.yaml", "train.beta=0.2")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["train"]["beta"] == 0.2
    bad = run_cli("config", "train.reference=adapter_disabled", "train.lora.enabled=false")
    assert bad.returncode == 2 and "train.reference 'adapter_disabled'" in bad.stderr


def test_the_image_terms_worse_image_is_the_weakening_negatives_unless_it_names_its_own():
    from bpo_ray.train.batch import WeakImages

    assert WeakImages.for_config(load_config(None, [])) is None  # no term, nothing to rebuild
    same = WeakImages.for_config(load_config(None, ["train.image_weight=1"]))
    assert same.distortions == [{"kind": "diffusion", "step": 900, "strength": 0.5}] and same.seed == 0
    cropped = load_config(None, ["train.image_weight=1", "train.image_distortions=[{kind: crop, strength: 0.85}]"])
    assert WeakImages.for_config(cropped).distortions == [{"kind": "crop", "step": 900, "strength": 0.85}]
    # Unset, it is no part of the training key (old run directories resume); set, it is.
    plain = load_config(None, ["train.image_weight=1"])
    assert cropped.section_hash("train") != plain.section_hash("train")
    assert load_config(None, []).section_hash("train") == load_config(None, ["train.image_distortions=null"]).section_hash("train")
