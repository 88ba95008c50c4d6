"""Validate raw records into training samples; a bad record becomes an error row, never a crash.

A *raw record* is what a reader yields, normalised only in shape:
``{"id", "image": bytes | str | None, "conversations": <anything>, "source_index": int}``.
A *sample* is one assistant turn of a valid record, with its image bytes and the chat history before it.
Pure Python (PIL for image checks): Ray Data maps these functions over the cluster in ``data/dataset.py``.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass

from PIL import Image

from bpo_ray.storage import read_bytes

IMAGE_TAG = "<image>"
# Text the processors of the model families we load turn into image or video tokens: in any text but the
# one tag marking where the image goes, it would be tokenised as a placeholder with no image behind it.
IMAGE_PLACEHOLDERS = (IMAGE_TAG, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def placeholder_in(text: str) -> str | None:
    """The first image placeholder in ``text``, if any."""
    return next((p for p in IMAGE_PLACEHOLDERS if p in text), None)


class Reason:
    """Why a record was skipped. Stable strings: they are what the errors table is grouped by."""

    MALFORMED_RECORD = "malformed_record"
    MALFORMED_CONVERSATION = "malformed_conversation"
    NO_IMAGE_TAG = "no_image_tag"
    EMPTY_ANSWER = "empty_answer"
    MISSING_IMAGE = "missing_image"
    UNDECODABLE_IMAGE = "undecodable_image"
    IMAGE_TOO_LARGE = "image_too_large"


class RecordError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = 4096 * 4096
    max_bytes: int = 64 * 1024 * 1024


def error_row(record_id: str | None, stage: str, reason: str, detail: str, source_index: int = -1) -> dict:
    return {"record_id": "" if record_id is None else str(record_id), "source_index": int(source_index),
            "stage": stage, "reason": reason, "detail": detail[:500]}


# ---------------------------------------------------------------------------------------- conversations
def parse_conversation(conversations) -> list[dict]:
    """LLaVA turns → chat messages ``[{"role": "user"|"assistant", "content": str}]``, tag removed.

    Raises RecordError for anything that is not human/gpt alternation starting with human, with exactly
    one ``<image>`` tag (in a human turn) and non-empty answers.
    """
    if isinstance(conversations, str):
        try:
            conversations = json.loads(conversations)
        except json.JSONDecodeError as err:
            raise RecordError(Reason.MALFORMED_CONVERSATION, f"conversations is not JSON: {err}") from None
    if hasattr(conversations, "tolist"):  # numpy arrays from parquet/arrow
        conversations = conversations.tolist()
    if not isinstance(conversations, list) or not conversations:
        raise RecordError(Reason.MALFORMED_CONVERSATION, "conversations must be a non-empty list of turns")
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    messages, tags = [], 0
    for index, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RecordError(Reason.MALFORMED_CONVERSATION, f"turn {index} needs 'from' and 'value'")
        role = roles.get(str(turn["from"]).lower())
        if role is None:
            raise RecordError(Reason.MALFORMED_CONVERSATION, f"turn {index}: unknown speaker {turn['from']!r}")
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            raise RecordError(Reason.MALFORMED_CONVERSATION,
                              f"turn {index} is from {turn['from']!r}; turns must alternate human, gpt")
        value = turn["value"]
        if not isinstance(value, str):
            raise RecordError(Reason.MALFORMED_CONVERSATION, f"turn {index}: value is not a string")
        if role == "assistant" and (found := placeholder_in(value)):
            raise RecordError(Reason.MALFORMED_CONVERSATION, f"turn {index}: {found} in an answer")
        if found := placeholder_in(value.replace(IMAGE_TAG, "")):
            raise RecordError(Reason.MALFORMED_CONVERSATION, f"turn {index}: {found} in a question")
        tags += value.count(IMAGE_TAG)
        messages.append({"role": role, "content": value.replace(IMAGE_TAG, "").strip()})
    if len(messages) % 2:
        raise RecordError(Reason.MALFORMED_CONVERSATION, "the last turn is a question with no answer")
    if tags == 0:
        raise RecordError(Reason.NO_IMAGE_TAG, f"no {IMAGE_TAG} tag in any human turn")
    if tags > 1:
        raise RecordError(Reason.MALFORMED_CONVERSATION, f"{tags} {IMAGE_TAG} tags; one image per record")
    for index, message in enumerate(messages):
        if not message["content"]:
            reason = Reason.EMPTY_ANSWER if message["role"] == "assistant" else Reason.MALFORMED_CONVERSATION
            raise RecordError(reason, f"turn {index} is empty")
    return messages


# ------------------------------------------------------------------------------------------------ images
def load_image_bytes(image, image_root: str | None) -> tuple[bytes, str]:
    """Resolve a record's image field to (encoded bytes, reference)."""
    if isinstance(image, dict):  # HF datasets Image feature with decode=False: {"bytes", "path"}
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image), "<bytes>"
    if not isinstance(image, str) or not image.strip():
        raise RecordError(Reason.MISSING_IMAGE, "record has no image")
    ref = image if "://" in image or image.startswith("/") or not image_root else f"{image_root.rstrip('/')}/{image}"
    try:
        return read_bytes(ref), image
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, OSError) as err:
        raise RecordError(Reason.MISSING_IMAGE, f"cannot read {ref}: {err.__class__.__name__}") from None


