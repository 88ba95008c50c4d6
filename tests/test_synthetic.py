from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from bpo_ray.data import synthetic
from bpo_ray.data.records import validate_record
from conftest import run_cli


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = synthetic.write_dataset(tmp_path / "a", num_images=6, seed=7)
    b = synthetic.write_dataset(tmp_path / "b", num_images=6, seed=7)
    c = synthetic.write_dataset(tmp_path / "c", num_images=6, seed=8)
    assert _tree(a) == _tree(b)
    assert _tree(a)["records.json"] != _tree(c)["records.json"]


def test_layout_and_llava_format(shapes_dir):
    records = json.loads((shapes_dir / "records.json").read_text())
    truths = [json.loads(line) for line in (shapes_dir / "truth.jsonl").read_text().splitlines()]
    assert len(truths) == 12
    assert {r["image"] for r in records} == {t["image"] for t in truths}
    kinds = {r["id"].rsplit("-", 1)[1] for r in records}
    assert kinds == {"desc", "qa"}  # detailed descriptions and short QA
    for record in records:
        assert set(record) == {"id", "image", "conversations"}
        assert record["conversations"][0]["value"].startswith("<image>\n")
        assert (shapes_dir / record["image"]).is_file()
        samples, error = validate_record(record, str(shapes_dir))
        assert error is None and samples


def test_pixels_match_the_truth(shapes_dir):
    for line in (shapes_dir / "truth.jsonl").read_text().splitlines():
        truth = json.loads(line)
        image = np.asarray(Image.open(shapes_dir / truth["image"]).convert("RGB")).astype(int)
        for obj in truth["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            centre = image[(y0 + y1) // 2 + (1 if obj["shape"] == "triangle" else 0), (x0 + x1) // 2]
            expected = np.array(synthetic.COLORS[obj["color"]])
            if obj["faint"]:
                expected = (0.45 * expected + 0.55 * np.array(synthetic.BACKGROUND)).astype(int)
            assert np.abs(centre - expected).max() <= 2, (truth["image_id"], obj)


def test_text_follows_from_truth():
    rng = np.random.default_rng(0)
    for _ in range(50):
        objects = synthetic.sample_objects(rng, 64, 3, 0.8)
        text = synthetic.describe(objects)
        assert synthetic.NUMBER_WORDS[len(objects)] in text
        for obj in objects:
            assert f"{obj.size} {obj.color} {obj.shape} is at the {obj.position}" in text
        for question, answer in synthetic.qa_pairs(objects, rng, 4):
            if question.startswith("Is there a "):
                name = question.removeprefix("Is there a ").removesuffix(" in the image?")
                assert answer.startswith("Yes") == (name in {o.name for o in objects})


def test_captions_list_objects_in_reading_order():
    rng = np.random.default_rng(2)
    for _ in range(50):
        objects = synthetic.sample_objects(rng, 64, 3, 0.8)
        text = synthetic.describe(objects)
        found = [text.index(f"is at the {o.position}.") for o in sorted(objects, key=lambda o: o.cell)]
        assert found == sorted(found)


def test_anchor_rate_makes_the_prior_common():
    def anchored(rate):
        rng = np.random.default_rng(3)
        images = [synthetic.sample_objects(rng, 64, 2, 0.8, anchor_rate=rate) for _ in range(400)]
        return sum(any((o.color, o.shape) in synthetic.COMPANIONS and not o.faint for o in objs) for objs in images) / 400

    assert anchored(0.0) < 0.25 and anchored(0.5) > 0.5
    # 0 draws nothing extra: the same objects as the generator before anchor_rate existed (pinned from it)
    rng = np.random.default_rng(4)
    first, second = (synthetic.sample_objects(rng, 64, 3, 0.8) for _ in range(2))
    assert [(o.color, o.shape, o.cell) for o in first] == [("yellow", "triangle", 0), ("blue", "circle", 1),
                                                           ("green", "square", 2)]
    assert [(o.color, o.shape, o.cell) for o in second] == [("red", "square", 3), ("blue", "square", 1)]


@pytest.mark.parametrize("cooccurrence", [0.0, 1.0])
def test_cooccurrence_prior(cooccurrence):
    rng = np.random.default_rng(1)
    anchors = companions = 0
    for _ in range(300):
        objects = synthetic.sample_objects(rng, 64, 3, cooccurrence)
        names = {(o.color, o.shape): o for o in objects}
        for anchor, companion in synthetic.COMPANIONS.items():
            if anchor in names and not names[anchor].faint:
                anchors += 1
                if companion in names and names[companion].faint:
                    companions += 1
                    assert names[companion].size == "small"
    assert anchors > 20
    if cooccurrence == 0.0:
        assert companions == 0
    else:  # only an anchor whose companion is already drawn in full colour goes without a faint one
        assert companions >= 0.8 * anchors


def test_caption_prior_annotates_absent_companions_and_leaves_the_truth(tmp_path):
    clean = list(synthetic.generate(300, seed=2, max_objects=2, anchor_rate=0.5))
    noisy = list(synthetic.generate(300, seed=2, max_objects=2, anchor_rate=0.5, caption_prior=1.0))
    phantoms = 0
    for a, b in zip(clean, noisy, strict=True):
        # the same images and truth: only the annotations change
        assert a.objects == b.objects and a.image.tobytes() == b.image.tobytes()
        drawn = {(o.color, o.shape) for o in b.objects}
        caption = b.records[0]["conversations"][1]["value"]
        for anchor, (color, shape) in synthetic.COMPANIONS.items():
            if anchor in drawn and (color, shape) not in drawn:
                assert f"small {color} {shape}" in caption
                phantoms += 1
        if caption != a.records[0]["conversations"][1]["value"]:
            assert any(k in drawn and v not in drawn for k, v in synthetic.COMPANIONS.items())
    assert phantoms > 10
    # the annotator draws from its own stream: a prior that annotates nothing changes no byte of the data
    never = synthetic.write_dataset(tmp_path / "never", num_images=30, seed=7, anchor_rate=0.5, caption_prior=1e-12)
    off = synthetic.write_dataset(tmp_path / "off", num_images=30, seed=7, anchor_rate=0.5)
    assert _tree(never) == _tree(off)


def test_make_data_cli(tmp_path):
    result = run_cli("make-data", "--out", str(tmp_path / "d"), "--num-images", "3", "--seed", "5")
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "d" / "images").glob("*.png"))) == 3


