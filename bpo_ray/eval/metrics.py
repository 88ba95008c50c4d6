"""Hallucination metrics, pure: answers and known truth in, numbers out.

- POPE-style yes/no object probes: accuracy, precision, recall, F1 and yes-ratio with "yes" as the
  positive class; an answer is read the way POPE reads it (a "no"/"not" word makes it "no").
- CHAIR-style caption scoring against the synthetic truth: object mentions ("a small red circle",
  "squares") are extracted with the dataset's vocabulary; a mention is hallucinated when no object of
  that name (or, for a bare shape, of that shape) is in the image. CHAIR_i is hallucinated mentions over
  all mentions, CHAIR_s the share of captions with any.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

_WORDS = re.compile(r"[a-z]+")


def parse_yes_no(answer: str) -> tuple[bool, bool]:
    """(says yes, was understood). POPE's rule: any of no/not/none → no, otherwise yes; an answer with
    neither a yes- nor a no-word counts as yes but is reported as not understood."""
    words = set(_WORDS.findall(answer.lower()))
    if words & {"no", "not", "none", "nothing"}:
        return False, True
    return True, bool(words & {"yes", "yeah", "yep", "there"})


def pope_metrics(said_yes: Sequence[bool], labels: Sequence[bool]) -> dict:
    if len(said_yes) != len(labels):
        raise ValueError(f"{len(said_yes)} answers for {len(labels)} labels")
    tp = sum(p and t for p, t in zip(said_yes, labels, strict=True))
    fp = sum(p and not t for p, t in zip(said_yes, labels, strict=True))
    tn = sum(not p and not t for p, t in zip(said_yes, labels, strict=True))
    fn = sum(not p and t for p, t in zip(said_yes, labels, strict=True))
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = (tp + tn) / n if n else math.nan
    return {"n": n, "accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n if n else math.nan, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
            # How far a change in accuracy can be noise: the 95% half-width (normal approximation).
            "accuracy_ci95": 1.96 * math.sqrt(accuracy * (1 - accuracy) / n) if n else math.nan,
            # What the yes-ratio should be: the share of probes whose object is there.
            "truth_yes_rate": (tp + fn) / n if n else math.nan}


def extract_mentions(caption: str, colors: Iterable[str], shapes: Iterable[str]) -> list[tuple[str | None, str]]:
    """Object mentions in a caption as (colour or None, shape); plurals count, "shapes" does not."""
    colors, shapes = list(colors), list(shapes)
    pattern = re.compile(rf"\b(?:({'|'.join(colors)})\s+)?({'|'.join(shapes)})s?\b")
    return [(m.group(1), m.group(2)) for m in pattern.finditer(caption.lower())]


def chair_caption(caption: str, objects: Sequence[tuple[str, str]], colors: Iterable[str],
                  shapes: Iterable[str]) -> dict:
    """Score one caption against the (colour, shape) objects truly in its image."""
    names = {(c, s) for c, s in objects}
    present_shapes = {s for _, s in objects}
    mentions = extract_mentions(caption, colors, shapes)
    hallucinated = [m for m in mentions if (m[1] not in present_shapes if m[0] is None else m not in names)]
    # An attribute error: the shape is there, in another colour.
    attribute = [m for m in hallucinated if m[0] is not None and m[1] in present_shapes]
    named = {m for m in mentions if m[0] is not None}
    return {"mentions": len(mentions), "hallucinated": len(hallucinated), "attribute_errors": len(attribute),
            # CHAIR proper counts object categories: here a shape not in the image at all, whatever its colour.
            "hallucinated_shapes": sum(m[1] not in present_shapes for m in mentions),
            "hallucinated_objects": sorted({f"{c} {s}" if c else s for c, s in hallucinated}),
            "objects_named": len(names & named), "objects": len(names)}


def chair_metrics(scored: Sequence[dict], exact: Sequence[bool] | None = None) -> dict:
    """Aggregate per-caption scores: CHAIR_i, CHAIR_s (colour and shape; and shape only), attribute errors,
    object recall, exact captions."""
    mentions = sum(s["mentions"] for s in scored)
    out = {
        "n": len(scored),
        "chair_i": sum(s["hallucinated"] for s in scored) / mentions if mentions else 0.0,
        "chair_s": sum(s["hallucinated"] > 0 for s in scored) / len(scored) if scored else math.nan,
        # Shape-only (CHAIR as defined on COCO categories: a green square where a blue one is is no hallucination).
        "chair_i_shape": sum(s["hallucinated_shapes"] for s in scored) / mentions if mentions else 0.0,
        "chair_s_shape": sum(s["hallucinated_shapes"] > 0 for s in scored) / len(scored) if scored else math.nan,
        "attribute_error_rate": sum(s["attribute_errors"] for s in scored) / mentions if mentions else 0.0,
        "object_recall": (sum(s["objects_named"] for s in scored) / total
                          if (total := sum(s["objects"] for s in scored)) else math.nan),
        "mentions_per_caption": mentions / len(scored) if scored else math.nan,
    }
    if exact is not None:
        out["exact_caption"] = sum(exact) / len(exact) if exact else math.nan
    return out


def companion_hallucination(captions: Sequence[str], objects: Sequence[Sequence[tuple[str, str]]],
                            companions: dict[tuple[str, str], tuple[str, str]], colors, shapes) -> dict:
    """The language prior in one number: of the images where an anchor is present and its usual companion
    is absent, the share whose caption names the companion anyway."""
    exposed = named = 0
    for caption, objs in zip(captions, objects, strict=True):
        names = set(map(tuple, objs))
        mentioned = set(extract_mentions(caption, colors, shapes))
        for anchor, companion in companions.items():
            if anchor in names and companion not in names:
                exposed += 1
                named += companion in mentioned
    return {"exposed": exposed, "named": named, "rate": named / exposed if exposed else math.nan}


def normalize_caption(text: str) -> str:
    return " ".join(_WORDS.findall(text.lower()))
