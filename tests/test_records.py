"""Every class of bad record gets its reason; good records become one sample per assistant turn."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from bpo_ray.data.records import ImageLimits, Reason, check_image, parse_conversation, validate_record


def png(size=(8, 8), color=(255, 0, 0), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 0).save(buf, format="PNG")
    return buf.getvalue()


def conv(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def noisy_png(size=64) -> bytes:
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


GOOD = {"id": "r1", "image": png(), "conversations": conv("<image>\nWhat is it?", "A red square.")}


def test_good_record_multi_turn_keeps_history():
    record = {**GOOD, "conversations": conv("<image>\nWhat is it?", "A red square.", "Where?", "In the middle.")}
    samples, error = validate_record(record)
    assert error is None and [s["sample_id"] for s in samples] == ["r1#0", "r1#1"]
    first, second = samples
    assert first["prompt"] == "What is it?" and first["answer"] == "A red square."
    assert json.loads(second["messages"]) == [
        {"role": "user", "content": "What is it?"},
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": "Where?"},
    ]
    assert (first["width"], first["height"]) == (8, 8) and first["image"] == GOOD["image"]


def test_image_tag_may_trail_the_question():
    samples, error = validate_record({**GOOD, "conversations": conv("What is it?\n<image>", "A square.")})
    assert error is None and samples[0]["prompt"] == "What is it?"


@pytest.mark.parametrize("record, reason", [
    ("not a dict", Reason.MALFORMED_RECORD),
    ({"image": png(), "conversations": conv("<image>\nq", "a")}, Reason.MALFORMED_RECORD),
    ({**GOOD, "conversations": None}, Reason.MALFORMED_CONVERSATION),
    ({**GOOD, "conversations": []}, Reason.MALFORMED_CONVERSATION),
    ({**GOOD, "conversations": "{not json"}, Reason.MALFORMED_CONVERSATION),
    ({**GOOD, "conversations": [{"from": "gpt", "value": "<image>\nhi"}, {"from": "human", "value": "x"}]},
     Reason.MALFORMED_CONVERSATION),
    ({**GOOD, "conversations": [{"from": "human", "value": "<image>\nq"}]}, Reason.MALFORMED_CONVERSATION),
    ({**GOOD, "conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]}, Reason.MALFORMED_CONVERSATION),
    ({**GOOD, "conversations": [{"from": "robot", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
     Reason.MALFORMED_CONVERSATION),
    ({**GOOD, "conversations": conv("<image>\nq", 42)}, Reason.MALFORMED_CONVERSATION),
    ({**GOOD, "conversations": conv("<image>\n<image>\nq", "a")}, Reason.MALFORMED_CONVERSATION),
    # Qwen-VL's placeholders are image tokens too, in an answer or beside the tag.
    ({**GOOD, "conversations": conv("<image>\nq", "see <|image_pad|>")}, Reason.MALFORMED_CONVERSATION),
    ({**GOOD, "conversations": conv("<image>\n<|vision_start|>q", "a")}, Reason.MALFORMED_CONVERSATION),
    ({**GOOD, "conversations": conv("What is it?", "A square.")}, Reason.NO_IMAGE_TAG),
    ({**GOOD, "conversations": conv("<image>\nq", "   ")}, Reason.EMPTY_ANSWER),
    ({**GOOD, "image": None}, Reason.MISSING_IMAGE),
    ({**GOOD, "image": "does/not/exist.png"}, Reason.MISSING_IMAGE),
    ({**GOOD, "image": b"\x89PNG\r\n\x1a\n garbage"}, Reason.UNDECODABLE_IMAGE),
    ({**GOOD, "image": noisy_png()[:6000]}, Reason.UNDECODABLE_IMAGE),  # truncated mid-data
    ({**GOOD, "image": b"plain text, not an image"}, Reason.UNDECODABLE_IMAGE),
    ({**GOOD, "malformed": "line 3 is not JSON"}, Reason.MALFORMED_RECORD),
])
def test_bad_records_become_error_rows(record, reason):
    samples, error = validate_record(record, image_root="/nonexistent-root")
    assert samples == []
    assert error["reason"] == reason, error
    assert error["stage"] == "data" and error["detail"]


def test_decompression_bomb_is_refused_before_decoding():
    bomb = png(size=(6000, 6000), mode="L")  # compresses to a few KB, 36M pixels when decoded
    assert len(bomb) < 200_000
    samples, error = validate_record({**GOOD, "image": bomb}, limits=ImageLimits(max_pixels=4096 * 4096))
    assert error["reason"] == Reason.IMAGE_TOO_LARGE and "36000000" in error["detail"]


def test_byte_limit():
    with pytest.raises(Exception, match="bytes"):
        check_image(png(), ImageLimits(max_bytes=10))


def test_image_paths_resolve_under_root(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png())
    samples, error = validate_record({**GOOD, "image": "imgs/a.png"}, image_root=str(tmp_path))
    assert error is None and samples[0]["image_ref"] == "imgs/a.png"


def test_hf_image_struct():
    samples, error = validate_record({**GOOD, "image": {"bytes": png(), "path": None}})
    assert error is None


def test_parse_conversation_roles():
    messages = parse_conversation(conv("<image>\nq", "a"))
    assert messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