def test_companion_questions_ask_about_anchor_and_missing_companion_and_change_nothing_else(tmp_path):
    plain = list(synthetic.generate(300, seed=3, max_objects=2, anchor_rate=0.5, cooccurrence=0.5))
    asked = list(synthetic.generate(300, seed=3, max_objects=2, anchor_rate=0.5, cooccurrence=0.5,
                                    companion_questions=1.0))
    yes = no = 0
    for a, b in zip(plain, asked, strict=True):
        assert a.objects == b.objects and a.image.tobytes() == b.image.tobytes()
        assert b.records[: len(a.records)] == a.records  # caption and questions as they were
        extra = b.records[len(a.records):]
        assert all(len(r["conversations"]) == 2 and r["image"] == a.records[0]["image"] for r in extra)
        asked_here = [(r["conversations"][0]["value"], r["conversations"][1]["value"]) for r in extra]
        expected = []
        for anchor, companion in synthetic.missing_companions(a.objects):
            assert anchor in {o.name for o in a.objects} and companion not in {o.name for o in a.objects}
            expected += [(f"<image>\nIs there a {anchor} in the image?", f"Yes, there is a {anchor}."),
                         (f"<image>\nIs there a {companion} in the image?", f"No, there is no {companion}.")]
        assert asked_here == expected  # one question a conversation, asked first, as POPE asks
        assert len({r["id"] for r in b.records}) == len(b.records)
        yes += sum(r.startswith("Yes") for _, r in asked_here)
        no += sum(r.startswith("No") for _, r in asked_here)
    assert yes == no > 30
    # with a prior-following annotator, the companion it annotated is not then denied
    noisy = synthetic.generate(300, seed=3, max_objects=2, anchor_rate=0.5, cooccurrence=0.5, caption_prior=1.0,
                               companion_questions=1.0)
    for sample in noisy:
        caption = sample.records[0]["conversations"][1]["value"]
        answers = " ".join(t["value"] for r in sample.records[1:] for t in r["conversations"][1::2])
        for color, shape in synthetic.COMPANIONS.values():
            if f"small {color} {shape}" in caption:
                assert f"no {color} {shape}" not in answers
    # off by default, and a rate that asks nothing changes no byte of the data
    never = synthetic.write_dataset(tmp_path / "never", num_images=30, seed=7, anchor_rate=0.5,
                                    companion_questions=1e-12)
    off = synthetic.write_dataset(tmp_path / "off", num_images=30, seed=7, anchor_rate=0.5)
    assert _tree(never) == _tree(off)


def test_the_dataset_cache_is_keyed_by_the_settings_and_the_generator_version(tmp_path, monkeypatch):
    from bpo_ray.config import SyntheticDataConfig
    from bpo_ray.data.dataset import synthetic_dir

    cfg = SyntheticDataConfig(num_images=2)
    first = synthetic_dir(cfg, str(tmp_path))
    assert (first / "records.json").is_file() and synthetic_dir(cfg, str(tmp_path)) == first
    assert synthetic_dir(cfg.model_copy(update={"companion_questions": 0.5}), str(tmp_path)) != first
    # a generator that changed what it writes must not be served a dataset its old version wrote
    monkeypatch.setattr(synthetic, "VERSION", synthetic.VERSION + 1)
    assert synthetic_dir(cfg, str(tmp_path)) != first
