"""Batch functions that turn samples into bootstrapped rejected answers and preference pairs (Ray Data
``map_batches`` calls them; the negatives stage wires them together).

Every function returns rows with the same columns (``OUT_COLUMNS``), pairs and errors alike (``kind``
tells): a negative is paired with the annotated answer (chosen) unless it is degenerate, and everything
dropped says why.
"""

from __future__ import annotations

import json
import pickle

import numpy as np

from bpo_ray.data.preferences import EXTERNAL
from bpo_ray.eval.metrics import parse_yes_no
from bpo_ray.negatives import inject
from bpo_ray.negatives.existence import EXISTENCE, yes_no_side
from bpo_ray.negatives.pairs import (
    ERROR_INJECTION,
    IMAGE_WEAKENING,
    Drop,
    degenerate,
    stable_seed,
    word_count,
)
from bpo_ray.negatives.vocabulary import Vocabulary

PAIR_COLUMNS = ("sample_id", "record_id", "image", "image_ref", "image_file", "messages", "prompt", "chosen",
                "rejected", "negative_type", "distortion", "edits", "generator", "seed", "rejected_truncated")
ERROR_COLUMNS = ("sample_id", "record_id", "stage", "negative_type", "reason", "detail")
# What a sample carries through generation untouched (packed, so engine columns never collide with it).
CARRIED = ("sample_id", "record_id", "image", "image_ref", "image_file", "messages", "prompt", "answer")


def _rows(batch: dict) -> list[dict]:
    n = len(batch["sample_id"]) if "sample_id" in batch else len(batch["carry"])
    return [{k: batch[k][i] for k in batch} for i in range(n)]


def _carry(rows: list[dict]) -> np.ndarray:
    return np.array([pickle.dumps({k: r.get(k, "") for k in CARRIED}) for r in rows], dtype=object)


def _columns(rows: list[dict], names) -> dict:
    return {name: np.array([r[name] for r in rows], dtype=object) for name in names}


def _out(sample: dict, negative_type: str, rejected: str, *, distortion: str = "", edits: str = "",
         generator: str = "", seed: int = 0, truncated: bool = False, reason: str = "", detail: str = "") -> dict:
    """One output row; the same columns whether it is a pair or an error (``kind`` tells)."""
    # A stored image travels as its reference (``data/images.py``); older tables' inline bytes as they are.
    stored = sample.get("image_file") or ""
    return {"sample_id": sample["sample_id"], "record_id": sample["record_id"],
            "image": b"" if stored else sample["image"], "image_ref": sample["image_ref"], "image_file": stored,
            "messages": sample["messages"], "prompt": sample["prompt"],
            "chosen": sample["answer"], "rejected": rejected, "negative_type": negative_type,
            "distortion": distortion, "edits": edits, "generator": generator, "seed": int(seed),
            "rejected_truncated": truncated, "stage": "negatives", "kind": "error" if reason else "pair",
            "reason": reason, "detail": detail}


OUT_COLUMNS = (*PAIR_COLUMNS, "stage", "kind", "reason", "detail")


def _finish(sample: dict, negative_type: str, rejected: str, error: str, max_words: int, **meta) -> dict:
    if error:
        return _out(sample, negative_type, "", reason=Drop.GENERATION_FAILED, detail=error, **meta)
    problem = degenerate(sample["answer"], rejected, max_words)
    if problem:
        return _out(sample, negative_type, rejected, reason=problem[0], detail=problem[1], **meta)
    return _out(sample, negative_type, rejected, **meta)


# ------------------------------------------------------------------------------------ batch functions
def split_on_chosen_length(batch: dict, max_words: int) -> dict:
    """Mark samples whose annotated answer is over the limit (the paper drops them)."""
    too_long = np.array([word_count(a) > max_words for a in batch["answer"]])
    batch["too_long"] = too_long
    return batch


def chosen_too_long_errors(batch: dict, max_words: int) -> dict:
    rows = [_out(r, "", "", reason=Drop.CHOSEN_TOO_LONG, detail=f"{word_count(r['answer'])} words > {max_words}")
            for r in _rows(batch)]
    return _columns(rows, OUT_COLUMNS)


def weakening_seed(seed: int, sample_id: str) -> int:
    """The seed that weakens a sample's image: the same for its weakening negative and, in training, for the
    image-conditional term (``weakened_image``)."""
    return stable_seed(seed, IMAGE_WEAKENING, sample_id)


