"""Existing preference data in three layouts → pairs rows, bad rows → error rows with their reason."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from bpo_ray.data.preferences import EXTERNAL, PairReason, preference_rows
from bpo_ray.data.records import ImageLimits, Reason


def _png(color=(200, 30, 30), size=(16, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _only(rows: list[dict]) -> dict:
    assert len(rows) == 1
    return rows[0]


def _error(rows: list[dict]) -> str:
    row = _only(rows)
    assert row["kind"] == "error" and row["negative_type"] == EXTERNAL and row["detail"], row
    return row["reason"]


def test_trl_plain_and_conversational(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    plain = {"images": ["a.png"], "prompt": "<image>What is in the image?", "chosen": "A red square.",
             "rejected": "A blue circle."}
    pair = _only(preference_rows(plain, image_root=str(tmp_path), source="trl.jsonl", layout="auto"))
    assert pair["kind"] == "pair" and pair["negative_type"] == EXTERNAL and pair["generator"] == "trl.jsonl"
    assert json.loads(pair["messages"]) == [{"role": "user", "content": "What is in the image?"}]
    assert (pair["chosen"], pair["rejected"], pair["image"]) == ("A red square.", "A blue circle.", _png())
    assert json.loads(pair["edits"]) == {"layout": "trl"}

    conversational = {
        "id": "c1", "images": [{"bytes": _png(), "path": None}],
        "prompt": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A red square."}]}],
        "rejected": [{"role": "assistant", "content": "A green square."}]}
    pair = _only(preference_rows(conversational))
    assert pair["sample_id"] == "c1#0" and pair["prompt"] == "Describe it."
    assert json.loads(pair["messages"]) == [{"role": "user", "content": "Describe it."}]
    assert (pair["chosen"], pair["rejected"]) == ("A red square.", "A green square.")


def test_rlaif_v_layout():
    row = {"idx": 7, "image": {"bytes": _png(), "path": "x.jpg"}, "question": "Is there a cat?",
           "chosen": "No, there is no cat.", "rejected": "Yes, a cat sits on the left.", "ds_name": "x"}
    pair = _only(preference_rows(row))
    assert pair["sample_id"] == "7#0" and pair["prompt"] == "Is there a cat?"
    assert json.loads(pair["edits"]) == {"layout": "rlaif_v"}


def test_completions_pair_the_best_against_each_lower_score():
    row = {"image": _png(), "prompt": "Describe the image.", "source_index": 3,
           "completions": [{"response": "OK answer.", "score": 3, "model": "m1"},
                           {"response": "Best answer.", "score": 5},
                           {"response": "Bad answer.", "score": 1.5},
                           {"response": "Also best-scored.", "score": 5},   # a tie with the best: no pair
                           {"response": "OK answer.", "score": 2}]}          # a repeat: one pair
    pairs = preference_rows(row)
    assert [p["sample_id"] for p in pairs] == ["row-3#0", "row-3#1"]
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {("Best answer.", "OK answer."),
                                                             ("Best answer.", "Bad answer.")}
    assert json.loads(pairs[0]["edits"]) == {"layout": "completions"}


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "Q?", "chosen": "A.", "rejected": "", "image": _png()}, PairReason.EMPTY_RESPONSE),
    ({"prompt": "Q?", "chosen": "Same  answer.", "rejected": "same answer.", "image": _png()},
     PairReason.IDENTICAL_RESPONSES),
    ({"prompt": "Q?", "chosen": "A.", "rejected": "B.", "image": b"not an image"}, Reason.UNDECODABLE_IMAGE),
    ({"prompt": "Q?", "chosen": "A.", "rejected": "B.", "images": [_png(), _png()]}, Reason.MISSING_IMAGE),
    ({"prompt": "Q?", "chosen": "A.", "rejected": "B."}, Reason.MISSING_IMAGE),
    ({"prompt": "Q?", "chosen": "A <image> here.", "rejected": "B.", "image": _png()}, Reason.MALFORMED_CONVERSATION),
    ({"prompt": "<image><image>Q?", "chosen": "A.", "rejected": "B.", "image": _png()}, Reason.MALFORMED_CONVERSATION),
    ({"prompt": [{"role": "assistant", "content": "Hi"}], "chosen": "A.", "rejected": "B.", "image": _png()},
     Reason.MALFORMED_CONVERSATION),
    ({"prompt": 42, "chosen": "A.", "rejected": "B.", "image": _png()}, Reason.MALFORMED_CONVERSATION),
    ({"prompt": "Q?", "image": _png(), "completions": [{"response": "A.", "score": 1}, {"response": "B.", "score": 1}]},
     PairReason.NO_PREFERENCE),
    ({"prompt": "Q?", "image": _png(), "completions": [{"response": "A.", "score": "high"}]}, Reason.MALFORMED_RECORD),
    ({"prompt": "Q?", "image": _png(), "completions": "A."}, Reason.MALFORMED_RECORD),
    ({"text": "Q?", "answer": "A."}, PairReason.UNKNOWN_LAYOUT),
    ({"malformed": "line 3 is not JSON"}, Reason.MALFORMED_RECORD),
    ("a string", Reason.MALFORMED_RECORD),
])
def test_bad_rows_become_errors_with_their_reason(row, reason):
    assert _error(preference_rows(row)) == reason


def test_image_limits_apply():
    row = {"prompt": "Q?", "chosen": "A.", "rejected": "B.", "image": _png(size=(64, 64))}
    assert _error(preference_rows(row, limits=ImageLimits(max_pixels=32 * 32))) == Reason.IMAGE_TOO_LARGE
    assert _only(preference_rows(row))["kind"] == "pair"


def test_ids_are_stable_without_an_id_or_position():
    row = {"prompt": "Q?", "chosen": "A.", "rejected": "B.", "image": _png()}
    first, again = _only(preference_rows(row)), _only(preference_rows(dict(row)))
    other = _only(preference_rows({**row, "chosen": "C."}))
    assert first["sample_id"] == again["sample_id"] != other["sample_id"]
    assert first["sample_id"].startswith("trl-")


def test_json_carried_rows_are_unpacked():
    carried = {"__json": json.dumps({"question": "Q?", "chosen": "A.", "rejected": "B.", "image": "missing.png"}),
               "source_index": 4, "malformed": ""}
    assert _error(preference_rows(carried)) == Reason.MISSING_IMAGE
    assert _only(preference_rows(carried))["record_id"] == "row-4"
    assert _error(preference_rows({"__json": "", "malformed": "not JSON: x", "source_index": 5})) == Reason.MALFORMED_RECORD
