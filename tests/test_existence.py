"""Balanced existence pairs: the question builder and the batch function (pure), and the config's edge."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from bpo_ray.config import load_config
from bpo_ray.eval.probes import LabeledImage, synthetic_images
from bpo_ray.negatives.batches import (
    OUT_COLUMNS,
    drop_for_balance,
    existence_batch,
    existence_prompts,
    judge_policy_answers,
    policy_judgements,
    yes_no_sides,
)
from bpo_ray.negatives.existence import (
    EXISTENCE,
    PRESENT,
    balancing_drops,
    by_representative,
    existence_questions,
    plan,
    questions_for,
    steering_share,
    yes_no_side,
)

VOCAB = [f"{c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square", "star")]


def _images():
    # "red circle" and "blue square" go together in most images: adversarial sampling must pick one for an
    # image that has the other.
    objects = [("red circle", "blue square"), ("red circle", "blue square"), ("red circle", "blue square"),
               ("red circle",), ("green star", "red circle"), ("green circle",)]
    return [LabeledImage(f"i{k}", f"/data/img/{k}.png", tuple(sorted(o))) for k, o in enumerate(objects)]


def test_every_image_asks_as_many_absent_objects_as_present_ones():
    images = _images()
    questions = existence_questions(images, VOCAB, ["random", "popular", "adversarial"], seed=0)
    by_image = {img.image_id: [q for q in questions if q.image_id == img.image_id] for img in images}
    for img in images:
        asked = by_image[img.image_id]
        assert sorted(q.name for q in asked if q.present) == sorted(img.objects)
        absent = [q.name for q in asked if not q.present]
        assert len(absent) == len(img.objects) and len(set(absent)) == len(absent)
        assert not set(absent) & set(img.objects)
        assert {q.strategy for q in asked if q.present} == {PRESENT}
    # The chosen answer is the truth; the rejected one its opposite.
    for q in questions:
        assert q.chosen.startswith("Yes") == q.present and q.rejected.startswith("No") == q.present
        assert q.question == f"Is there a {q.name} in the image?"
    assert existence_questions(images, VOCAB, ["random", "popular", "adversarial"], seed=0) == questions
    assert existence_questions(images, VOCAB, ["random", "popular", "adversarial"], seed=1) != questions


def test_absent_objects_come_from_the_training_statistics_by_strategy():
    images = _images()
    adversarial = existence_questions(images, VOCAB, ["adversarial"], seed=0)
    only_red = [q for q in adversarial if q.image_id == "i3" and not q.present]
    assert [q.name for q in only_red] == ["blue square"]  # its usual companion in these images
    popular = existence_questions(images, VOCAB, ["popular"], seed=0)
    lone_green = [q.name for q in popular if q.image_id == "i5" and not q.present]
    assert lone_green == ["red circle"]  # absent from i5, present in the most images
    # Mixed: the strategies take turns across the absent questions (each image starts at a seeded one).
    mixed = existence_questions(images, VOCAB, ["random", "popular", "adversarial"], seed=0)
    drawn = Counter(q.strategy for q in mixed if not q.present)
    assert set(drawn) == {"random", "popular", "adversarial"}


def test_a_small_vocabulary_limits_the_no_questions_and_bad_strategies_are_refused():
    image = LabeledImage("x", "x.png", ("a", "b", "c"))
    questions = existence_questions([image], ["a", "b", "c", "d"], ["random"], seed=0)
    assert [(q.name, q.present) for q in questions] == [("a", True), ("b", True), ("c", True), ("d", False)]
    with pytest.raises(ValueError, match="strategies"):
        existence_questions([image], ["a"], ["sideways"], seed=0)


def test_the_batch_makes_each_images_pairs_once_from_its_representative():
    images = _images()
    questions = existence_questions(images, VOCAB, ["random", "popular", "adversarial"], seed=0)
    keyed = plan(images, questions, "/data")
    # Samples name images as records do: under the image root, or another folder with the same file name.
    rows = [("s1", "img/0.png"), ("s0", "img/0.png"), ("s2", "elsewhere/3.png"), ("s3", "img/unannotated.png")]
    assert questions_for("img/unannotated.png", keyed) is None
    by_sample, annotated, unannotated = by_representative(rows, keyed)
    assert set(by_sample) == {"s0", "s2"} and (annotated, unannotated) == (2, 1)  # s1: i0 is lent by s0
    batch = {"sample_id": np.array([r[0] for r in rows], dtype=object),
             "record_id": np.array(["r"] * 4, dtype=object), "image": np.array([b"png"] * 4, dtype=object),
             "image_ref": np.array([r[1] for r in rows], dtype=object),
             "messages": np.array(["[]"] * 4, dtype=object), "prompt": np.array(["p"] * 4, dtype=object),
             "answer": np.array(["a"] * 4, dtype=object)}
    out = existence_batch(batch, by_sample)
    assert set(out) == set(OUT_COLUMNS)
    made = [{k: out[k][i] for k in out} for i in range(len(out["sample_id"]))]
    assert len(made) == 4 + 2  # i0: 2 present + 2 absent; i3: 1 + 1; s1 is not i0's representative
    assert len({m["sample_id"] for m in made}) == len(made)
    for m in made:
        asked = json.loads(m["edits"])
        assert m["kind"] == "pair" and m["negative_type"] == EXISTENCE and m["generator"] == "annotations"
        assert json.loads(m["messages"]) == [{"role": "user", "content": m["prompt"]}]
        assert m["prompt"] == f"Is there a {asked['asked']} in the image?"
        assert m["chosen"].startswith("Yes" if asked["present"] else "No")
        assert m["rejected"].startswith("No" if asked["present"] else "Yes")
    yes = sum(json.loads(m["edits"])["present"] for m in made)
    assert yes == len(made) - yes


def test_the_bundled_shapes_truth_is_read_as_annotations(shapes_dir):
    images = synthetic_images(shapes_dir)
    keyed = plan(images, existence_questions(images, VOCAB, ["random"], 0), str(shapes_dir))
    record = json.loads((shapes_dir / "records.json").read_text())[0]
    assert questions_for(record["image"], keyed) is not None


def test_existence_needs_annotations_beyond_the_bundled_shapes_and_keeps_old_stage_keys():
    with pytest.raises(ValueError, match="negatives.existence needs object annotations"):
        load_config(None, ["data.format=llava_json", "data.path=x.json", "negatives.existence.enabled=true"])
    load_config(None, ["data.format=llava_json", "data.path=x.json", "negatives.existence.enabled=true",
                       "negatives.existence.annotations=instances.json"])
    # Left at its default, the option is not part of the key: run directories made before it still resume.
    off, on = load_config(None, []), load_config(None, ["negatives.existence.enabled=true"])
    assert "existence" not in json.dumps(_keyed_negatives(off)) and off.section_hash("negatives") != on.section_hash("negatives")
    with pytest.raises(ValueError):
        load_config(None, ["negatives.existence.strategies=[]"])


def _keyed_negatives(cfg):
    from bpo_ray.config.keys import keyed_dump

    return keyed_dump(cfg.negatives)


@pytest.mark.parametrize("chosen, rejected, side", [
    ("Yes, there is a red circle.", "No, there is no red circle.", "yes"),
    ("No.", "yes, one on the left", "no"),
    ("No, there is no dog.", "No dog here.", None),             # both no: not a yes/no pair
    ("A red circle and a blue square.", "A red circle.", None),  # a caption
    ("There is no dog.", "Yes, a dog.", None),                  # the chosen answer does not open with yes/no
    ("", "", None),
])
def test_a_pair_argues_yes_or_no_only_when_its_answers_open_with_opposite_ones(chosen, rejected, side):
    assert yes_no_side(chosen, rejected) == side


def test_balancing_drops_the_surplus_from_the_existence_pairs_of_the_side_that_has_more():
    candidates = {"yes": [f"y{i}" for i in range(5)], "no": [f"n{i}" for i in range(8)]}
    side, drop = balancing_drops(yes=10, no=13, candidates=candidates, seed=0)
    assert side == "no" and len(drop) == 3 and set(drop) <= set(candidates["no"])
    assert balancing_drops(10, 13, candidates, seed=0) == (side, drop)  # the same draw every time
    assert len({tuple(balancing_drops(10, 13, candidates, seed=s)[1]) for s in range(5)}) > 1  # seeded
    side, drop = balancing_drops(yes=20, no=4, candidates=candidates, seed=0)
    assert side == "yes" and sorted(drop) == candidates["yes"]  # fewer than the surplus: all it has
    assert balancing_drops(7, 7, candidates, seed=0) == (None, [])


def test_balancing_to_a_share_drops_the_preferred_pairs_first():
    candidates = {"yes": [f"y{i}" for i in range(50)], "no": [f"n{i}" for i in range(50)]}
    # 60 yes : 40 no to a yes share of 0.4: 40 no allow round(0.4 * 40 / 0.6) = 27 yes, so 33 go.
    first = frozenset({"y7", "y3", "y41"})
    side, drop = balancing_drops(yes=60, no=40, candidates=candidates, seed=0, share=0.4, first=first)
    assert side == "yes" and len(drop) == 33 and set(drop[:3]) == first and not set(drop[3:]) & first
    assert (60 - len(drop)) / (60 - len(drop) + 40) == pytest.approx(0.4, abs=0.01)
    # 40 yes : 60 no to a yes share of 0.6: 40 yes allow round(0.4 * 40 / 0.6) = 27 no, so 33 go.
    side, drop = balancing_drops(yes=40, no=60, candidates=candidates, seed=0, share=0.6)
    assert side == "no" and len(drop) == 33
    # Already on the share (within rounding), or under it on the side that has existence pairs: nothing goes.
    assert balancing_drops(40, 60, candidates, seed=0, share=0.4) == (None, [])
    side, drop = balancing_drops(yes=30, no=70, candidates=candidates, seed=0, share=0.4)
    assert side == "no" and len(drop) == 70 - 45  # 30 yes allow round(0.6 * 30 / 0.4) = 45 no
    # One half is mix's balance: the same draw as without a share.
    assert balancing_drops(10, 13, candidates, seed=0, share=0.5) == balancing_drops(10, 13, candidates, seed=0)
    for share in (0.0, 1.0, -0.2):
        with pytest.raises(ValueError, match="between 0 and 1"):
            balancing_drops(10, 13, candidates, seed=0, share=share)


def test_the_steering_share_leans_against_the_policys_yes_bias_by_its_gain_within_its_limit():
    assert steering_share(questions=100, present=50, said_yes=60, gain=1) == pytest.approx(0.4)  # says yes too often
    assert steering_share(questions=100, present=50, said_yes=60, gain=0.3) == pytest.approx(0.47)
    assert steering_share(questions=100, present=50, said_yes=45, gain=1) == pytest.approx(0.55)  # says no too often
    assert steering_share(questions=100, present=50, said_yes=50, gain=1) == 0.5  # unbiased: mix's balance
    assert steering_share(questions=200, present=90, said_yes=100, gain=0.5) == pytest.approx(0.475)  # truth 0.45
    assert steering_share(questions=100, present=50, said_yes=95, gain=1) == pytest.approx(0.4)  # at most 0.1 off
    assert steering_share(questions=100, present=50, said_yes=0, gain=1, limit=0.2) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="no existence questions"):
        steering_share(questions=0, present=0, said_yes=0, gain=1)


def test_dropped_existence_pairs_become_errors_with_their_reason_and_nothing_else_changes():
    rows = [{c: "" for c in OUT_COLUMNS} | {"sample_id": sid, "negative_type": kind, "kind": "pair",
                                              "chosen": "No, there is no red star.", "rejected": "Yes, there is."}
            for sid, kind in (("a~existence:red star", EXISTENCE), ("b", "image_weakening"),
                              ("c~existence:red star", EXISTENCE))]
    batch = {c: np.array([r[c] for r in rows], dtype=object) for c in OUT_COLUMNS}
    assert list(yes_no_sides(batch)["side"]) == ["no", "no", "no"]
    out = drop_for_balance(batch, frozenset({"a~existence:red star", "b"}), "no")
    assert list(out["kind"]) == ["error", "pair", "pair"]  # "b" is not an existence pair: never dropped
    assert out["reason"][0] == "balance" and "more no-chosen" in out["detail"][0]
    for c in OUT_COLUMNS:
        if c not in ("kind", "reason", "detail"):
            assert list(out[c]) == list(batch[c]), c



def test_the_policy_is_asked_each_question_on_the_clean_image_and_only_its_wrong_answers_stay_pairs():
    images = _images()
    questions = existence_questions(images, VOCAB, ["adversarial"], seed=0)
    rows = [("s0", "img/0.png")]
    by_sample, _, _ = by_representative(rows, plan(images, questions, "/data"))
    sample = {"sample_id": "s0", "record_id": "r", "image": b"", "image_file": "images/ab/cd.png",
              "image_ref": "img/0.png", "messages": "[]", "prompt": "p", "answer": "a"}
    made = existence_batch({k: np.array([v], dtype=object) for k, v in sample.items()}, by_sample)
    made["image"] = np.array([b"clean png"] * len(made["sample_id"]), dtype=object)  # as with_images attaches
    asked = existence_prompts(made, seed=3)
    assert list(asked["gen_messages"]) == list(made["messages"]) and set(asked["gen_image"]) == {b"clean png"}
    assert len(set(asked["seed"])) == len(made["sample_id"])  # seeded per question
    present = [json.loads(e)["present"] for e in made["edits"]]
    assert present == [True, True, False, False]  # 0.png has 2 objects: 2 present, 2 absent
    # Right, wrong, unclear (neither yes nor no: kept, as POPE counts it a yes), and a failed generation.
    answers = ["Yes, there is one.", "No.", "A red circle.", ""]
    errors = ["", "", "", "RuntimeError: out of memory"]
    generated = {"carry": asked["carry"], "seed": asked["seed"], "generated_text": np.array(answers, dtype=object),
                 "finish_reason": np.array(["stop"] * 4, dtype=object),
                 "generation_error": np.array(errors, dtype=object)}
    out = judge_policy_answers(generated)
    assert set(out) == set(OUT_COLUMNS)
    assert list(out["kind"]) == ["error", "pair", "pair", "error"]
    assert list(out["reason"]) == ["answered_right", "", "", "generation_failed"]
    assert "'Yes, there is one.'" in out["detail"][0] and out["detail"][3] == errors[3]
    assert [json.loads(e)["policy_answer"] for e in out["edits"]] == answers
    assert set(out["image"]) == {b""} and set(out["image_file"]) == {"images/ab/cd.png"}  # the reference again
    for c in OUT_COLUMNS:
        if c not in ("kind", "reason", "detail", "edits", "image"):
            assert list(out[c]) == list(made[c]), c
    # An absent object: "no" is right, "yes" is wrong.
    flipped = judge_policy_answers({"carry": asked["carry"][2:3], "seed": asked["seed"][2:3],
                                    "generated_text": np.array(["No, there is not."], dtype=object),
                                    "finish_reason": np.array(["stop"], dtype=object),
                                    "generation_error": np.array([""], dtype=object)})
    assert list(flipped["reason"]) == ["answered_right"]

    # balance: steer keeps every answered question a pair (the failed generation still an error); the
    # judgements say, per pair, whether the object is there, whether the policy said yes and was right.
    kept = judge_policy_answers(generated, keep_right=True)
    assert list(kept["kind"]) == ["pair", "pair", "pair", "error"] and kept["reason"][3] == "generation_failed"
    assert [json.loads(e)["policy_answer"] for e in kept["edits"]] == answers
    judged = policy_judgements(kept)
    assert list(judged["sample_id"]) == list(made["sample_id"][:3])
    assert list(judged["present"]) == [True, True, False]
    assert list(judged["said_yes"]) == [True, False, True]  # "A red circle.": neither word, a yes as POPE reads it
    assert list(judged["right"]) == [True, False, False]
    assert set(policy_judgements(made)["sample_id"]) == set()  # pairs the policy was not asked about
    dropped = drop_for_balance(kept, frozenset(kept["sample_id"][:1]), "yes", balance="steer")
    assert dropped["reason"][0] == "balance"
    assert "more yes-chosen ones than the steered share allows (negatives.existence.balance: steer)" in dropped["detail"][0]