def weakened_image(image: bytes, sample_id: str, distortions: list[dict], seed: int, size=None) -> bytes:
    """The weakened image a sample's weakening negative was generated on (PNG), rebuilt from the original:
    seeded per sample, so it is the same image wherever it is made and need not be stored with the pairs."""
    # torch only here: the other batch functions run in plain Ray Data task workers, which then start without it
    from bpo_ray.negatives import distort

    return distort.weaken_bytes(image, distortions, weakening_seed(seed, sample_id), size)


def weaken_batch(batch: dict, distortions: list[dict], seed: int, size=None) -> dict:
    """``size``: the policy's ``ModelInputSize``, at which images are weakened."""
    rows = _rows(batch)
    return {
        "carry": _carry(rows),
        "gen_messages": np.array([r["messages"] for r in rows], dtype=object),
        "gen_image": np.array([weakened_image(r["image"], r["sample_id"], distortions, seed, size) for r in rows],
                              dtype=object),
        "seed": np.array([weakening_seed(seed, r["sample_id"]) for r in rows], dtype=np.int64),
    }


def injection_prompts(batch: dict, mode: str, seed: int) -> dict:
    rows = _rows(batch)
    return {
        "carry": _carry(rows),
        "gen_messages": np.array([json.dumps(inject.injection_messages(r["prompt"], r["answer"], mode))
                                  for r in rows], dtype=object),
        "seed": np.array([stable_seed(seed, ERROR_INJECTION, r["sample_id"]) for r in rows], dtype=np.int64),
    }


def finish_generated(batch: dict, negative_type: str, generator: str, max_words: int, distortion: str,
                     truncated: str) -> dict:
    """Generated answers → pairs or errors; ``truncated`` ("drop" | "keep") says what becomes of an answer
    cut at max_new_tokens."""
    out = []
    for r in _rows(batch):
        sample = pickle.loads(r["carry"])
        text = r["generated_text"] or ""
        if negative_type == ERROR_INJECTION:
            text = inject.clean_llm_rewrite(text)
        meta = {"distortion": distortion, "generator": generator, "seed": r["seed"]}
        cut = r["finish_reason"] == "length" and not r["generation_error"]
        if cut and truncated == "drop":
            out.append(_out(sample, negative_type, text, reason=Drop.TRUNCATED,
                            detail="the answer reached max_new_tokens before it ended", **meta))
        else:
            out.append(_finish(sample, negative_type, text, r["generation_error"], max_words, truncated=cut, **meta))
    return _columns(out, OUT_COLUMNS)


def rules_batch(batch: dict, seed: int, max_words: int, vocabulary: Vocabulary) -> dict:
    out = []
    for r in _rows(batch):
        s = stable_seed(seed, ERROR_INJECTION, r["sample_id"])
        rejected, edits = inject.rules_inject(r["answer"], s, vocabulary=vocabulary)
        out.append(_finish(r, ERROR_INJECTION, rejected, "", max_words, edits=json.dumps(edits),
                           generator="rules", seed=s))
    return _columns(out, OUT_COLUMNS)


def rules_edit_kinds(batch: dict) -> dict:
    """One row per edit the rules made in a pair (``color``, ``count``, ``object``, ``add``, …): the
    negatives manifest's edit mix."""
    kinds = [label.split(":", 1)[0] for r in _rows(batch)
             if r["kind"] == "pair" and r["negative_type"] == ERROR_INJECTION and r["generator"] == "rules"
             for label in json.loads(r["edits"] or "[]")]
    return {"edit": np.array(kinds, dtype=object)}


def existence_batch(batch: dict, questions: dict[str, list]) -> dict:
    """Balanced yes/no pairs (``existence.py``): ``questions`` maps the sample that lends each annotated image
    to that image's questions; each becomes a pair in a new one-turn conversation."""
    out = []
    for r in _rows(batch):
        for q in questions.get(r["sample_id"], ()):
            sample = {**r, "sample_id": f"{r['sample_id']}~{EXISTENCE}:{q.name}",
                      "messages": json.dumps([{"role": "user", "content": q.question}]), "prompt": q.question,
                      "answer": q.chosen}
            out.append(_out(sample, EXISTENCE, q.rejected, edits=json.dumps({"asked": q.name,
                                                                              "present": q.present,
                                                                              "strategy": q.strategy}),
                            generator="annotations"))
    return _columns(out, OUT_COLUMNS)


