"""Preference data that already exists → our pairs rows; a bad row becomes an error row, never a crash.

Three layouts (``layout``; ``auto`` tells them apart by their keys, row by row):
- ``trl``: TRL's vision preference format — ``images`` (a list; its one image) or ``image``, ``prompt``,
  ``chosen``, ``rejected``; plain (strings) or conversational (``[{"role", "content"}]`` messages whose
  content is a string or a list of ``{"type": "text" | "image"}`` parts);
- ``rlaif_v``: RLAIF-V's — ``image``, ``question``, ``chosen``, ``rejected``;
- ``completions``: VLFeedback's and the BPO authors' released data — ``image``, ``prompt`` (or
  ``instruction``), ``completions: [{"response", "score", …}]``: the best-scored response is chosen
  against each response scored lower (one pair each), ties and repeats left out.
An image is bytes, a path (relative ones under ``image_root``) or an HF ``{"bytes", "path"}`` struct, and
is checked as the data stage checks records (decodable, within the pixel and byte limits). Output rows
have the negatives stage's pair columns (``negative_type`` ``external``), so the reference stage and
training take them as they take bootstrapped pairs. Pure Python; Ray Data maps it in
``pipeline/negatives.py``.
"""

from __future__ import annotations

import hashlib
import json

from bpo_ray.data.records import (
    IMAGE_TAG,
    ImageLimits,
    Reason,
    RecordError,
    check_image,
    load_image_bytes,
    placeholder_in,
)

EXTERNAL = "external"
LAYOUTS = ("trl", "rlaif_v", "completions")


class PairReason(Reason):
    UNKNOWN_LAYOUT = "unknown_layout"
    EMPTY_RESPONSE = "empty_response"
    IDENTICAL_RESPONSES = "identical_responses"
    NO_PREFERENCE = "no_preference"  # completions all scored alike: nothing to prefer


def detect_layout(row: dict) -> str:
    if "completions" in row:
        return "completions"
    if "question" in row and "chosen" in row:
        return "rlaif_v"
    if "prompt" in row and "chosen" in row:
        return "trl"
    raise RecordError(PairReason.UNKNOWN_LAYOUT, f"keys {sorted(row)[:12]} match no layout ({', '.join(LAYOUTS)})")


def _plain(value) -> list:
    return value.tolist() if hasattr(value, "tolist") else value


def _text(content, where: str) -> str:
    """A message's content (a string, or TRL's list of typed parts) → its text; image parts are skipped."""
    content = _plain(content)
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            part = _plain(part)
            if not isinstance(part, dict):
                raise RecordError(Reason.MALFORMED_CONVERSATION, f"{where}: a content part is not an object")
            if part.get("type") == "text":
                parts.append(str(part.get("text") or ""))
        return " ".join(p.strip() for p in parts if p.strip())
    raise RecordError(Reason.MALFORMED_CONVERSATION, f"{where}: content is a {type(content).__name__}")


def _prompt_messages(prompt, where: str = "prompt") -> list[dict]:
    """A prompt (a string or a list of messages ending with the user's) → our ``[{"role", "content"}]``."""
    prompt = _plain(prompt)
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt:
        messages = []
        for i, m in enumerate(prompt):
            m = _plain(m)
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise RecordError(Reason.MALFORMED_CONVERSATION, f"{where}[{i}] needs a role: system, user or assistant")
            messages.append({"role": m["role"], "content": _text(m.get("content"), f"{where}[{i}]")})
        messages = [m for m in messages if m["role"] != "system"]  # the model's template supplies its own
    else:
        raise RecordError(Reason.MALFORMED_CONVERSATION, f"{where} must be a string or a non-empty list of messages")
    if not messages or messages[-1]["role"] != "user":
        raise RecordError(Reason.MALFORMED_CONVERSATION, f"{where} must end with the user's turn")
    tags = sum(m["content"].count(IMAGE_TAG) for m in messages)
    if tags > 1:
        raise RecordError(Reason.MALFORMED_CONVERSATION, f"{tags} {IMAGE_TAG} tags; one image per pair")
    for m in messages:
        m["content"] = m["content"].replace(IMAGE_TAG, "").strip()
        if found := placeholder_in(m["content"]):
            raise RecordError(Reason.MALFORMED_CONVERSATION, f"{where}: {found} in the text")
        if not m["content"]:
            raise RecordError(Reason.MALFORMED_CONVERSATION, f"{where}: an empty {m['role']} turn")
    return messages


def _response(value, where: str) -> str:
    """A response: a string, or (conversational) the assistant's message(s)."""
    value = _plain(value)
    if isinstance(value, list):
        texts = [_text(_plain(m).get("content"), where) for m in map(_plain, value)
                 if isinstance(m, dict) and m.get("role", "assistant") == "assistant"]
        value = " ".join(texts)
    if not isinstance(value, str):
        raise RecordError(Reason.MALFORMED_CONVERSATION, f"{where} is a {type(value).__name__}, not text")
    value = value.strip()
    if not value:
        raise RecordError(PairReason.EMPTY_RESPONSE, f"{where} is empty")
    if found := placeholder_in(value):
        raise RecordError(Reason.MALFORMED_CONVERSATION, f"{where}: {found} in a response")
    return value


