"""Existing preference pairs through the cluster: every source format read by Ray, bad rows in the errors
table with their reason, and training on them alone and mixed with bootstrapped pairs."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from bpo_ray import storage
from bpo_ray.cli import pairs_overrides
from bpo_ray.config import PAPER_BPO, PairsConfig, bootstraps, load_config
from bpo_ray.data.dataset import pairs_format, read_pairs_raw
from bpo_ray.data.preferences import EXTERNAL, PairReason, preference_rows
from bpo_ray.data.records import Reason
from bpo_ray.negatives.pairs import ERROR_INJECTION
from bpo_ray.pipeline import RunDir, run_stages

REPO = Path(__file__).resolve().parents[1]


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same data in every format: 3 good rows of each layout (the completions row makes 2 pairs) and one
    bad row of each kind; JSONL adds an unparseable line and a line that is a list."""
    import datasets

    root = tmp_path_factory.mktemp("pairs")
    for i, color in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        (root / f"{i}.png").write_bytes(_png(color))
    trl = [{"images": [f"{i}.png"], "prompt": "<image>Describe the image.", "chosen": f"Shape {i}, as it is.",
            "rejected": f"A purple cat number {i}."} for i in range(3)]
    rlaif = [{"idx": f"r{i}", "image": f"{i}.png", "question": "What colour is the square?",
              "chosen": f"It is colour {i}.", "rejected": "It is gold."} for i in range(3)]
    completions = [{"image": "0.png", "prompt": "What is shown?",
                    "completions": [{"response": "A square.", "score": 9}, {"response": "A dog.", "score": 2},
                                    {"response": "Nothing.", "score": 1}]}]
    bad = [{"images": ["gone.png"], "prompt": "Q?", "chosen": "A.", "rejected": "B."},
           {"image": "1.png", "question": "Q?", "chosen": "Same.", "rejected": "same."},
           {"image": "2.png", "prompt": "Q?", "completions": [{"response": "A.", "score": 1}, {"response": "B.", "score": 1}]},
           {"picture": "0.png", "text": "Q?"}]
    rows = trl + rlaif + completions + bad
    (root / "pairs.json").write_text(json.dumps(rows))
    (root / "pairs.jsonl").write_text("\n".join([*map(json.dumps, rows), "{broken", "", "[1, 2]"]) + "\n")
    # Columnar sources hold one layout (one schema), images as bytes: RLAIF-V's own shape on the Hub.
    table = {"idx": [f"r{i}" for i in range(4)], "question": ["What colour is it?"] * 4,
             "chosen": ["Red.", "Green.", "Blue.", "Red."], "rejected": ["Gold.", "Gold.", "Gold.", ""],
             "image": [{"bytes": (root / f"{i % 3}.png").read_bytes(), "path": None} for i in range(4)]}
    features = datasets.Features({"idx": datasets.Value("string"), "question": datasets.Value("string"),
                                  "chosen": datasets.Value("string"), "rejected": datasets.Value("string"),
                                  "image": datasets.Image()})
    ds = datasets.Dataset.from_dict(table, features=features)
    ds.save_to_disk(str(root / "rlaif_disk"))
    (root / "rlaif_hub" / "data").mkdir(parents=True)
    ds.to_parquet(str(root / "rlaif_hub" / "data" / "train-00000-of-00001.parquet"))
    ds.to_parquet(str(root / "rlaif.parquet"))
    # TRL's own columnar shape: a list of images per row (one here), kept encoded through the cast.
    trl_features = datasets.Features({"images": datasets.Sequence(datasets.Image()), "prompt": datasets.Value("string"),
                                      "chosen": datasets.Value("string"), "rejected": datasets.Value("string")})
    datasets.Dataset.from_dict({"images": [[{"bytes": (root / f"{i}.png").read_bytes(), "path": None}] for i in range(3)],
                                "prompt": ["Describe it."] * 3, "chosen": ["A square.", "A circle.", "Same."],
                                "rejected": ["A dog.", "A cat.", "same."]},
                               features=trl_features).save_to_disk(str(root / "trl_disk"))
    return root