def existence_prompts(batch: dict, seed: int) -> dict:
    """Existence pairs, their images attached → the policy's generation inputs (``balance: errors``): each
    pair's question on its clean image. The pair rides along in ``carry``, its image as the reference it was."""
    rows = _rows(batch)
    pairs = [{**{k: r[k] for k in OUT_COLUMNS}, "image": b"" if r["image_file"] else r["image"]} for r in rows]
    return {
        "carry": np.array([pickle.dumps(p) for p in pairs], dtype=object),
        "gen_messages": np.array([r["messages"] for r in rows], dtype=object),
        "gen_image": np.array([r["image"] for r in rows], dtype=object),
        "seed": np.array([stable_seed(seed, EXISTENCE, r["sample_id"]) for r in rows], dtype=np.int64),
    }


def judge_policy_answers(batch: dict, keep_right: bool = False) -> dict:
    """The policy's answers to the existence questions, read as POPE reads them (``eval/metrics.py``), kept in
    ``edits`` (``policy_answer``). ``balance: errors``: a question it answered wrong, or with neither yes nor
    no, stays a pair; one it answered right becomes an error (``Drop.ANSWERED_RIGHT``). ``keep_right``
    (``balance: steer``): every answered question stays a pair. A failed generation is a ``generation_failed``
    error either way."""
    out = []
    for r in _rows(batch):
        pair = pickle.loads(r["carry"])
        asked, answer = json.loads(pair["edits"]), r["generated_text"] or ""
        said_yes, understood = parse_yes_no(answer)
        pair["edits"] = json.dumps({**asked, "policy_answer": answer})
        if r["generation_error"]:
            pair.update(kind="error", reason=Drop.GENERATION_FAILED, detail=r["generation_error"])
        elif understood and said_yes == asked["present"] and not keep_right:
            pair.update(kind="error", reason=Drop.ANSWERED_RIGHT,
                        detail=f"the policy answered {answer!r} (negatives.existence.balance: errors)")
        out.append(pair)
    return _columns(out, OUT_COLUMNS)


def policy_judgements(batch: dict) -> dict:
    """One row per existence pair the policy answered (``judge_policy_answers``): its id, whether the object
    is there, whether the policy said yes (POPE's rule: an unclear answer counts as yes) and whether it was
    right (said yes or no clearly, and matched)."""
    rows = []
    for r in _rows(batch):
        if r["kind"] != "pair" or r["negative_type"] != EXISTENCE:
            continue
        asked = json.loads(r["edits"])
        if "policy_answer" in asked:
            said_yes, understood = parse_yes_no(asked["policy_answer"])
            rows.append((r["sample_id"], asked["present"], said_yes, understood and said_yes == asked["present"]))
    columns = {"sample_id": np.array([row[0] for row in rows], dtype=object)}
    for i, name in enumerate(("present", "said_yes", "right"), start=1):
        columns[name] = np.array([row[i] for row in rows], dtype=bool)
    return columns


def yes_no_sides(batch: dict) -> dict:
    """One row per yes/no pair: its id, type and the answer it argues for (``existence.yes_no_side``)."""
    rows = [(r["sample_id"], r["negative_type"], side) for r in _rows(batch)
            if r["kind"] == "pair" and (side := yes_no_side(r["chosen"], r["rejected"]))]
    return {name: np.array([row[i] for row in rows], dtype=object)
            for i, name in enumerate(("sample_id", "negative_type", "side"))}


def drop_for_balance(batch: dict, ids: frozenset, side: str, balance: str = "mix") -> dict:
    """The existence pairs ``ids`` become errors (``Drop.BALANCE``); every other row passes unchanged."""
    over = "ones" if balance == "mix" else "ones than the steered share allows"
    out = []
    for r in _rows(batch):
        if r["kind"] == "pair" and r["negative_type"] == EXISTENCE and r["sample_id"] in ids:
            r = {**r, "kind": "error", "reason": Drop.BALANCE,
                 "detail": f"the run's yes/no pairs had more {side}-chosen {over} (negatives.existence.balance: "
                           f"{balance})"}
        out.append(r)
    return _columns(out, OUT_COLUMNS)


def external_pair_layouts(batch: dict) -> dict:
    """Per block: external rows that made pairs (each has one pair numbered 0) and the layouts they had."""
    layouts = [json.loads(e)["layout"] for kind, t, sid, e in zip(batch["kind"], batch["negative_type"],
                                                                  batch["sample_id"], batch["edits"], strict=True)
               if kind == "pair" and t == EXTERNAL and sid.endswith("#0")]
    return {"layout": np.array(layouts, dtype=object)}
