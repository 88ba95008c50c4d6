"""Evaluation math against hand-made predictions whose answers are known, and the probe sets."""

from __future__ import annotations

import json
import math

import pytest

from bpo_ray.config import load_config
from bpo_ray.data.synthetic import COLORS, COMPANIONS, SHAPES
from bpo_ray.eval.compare import comparison, format_table, headline
from bpo_ray.eval.metrics import (
    chair_caption,
    chair_metrics,
    companion_hallucination,
    extract_mentions,
    parse_yes_no,
    pope_metrics,
)
from bpo_ray.eval.probes import LabeledImage, build_probes, coco_images, synthetic_images
from bpo_ray.pipeline.report import render_markdown
from conftest import REPO


@pytest.mark.parametrize(("answer", "yes", "understood"), [
    ("Yes, there is a red circle.", True, True),
    ("No, there is no red circle.", False, True),
    ("There is not a square.", False, True),
    ("yes", True, True),
    ("NO.", False, True),
    ("a blue square", True, False),  # POPE's rule: no negation → yes; flagged as unclear
    ("", True, False),
])
def test_yes_no_is_read_the_way_pope_reads_it(answer, yes, understood):
    assert parse_yes_no(answer) == (yes, understood)


def test_pope_metrics_on_hand_counted_answers():
    labels = [True, True, True, True, False, False, False, False, False, False]
    said = [True, True, True, False, True, True, False, False, False, False]
    m = pope_metrics(said, labels)  # tp 3, fn 1, fp 2, tn 4
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 2, 4)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["precision"] == pytest.approx(3 / 5) and m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert m["yes_ratio"] == pytest.approx(0.5) and m["truth_yes_rate"] == pytest.approx(0.4)
    assert m["accuracy_ci95"] == pytest.approx(1.96 * math.sqrt(0.7 * 0.3 / 10))
    always_no = pope_metrics([False] * 4, [True, False, True, False])
    assert always_no["f1"] == 0.0 and always_no["precision"] == 0.0 and always_no["accuracy"] == 0.5
    with pytest.raises(ValueError):
        pope_metrics([True], [True, False])


def test_mentions_and_chair_on_hand_made_captions():
    assert extract_mentions("Two red circles and a square; the shapes are small. A purple triangle.",
                            COLORS, SHAPES) == [("red", "circle"), (None, "square"), ("purple", "triangle")]
    truth = [("red", "circle"), ("blue", "square")]
    clean = chair_caption("A large red circle is at the top. A small blue square is at the left.", truth, COLORS, SHAPES)
    assert (clean["mentions"], clean["hallucinated"], clean["objects_named"]) == (2, 0, 2)
    wrong = chair_caption("A red circle, a green square and a yellow triangle.", truth, COLORS, SHAPES)
    # green square: the shape is there in another colour (attribute error); yellow triangle: absent object
    assert (wrong["mentions"], wrong["hallucinated"], wrong["attribute_errors"]) == (3, 2, 1)
    assert wrong["hallucinated_objects"] == ["green square", "yellow triangle"]
    bare = chair_caption("A triangle.", truth, COLORS, SHAPES)
    assert bare["hallucinated"] == 1
    m = chair_metrics([clean, wrong, bare], exact=[True, False, False])
    assert m["chair_i"] == pytest.approx(3 / 6) and m["chair_s"] == pytest.approx(2 / 3)
    assert m["attribute_error_rate"] == pytest.approx(1 / 6)
    # Shape only: the green square is no hallucination there (a square is in the image); the triangles are.
    assert (clean["hallucinated_shapes"], wrong["hallucinated_shapes"], bare["hallucinated_shapes"]) == (0, 1, 1)
    assert m["chair_s_shape"] == pytest.approx(2 / 3) and m["chair_i_shape"] == pytest.approx(2 / 6)
    recoloured = chair_caption("A green circle.", truth, COLORS, SHAPES)  # only the colour is wrong
    both = chair_metrics([clean, recoloured])
    assert both["chair_s"] == pytest.approx(1 / 2) and both["chair_s_shape"] == 0.0
    assert m["object_recall"] == pytest.approx(3 / 6) and m["exact_caption"] == pytest.approx(1 / 3)


