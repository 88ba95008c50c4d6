"""Error injection: rules always change the answer, deterministically; LLM prompts follow the two modes."""

from __future__ import annotations

import json
import random

import pytest

from bpo_ray.data.synthetic import generate as shapes
from bpo_ray.negatives import inject
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
        rejected, edits = inject.rules_inject(answer, seed=i)
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
    text, label = inject.add_companion("A large red circle is at the top.", random.Random(0))
    assert label.startswith("add:") and text.startswith("A large red circle is at the top. There is also a small")
    companions = {inject.add_companion("A large red circle is at the top.", random.Random(s))[1] for s in range(30)}
    assert "add:blue square" in companions


def test_individual_edits():
    rng = random.Random(0)
    assert inject.swap_color("the red car", rng)[0] != "the red car"
    assert inject.change_count("There are three cats.", rng)[1].startswith("count:three->")
    assert inject.mirror_position("at the left", rng) == ("at the right", "position:left->right")
    assert inject.swap_object("A cat.", rng)[1] in ("object:cat->dog", "object:cat->sofa")
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