def check_image(data: bytes, limits: ImageLimits) -> tuple[int, int]:
    """Return (width, height) of a fully decodable image within limits; the pixel check happens before
    decoding, so a decompression bomb is refused without allocating it."""
    if len(data) > limits.max_bytes:
        raise RecordError(Reason.IMAGE_TOO_LARGE, f"{len(data)} bytes > {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > limits.max_pixels:
                    raise RecordError(Reason.IMAGE_TOO_LARGE,
                                      f"{width}x{height} = {width * height} pixels > {limits.max_pixels}")
                img.load()
    except RecordError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise RecordError(Reason.IMAGE_TOO_LARGE, str(err)) from None
    except Exception as err:  # PIL raises many types for corrupt data (OSError, SyntaxError, ValueError, …)
        raise RecordError(Reason.UNDECODABLE_IMAGE, f"{err.__class__.__name__}: {err}") from None
    if width < 1 or height < 1:
        raise RecordError(Reason.UNDECODABLE_IMAGE, f"empty image {width}x{height}")
    return width, height


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes of an already validated image → RGB PIL image."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


# ---------------------------------------------------------------------------------------------- records
def validate_record(raw, image_root: str | None = None, limits: ImageLimits = ImageLimits(),
                    stage: str = "data") -> tuple[list[dict], dict | None]:
    """Raw record → (samples, None) or ([], error row). Never raises for bad data."""
    source_index = raw.get("source_index", -1) if isinstance(raw, dict) else -1
    record_id = raw.get("id") if isinstance(raw, dict) else None
    try:
        if not isinstance(raw, dict):
            raise RecordError(Reason.MALFORMED_RECORD, f"record is a {type(raw).__name__}, not an object")
        if record_id is None or (isinstance(record_id, str) and not record_id.strip()):
            raise RecordError(Reason.MALFORMED_RECORD, "record has no id")
        if isinstance(raw.get("malformed"), str):  # a reader could not even parse it
            raise RecordError(Reason.MALFORMED_RECORD, raw["malformed"])
        messages = parse_conversation(raw.get("conversations"))
        data, ref = load_image_bytes(raw.get("image"), image_root)
        width, height = check_image(data, limits)
    except RecordError as err:
        return [], error_row(record_id, stage, err.reason, err.detail, source_index)
    samples = []
    for turn in range(len(messages) // 2):
        history = messages[: 2 * turn + 1]
        samples.append({
            "sample_id": f"{record_id}#{turn}",
            "record_id": str(record_id),
            "source_index": int(source_index),
            "turn": turn,
            "image": data,
            "image_ref": ref,
            "width": width,
            "height": height,
            "messages": json.dumps(history),
            "prompt": history[-1]["content"],
            "answer": messages[2 * turn + 1]["content"],
        })
    return samples, None
