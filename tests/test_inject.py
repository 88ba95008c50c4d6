"""Error injection: rules always change the answer, deterministically; LLM prompts follow the two modes."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from bpo_ray.data.synthetic import generate as shapes
from bpo_ray.negatives import inject, vocabulary
from bpo_ray.negatives.pairs import Drop, degenerate, normalize, stable_seed

FREE_TEXT = [
    "A man rides a brown horse next to a white fence on the left.",
    "Two dogs play with a frisbee in the park.",
    "The image shows a table with a cup and a plate.",
    "It is sunny.",
    "",
    "42",
]


def _answers():
    for sample in shapes(40, seed=5, qa_per_image=4):
        for record in sample.records:
            yield from (t["value"] for t in record["conversations"] if t["from"] == "gpt")
    yield from FREE_TEXT


def test_rules_always_change_the_answer():
    for i, answer in enumerate(_answers()):
        for words in (vocabulary.SHAPES, vocabulary.GENERAL):
            rejected, edits = inject.rules_inject(answer, seed=i, vocabulary=words)
            assert normalize(rejected) != normalize(answer), (answer, rejected)
            assert edits


def test_rules_are_seeded():
    answer = "There are two shapes. A large red circle is at the top left. A small blue square is at the right."
    assert inject.rules_inject(answer, 3) == inject.rules_inject(answer, 3)
    assert len({inject.rules_inject(answer, s)[0] for s in range(20)}) > 5


@pytest.mark.parametrize("answer, expected", [
    ("No, there is no red circle.", "Yes, there is a red circle."),
    ("No, there is no orange triangle.", "Yes, there is an orange triangle."),
    ("Yes, there is a blue square.", "No, there is no blue square."),
    ("Yes, it is red.", "No, it is not red."),
    ("No, it is not red.", "Yes, it is red."),
])
def test_yes_no_answers_flip_polarity(answer, expected):
    rejected, edits = inject.rules_inject(answer, 0)
    assert rejected == expected
    assert edits == [f"polarity:{answer.split(',')[0].lower()}->{expected.split(',')[0].lower()}"]


def test_companion_addition_follows_the_prior():
    shapes = vocabulary.SHAPES
    text, label = inject.add_companion("A large red circle is at the top.", random.Random(0), shapes)
    assert label.startswith("add:") and text.startswith("A large red circle is at the top. There is also a small")
    companions = {inject.add_companion("A large red circle is at the top.", random.Random(s), shapes)[1]
                  for s in range(30)}
    assert "add:blue square" in companions


def test_individual_edits():
    rng = random.Random(0)
    assert inject.swap_color("the red car", rng)[0] != "the red car"
    assert inject.change_count("There are three cats.", rng)[1].startswith("count:three->")
    assert inject.mirror_position("at the left", rng) == ("at the right", "position:left->right")
    assert inject.swap_object("A cat.", rng, vocabulary.SHAPES)[1] in ("object:cat->dog", "object:cat->sofa")
    assert inject.drop_sentence("One. Two.", rng) is None


def test_llm_prompt_modes():
    long_answer = " ".join(["word"] * 40)
    description = inject.injection_messages("Describe the image.", long_answer, "auto")[0]["content"]
    assert "similar but different image" in description and long_answer in description
    qa = inject.injection_messages("What color is the car?", "Red.", "auto")[0]["content"]
    assert qa.count("Question:") == len(inject.QA_FEW_SHOT) + 1 and qa.endswith("Rewritten:")
    assert inject.injection_mode("description", "Red.") == "description"
    assert inject.clean_llm_rewrite('Rewritten answer: "The car is blue."') == "The car is blue."


def test_degenerate_negatives():
    assert degenerate("A red car.", "", 10)[0] == Drop.EMPTY_NEGATIVE
    assert degenerate("A red car.", "a  RED car", 10)[0] == Drop.SAME_AS_CHOSEN
    assert degenerate("A red car.", "word " * 11, 10)[0] == Drop.REJECTED_TOO_LONG
    assert degenerate("A red car.", "A blue car.", 10) is None
    # An LLM rewrite that writes a placeholder would be tokenised as an image token with no image behind it.
    for placeholder in ("<image>", "<|image_pad|>"):
        assert degenerate("A red car.", f"A blue {placeholder} car.", 10)[0] == Drop.IMAGE_PLACEHOLDER


def test_stable_seed():
    assert stable_seed(0, "image_weakening", "x#0") == stable_seed(0, "image_weakening", "x#0")
    assert stable_seed(0, "image_weakening", "x#0") != stable_seed(1, "image_weakening", "x#0")
    assert 0 <= stable_seed("a") < 2**63
    json.dumps(stable_seed("a"))


# ------------------------------------------------------------------------------ the general vocabulary
LLAVA_STYLE = json.loads((Path(__file__).parent / "data" / "llava_style_answers.json").read_text())


def test_general_vocabulary_edits_llava_style_answers():
    """Every answer changes, and the edits are the plausible kinds: objects, relations, colours, counts and
    added objects, each from the vocabulary."""
    general = vocabulary.GENERAL
    mix: Counter = Counter()
    for i, answer in enumerate(LLAVA_STYLE):
        rejected, edits = inject.rules_inject(answer, seed=i)
        assert normalize(rejected) != normalize(answer), (answer, rejected)
        for edit in edits:
            kind, change = edit.split(":", 1)
            mix[kind] += 1
            if kind == "object":
                old, new = change.split("->")
                assert new in general.swaps[old]
            elif kind == "position":
                old, new = change.split("->")
                assert general.relations[old] == new
            elif kind == "add":
                assert rejected.endswith(tuple(f"{change} {place}." for place in general.places))
    assert {"object", "position", "color", "count", "add", "polarity"} <= set(mix)
    assert mix["object"] >= 10 and mix["position"] >= 10, mix


@pytest.mark.parametrize("text, plural", [("An elephant stands in the field.", False),
                                          ("Two elephants stand in the field.", True)])
def test_object_swaps_keep_number_and_article(text, plural):
    general = vocabulary.GENERAL
    forms = [(entry[i], entry[i + 1]) for entries in vocabulary.COCO.values() for entry in entries
             for i in range(0, len(entry), 2)]
    number = {one for one, _ in forms} if not plural else {many for _, many in forms}
    seen = set()
    for s in range(20):
        swapped, label = inject.swap_object(text, random.Random(s))
        new = label.split("->")[1]
        seen.add(new)
        assert new in number and new in general.swaps["elephants" if plural else "elephant"]
        if not plural:  # "An elephant" → "A giraffe", "A bird" → "An ..." never "A elephant"
            article = "An" if new[0] in "aeiou" else "A"
            assert swapped == f"{article} {new} stands in the field."
    assert len(seen) > 3


def test_vocabulary_for_the_data():
    assert vocabulary.for_data("auto", "synthetic") is vocabulary.SHAPES
    assert vocabulary.for_data("auto", "llava_json") is vocabulary.GENERAL
    assert vocabulary.for_data("shapes", "llava_json") is vocabulary.SHAPES


def test_vocabulary_from_a_coco_file(tmp_path):
    """A dataset's own categories: swaps within the supercategory, companions by how often they share an image."""
    coco = {"categories": [{"id": 1, "name": "dog", "supercategory": "animal"},
                           {"id": 2, "name": "cat", "supercategory": "animal"},
                           {"id": 3, "name": "frisbee", "supercategory": "sports"},
                           {"id": 4, "name": "bus", "supercategory": "vehicle"}],
            "images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(3)],
            "annotations": [{"image_id": 0, "category_id": 1}, {"image_id": 0, "category_id": 3},
                            {"image_id": 1, "category_id": 1}, {"image_id": 1, "category_id": 3},
                            {"image_id": 2, "category_id": 1}, {"image_id": 2, "category_id": 4}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    words = vocabulary.load(str(path))
    assert words.swaps["dog"] == ("cat",) and words.swaps["dogs"] == ("cats",) and "buses" not in words.swaps
    assert words.companions["dog"] == ("frisbee", "bus")  # twice together, then once
    text, label = inject.add_companion("A dog runs.", random.Random(0), words)
    assert label in ("add:frisbee", "add:bus") and text.startswith("A dog runs. There is also a ")


def test_vocabulary_from_our_layout_and_bad_files(tmp_path):
    path = tmp_path / "words.json"
    path.write_text(json.dumps({"objects": {"widget": {"swaps": ["gadget"], "companions": ["box"]}},
                                "colors": ["teal", "cyan"]}))
    words = vocabulary.load(str(path))
    assert inject.swap_object("Two widgets.", random.Random(0), words) == ("Two gadgets.", "object:widgets->gadgets")
    assert inject.swap_color("A teal widget.", random.Random(0), words)[0] == "A cyan widget."
    assert words.relations == vocabulary.GENERAL.relations  # what the file leaves out: general's
    path.write_text(json.dumps({"nouns": {}}))
    with pytest.raises(ValueError, match="unknown keys"):
        vocabulary.load(str(path))
    with pytest.raises(ValueError, match="not auto, general, shapes or a readable JSON file"):
        vocabulary.load(str(tmp_path / "missing.json"))


@pytest.mark.parametrize("noun, expected", [("bus", "buses"), ("person", "people"), ("hot dog", "hot dogs"),
                                            ("toothbrush", "toothbrushes"), ("pony", "ponies"), ("key", "keys")])
def test_plural(noun, expected):
    assert vocabulary.plural(noun) == expected