def test_companion_hallucination_counts_only_images_where_the_prior_can_mislead():
    anchor, companion = next(iter(COMPANIONS.items()))
    a, c = " ".join(anchor), " ".join(companion)
    captions = [f"A {a} and a {c}.", f"A {a}.", f"A {a} and a {c}.", "A purple square."]
    objects = [[anchor], [anchor], [anchor, companion], [("purple", "square")]]
    m = companion_hallucination(captions, objects, COMPANIONS, COLORS, SHAPES)
    assert (m["exposed"], m["named"], m["rate"]) == (2, 1, 0.5)


def _images():
    # "red circle" usually comes with "blue square"; "green triangle" is common everywhere.
    rows = [("a", ["red circle", "blue square", "green triangle"]), ("b", ["red circle", "blue square"]),
            ("c", ["red circle"]), ("d", ["green triangle", "yellow circle"]), ("e", ["green triangle"])]
    return [LabeledImage(i, f"{i}.png", tuple(sorted(objs))) for i, objs in rows]


def test_probe_splits_sample_absent_objects_by_their_strategy():
    vocabulary = [f"{c} {s}" for c in COLORS for s in SHAPES]
    images = _images()
    for split in ("random", "popular", "adversarial"):
        probes = build_probes(images, vocabulary, split, seed=0)
        for img in images:
            mine = [p for p in probes if p.image_id == img.image_id]
            yes = [p.name for p in mine if p.label]
            no = [p.name for p in mine if not p.label]
            assert sorted(yes) == sorted(img.objects) and len(no) == len(yes)
            assert not set(no) & set(img.objects)
        assert build_probes(images, vocabulary, split, seed=0) == probes  # seeded
    c = [p.name for p in build_probes(images, vocabulary, "adversarial", 0) if p.image_id == "c" and not p.label]
    assert c == ["blue square"]  # what co-occurs with a red circle
    e = [p.name for p in build_probes(images, vocabulary, "popular", 0) if p.image_id == "e" and not p.label]
    assert e == ["red circle"]  # the most frequent object it lacks
    with pytest.raises(ValueError):
        build_probes(images, vocabulary, "hard", 0)