def _image_field(row: dict, layout: str):
    if layout == "trl" and row.get("images") is not None:
        images = _plain(row["images"])
        if not isinstance(images, list) or len(images) != 1:
            n = len(images) if isinstance(images, list) else type(images).__name__
            raise RecordError(Reason.MISSING_IMAGE, f"images holds {n}; one image per pair")
        return _plain(images[0])
    return _plain(row.get("image"))


def _responses(row: dict, layout: str) -> list[tuple[str, str]]:
    """(chosen, rejected) pairs of one row."""
    if layout in ("trl", "rlaif_v"):
        chosen, rejected = _response(row.get("chosen"), "chosen"), _response(row.get("rejected"), "rejected")
        if " ".join(chosen.lower().split()) == " ".join(rejected.lower().split()):
            raise RecordError(PairReason.IDENTICAL_RESPONSES, "chosen and rejected say the same")
        return [(chosen, rejected)]
    completions = _plain(row.get("completions"))
    if not isinstance(completions, list):
        raise RecordError(Reason.MALFORMED_RECORD, "completions must be a list of {response, score}")
    scored = []
    for i, c in enumerate(map(_plain, completions)):
        if not isinstance(c, dict) or not isinstance(c.get("score"), (int, float)) or isinstance(c["score"], bool):
            raise RecordError(Reason.MALFORMED_RECORD, f"completions[{i}] needs a response and a numeric score")
        scored.append((float(c["score"]), _response(c.get("response"), f"completions[{i}].response")))
    scored.sort(key=lambda s: -s[0])
    if len(scored) < 2 or scored[0][0] == scored[-1][0]:
        raise RecordError(PairReason.NO_PREFERENCE, f"{len(scored)} completions, none scored below another")
    best_score, best = scored[0]
    seen, pairs = {best}, []
    for score, text in scored[1:]:
        if score < best_score and text not in seen:
            seen.add(text)
            pairs.append((best, text))
    return pairs


def _unpacked(row):
    """JSON sources travel as their text (``__json``, see ``data/dataset.py``); the row it holds."""
    if not isinstance(row, dict) or "__json" not in row:
        return row
    item = json.loads(row["__json"]) if row["__json"] else {}
    if row.get("malformed"):
        item = {"malformed": str(row["malformed"])}
    return {**item, "source_index": int(row.get("source_index", -1))}


def row_id(row: dict, layout: str, source_index: int) -> str:
    """The row's own id where it has one; else its position in the source, or (read in parallel blocks
    without one) a digest of its content, stable across runs."""
    for key in ("id", "idx", "sample_id"):
        if row.get(key) not in (None, ""):
            return str(_plain(row[key]))
    if source_index >= 0:
        return f"row-{source_index}"
    text = json.dumps({k: row.get(k) for k in ("prompt", "question", "instruction", "chosen", "rejected")},
                      sort_keys=True, default=str)
    return f"{layout}-{hashlib.blake2b(text.encode(), digest_size=8).hexdigest()}"


def preference_rows(row: dict, layout: str = "auto", image_root: str | None = None,
                    limits: ImageLimits = ImageLimits(), source: str = "") -> list[dict]:
    """One row of external preference data → its pair rows (``kind`` "pair") or one error row."""
    row = _unpacked(row)
    source_index = int(row.get("source_index", -1)) if isinstance(row, dict) else -1
    record_id = None
    try:
        if not isinstance(row, dict):
            raise RecordError(Reason.MALFORMED_RECORD, f"row is a {type(row).__name__}, not an object")
        if isinstance(row.get("malformed"), str):
            raise RecordError(Reason.MALFORMED_RECORD, row["malformed"])
        found = detect_layout(row) if layout == "auto" else layout
        record_id = row_id(row, found, source_index)
        question = row.get("question") if found == "rlaif_v" else row.get("prompt", row.get("instruction"))
        messages = _prompt_messages(question, "question" if found == "rlaif_v" else "prompt")
        pairs = _responses(row, found)
        data, ref = load_image_bytes(_image_field(row, found), image_root)
        check_image(data, limits)
    except RecordError as err:
        return [{**_EMPTY_PAIR, "kind": "error", "sample_id": "", "record_id": record_id or "",
                 "stage": "negatives", "negative_type": EXTERNAL, "reason": err.reason, "detail": err.detail[:500]}]
    return [{"kind": "pair", "sample_id": f"{record_id}#{k}", "record_id": record_id, "image": data,
             "image_ref": ref, "image_file": "", "messages": json.dumps(messages), "prompt": messages[-1]["content"],
             "chosen": chosen, "rejected": rejected, "negative_type": EXTERNAL, "distortion": "",
             "edits": json.dumps({"layout": found}), "generator": source or found, "seed": 0,
             "rejected_truncated": False, "stage": "", "reason": "", "detail": ""}
            for k, (chosen, rejected) in enumerate(pairs)]


_EMPTY_PAIR = {"image": b"", "image_ref": "", "image_file": "", "messages": "", "prompt": "", "chosen": "", "rejected": "",
               "distortion": "", "edits": "", "generator": "", "seed": 0, "rejected_truncated": False}