@pytest.mark.parametrize("name, fmt, pairs, rejected", [
    ("pairs.json", "json", 8, {Reason.MISSING_IMAGE: 1, PairReason.IDENTICAL_RESPONSES: 1,
                               PairReason.NO_PREFERENCE: 1, PairReason.UNKNOWN_LAYOUT: 1}),
    ("pairs.jsonl", "jsonl", 8, {Reason.MISSING_IMAGE: 1, PairReason.IDENTICAL_RESPONSES: 1,
                                 PairReason.NO_PREFERENCE: 1, PairReason.UNKNOWN_LAYOUT: 1,
                                 Reason.MALFORMED_RECORD: 2}),
    ("rlaif.parquet", "parquet", 3, {PairReason.EMPTY_RESPONSE: 1}),
    ("rlaif_disk", "hf_disk", 3, {PairReason.EMPTY_RESPONSE: 1}),
    ("rlaif_hub", "hub", 3, {PairReason.EMPTY_RESPONSE: 1}),
    ("trl_disk", "hf_disk", 2, {PairReason.IDENTICAL_RESPONSES: 1}),
])
def test_every_format_is_read_on_the_cluster(sources, ray_local, name, fmt, pairs, rejected):
    cfg = PairsConfig(path=str(sources / name), image_root=str(sources), format="hub" if fmt == "hub" else "auto")
    raw, found = read_pairs_raw(cfg)
    assert found == fmt == pairs_format(cfg)
    rows = raw.flat_map(preference_rows, fn_kwargs={"image_root": str(sources)}).take_all()
    made = [r for r in rows if r["kind"] == "pair"]
    assert len(made) == pairs and Counter(r["reason"] for r in rows if r["kind"] == "error") == rejected
    assert all(Image.open(io.BytesIO(r["image"])).size == (24, 24) for r in made)  # bytes, never decoded
    assert len({r["sample_id"] for r in made}) == pairs


def _cfg(root, tiny_models, *extra):
    return load_config(REPO / "configs" / "tiny.yaml", [
        f"storage_path={root}", f"cache_dir={root / 'cache'}", f"model.name_or_path={tiny_models['llava']}",
        "sft.enabled=false", "eval.enabled=false", "data.synthetic.num_images=4", "negatives.weakening.enabled=false",
        "train.num_workers=2", "train.per_device_batch_size=2", "train.max_steps=2", "train.checkpoint_every=2",
        *PAPER_BPO, *extra])  # the paper's BPO beside them: one round, no existence pairs


def test_training_on_existing_pairs_alone_and_mixed(sources, tmp_path, tiny_models, ray_local):
    path = str(sources / "pairs.jsonl")
    alone = _cfg(tmp_path / "alone", tiny_models, *pairs_overrides(path))  # images next to the file
    assert not bootstraps(alone) and alone.negatives.extra_pairs.path == path
    manifests = run_stages(alone, until="train")
    assert "nothing is bootstrapped" in manifests["data"]["skipped"]  # no sample was read for nothing
    assert not storage.exists(RunDir.for_config(alone).samples)
    external = manifests["negatives"]["by_type"]
    assert list(external) == [EXTERNAL]
    assert external[EXTERNAL] == {"pairs": 8, "errors": 6, "rows_in": 13, "rows_ok": 7,
                                  "by_layout": {"completions": 1, "rlaif_v": 3, "trl": 3},
                                  "generator": path, "format": "jsonl"}
    run = RunDir.for_config(alone)
    errors = pq.read_table(run.errors("negatives")).to_pylist()
    assert len(errors) == 6 and all(e["negative_type"] == EXTERNAL and e["reason"] and e["detail"] for e in errors)
    scored = pq.read_table(run.scored_pairs).to_pylist()
    assert len(scored) == 8 and all(r["negative_type"] == EXTERNAL for r in scored)
    assert manifests["train"]["final_metrics"]["step"] == 2

    mixed = _cfg(tmp_path / "mixed", tiny_models, f"negatives.extra_pairs.path={path}",
                 f"negatives.extra_pairs.image_root={sources}")
    manifests = run_stages(mixed, until="train")
    assert manifests["data"]["samples"] == manifests["negatives"]["samples_in"] > 0
    neg = manifests["negatives"]
    bootstrapped = neg["by_type"][ERROR_INJECTION]["pairs"]
    assert bootstrapped > 0 and neg["pairs"] == bootstrapped + 8
    scored = pq.read_table(RunDir.for_config(mixed).scored_pairs).to_pylist()
    assert Counter(r["negative_type"] for r in scored) == {ERROR_INJECTION: bootstrapped, EXTERNAL: 8}
    assert manifests["train"]["final_metrics"]["step"] == 2