def test_probe_sources_synthetic_and_coco(shapes_dir, tmp_path):
    images = synthetic_images(shapes_dir)
    assert len(images) == 12 and all(img.objects for img in images)
    coco = {"images": [{"id": 1, "file_name": "x.jpg"}, {"id": 2, "file_name": "y.jpg"}, {"id": 3, "file_name": "z.jpg"}],
            "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}, {"id": 3, "name": "car"}],
            "annotations": [{"image_id": 1, "category_id": 1}, {"image_id": 1, "category_id": 2},
                            {"image_id": 2, "category_id": 3}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    picked, vocabulary = coco_images(path, tmp_path, num_images=10, seed=0)
    assert vocabulary == ["car", "cat", "dog"]
    assert [(i.image_id, i.objects) for i in picked] == [("1", ("cat", "dog")), ("2", ("car",))]
    (tmp_path / "broken.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match="not a COCO instances file"):
        coco_images(tmp_path / "broken.json", tmp_path, 10, 0)


def test_report_table_marks_which_model_is_better():
    base = {"chair": {"chair_s": 0.5, "chair_i": 0.2, "exact_caption": 0.4},
            "pope": {"adversarial": {"f1": 0.6, "accuracy": 0.6, "precision": 0.5, "recall": 0.8, "yes_ratio": 0.7}}}
    aligned = {"chair": {"chair_s": 0.25, "chair_i": 0.2, "exact_caption": 0.3},
               "pope": {"adversarial": {"f1": 0.7, "accuracy": 0.7, "precision": 0.7, "recall": 0.7, "yes_ratio": 0.5}}}
    rows = {r["metric"]: r for r in comparison({"base": base, "aligned": aligned})}
    assert rows["CHAIR_s (captions with a hallucination)"]["better"] is True
    assert rows["CHAIR_i (hallucinated mentions)"]["better"] is None  # unchanged
    assert rows["exact captions"]["better"] is False
    assert rows["pope adversarial f1"]["delta"] == pytest.approx(0.1) and rows["pope adversarial f1"]["better"]
    assert rows["pope adversarial yes_ratio"]["better"] is None
    assert "| pope adversarial f1 | 0.600 | 0.700 | +0.100 ✓ |" in format_table(list(rows.values()))
    assert not math.isnan(rows["exact captions"]["delta"])


def test_the_printed_table_shows_pope_accuracy_and_yes_ratio_beside_f1():
    """The job's closing table: captions, F1 per split, and the adversarial split's accuracy and yes-ratio, since
    F1 alone rises with a yes-bias; precision and recall stay in report.md."""
    scores = {"chair": {"chair_s": 0.5, "exact_caption": 0.4},
              "pope": {split: {"f1": 0.6, "accuracy": 0.6, "precision": 0.5, "recall": 0.8, "yes_ratio": 0.7}
                       for split in ("random", "popular", "adversarial")}}
    shown = [r["metric"] for r in headline(comparison({"base": scores, "aligned": scores}))]
    assert shown == ["CHAIR_s (captions with a hallucination)", "exact captions", "pope random f1", "pope popular f1",
                     "pope adversarial f1", "pope adversarial accuracy", "pope adversarial yes_ratio"]


def test_report_of_a_run_that_scored_only_the_aligned_model(tmp_path):
    """A sweep scores the base once (jobs/effect.py): its other runs report the aligned model's numbers
    instead of claiming that no evaluation ran."""
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"storage_path={tmp_path}", "eval.base=false"])
    aligned = {"images": 100, "chair": {"chair_s": 0.25, "exact_caption": 0.3},
               "pope": {"adversarial": {"f1": 0.7, "accuracy": 0.7, "precision": 0.7, "recall": 0.7, "yes_ratio": 0.5}}}
    report = {"run_dir": str(tmp_path), "stages": {}, "training": {"first": None, "final": None},
              "eval": {"aligned": aligned}, "comparison": comparison({"aligned": aligned})}
    markdown = render_markdown(cfg, report, [])
    assert "Only the aligned model was evaluated" in markdown and "not run" not in markdown
    assert "| CHAIR_s (captions with a hallucination) | 0.250 |" in markdown and "| pope adversarial f1 | 0.700 |" in markdown
    report["eval"] = {}
    assert "Evaluation was not run" in render_markdown(cfg, report, [])


def test_heldout_images_take_the_eval_companion_rate(tmp_path):
    """eval.cooccurrence changes only the held-out set's companion rate; unset, it follows the data."""
    from bpo_ray.config import load_config
    from bpo_ray.eval.evaluate import heldout_dir

    def companions(overrides):
        cfg = load_config(None, [f"cache_dir={tmp_path}", "data.synthetic.anchor_rate=1.0", "eval.num_images=40",
                                 *overrides])
        truth = [json.loads(line) for line in (heldout_dir(cfg) / "truth.jsonl").read_text().splitlines()]
        assert len(truth) == 40
        return sum(o["faint"] for t in truth for o in t["objects"])

    assert companions(["eval.cooccurrence=0.0"]) == 0
    assert companions(["eval.cooccurrence=1.0"]) > companions([]) > 0  # the data's default rate is 0.8


def test_training_curves_smooth_and_count_a_restarted_step_once():
    from bpo_ray.eval.plots import moving_average, training_plot

    assert moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]  # trailing, shorter at the start
    assert moving_average([3.0], 5) == [3.0]
    steps = [{"step": s, "loss": 1 / s, "reward_margin": 0.1 * s, "reward_accuracy": 0.5} for s in range(1, 31)]
    restarted = steps[:12] + steps[9:]  # steps 10-12 trained again after a restart
    png = training_plot(restarted)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png == training_plot(steps)
    assert training_plot(steps[:3])[:4] == b"\x89PNG"  # too short to smooth: drawn as is


def test_the_report_says_how_large_a_pope_change_must_be_to_be_more_than_noise(tmp_path):
    cfg = load_config(None, [f"storage_path={tmp_path}"])
    labels = [True] * 50 + [False] * 50
    scores = {model: {"images": 20, "chair": {"chair_s": 0.2, "n": 20},
                      "pope": {"adversarial": pope_metrics([i % 3 != 0 for i in range(100)], labels)}}
              for model in ("base", "aligned")}
    report = {"run_dir": str(tmp_path), "stages": {}, "training": {"first": None, "final": None},
              "eval": scores, "comparison": comparison(scores)}
    m = scores["aligned"]["pope"]["adversarial"]
    assert f"adversarial ±{100 * m['accuracy_ci95']:.1f} points on 100 probes (truth yes-rate 0.50)" \
        in render_markdown(cfg, report, [])
