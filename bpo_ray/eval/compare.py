"""Base vs aligned: the metrics both models were scored on, side by side, and the one table format for
them (the job's closing lines and ``report.md``; the effect sweep reads values the same way)."""

from __future__ import annotations

import math

# (label, path into one model's eval metrics, lower is better)
HEADLINE = [
    ("CHAIR_s (captions with a hallucination)", ("chair", "chair_s"), True),
    ("CHAIR_i (hallucinated mentions)", ("chair", "chair_i"), True),
    ("CHAIR_s, shapes only (CHAIR proper)", ("chair", "chair_s_shape"), True),
    ("companion hallucination (prior)", ("chair", "companion_hallucination", "rate"), True),
    ("attribute errors", ("chair", "attribute_error_rate"), True),
    ("object recall", ("chair", "object_recall"), False),
    ("exact captions", ("chair", "exact_caption"), False),
]
POPE_FIELDS = ("f1", "accuracy", "precision", "recall", "yes_ratio")


def metric_value(tree: dict, path: tuple) -> float | None:
    """One model's metric at ``path`` (e.g. ``("pope", "adversarial", "f1")``), None when not scored."""
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree if isinstance(tree, (int, float)) else None


def lower_is_better(path: tuple) -> bool | None:
    """Which way a metric improves (None: neither, e.g. POPE's yes-ratio)."""
    for _, known, lower in HEADLINE:
        if known == path:
            return lower
    return None if path[-1] == "yes_ratio" else False


def _metric_rows(scored: dict) -> list[tuple[str, tuple, bool | None]]:
    """(label, path into one model's metrics, lower is better) for the headline and every POPE split scored."""
    rows = list(HEADLINE)
    for task in ("pope", "coco_pope"):
        for split in scored.get(task, {}):
            for field in POPE_FIELDS:
                path = (task, split, field)
                rows.append((f"{task} {split} {field}", path, lower_is_better(path)))
    return rows


def aligned_only(eval_metrics: dict) -> list[tuple[str, float]]:
    """(metric, value) for the aligned model, when the base was not scored in this run (``eval.base: false``)."""
    aligned = eval_metrics.get("aligned", {})
    return [(label, v) for label, path, _ in _metric_rows(aligned) if (v := metric_value(aligned, path)) is not None]


def comparison(eval_metrics: dict) -> list[dict]:
    """Rows of (metric, base, aligned, delta, better) over everything both models were scored on."""
    base, aligned = eval_metrics.get("base", {}), eval_metrics.get("aligned", {})
    out = []
    for label, path, lower in _metric_rows(aligned):
        b, a = metric_value(base, path), metric_value(aligned, path)
        if b is None or a is None:
            continue
        better = None if lower is None or a == b or math.isnan(a - b) else (a < b) == lower
        out.append({"metric": label, "base": b, "aligned": a, "delta": a - b, "better": better})
    return out


def headline(rows: list[dict]) -> list[dict]:
    """The rows a person reads first: caption hallucination, POPE F1 per split, and the adversarial split's
    accuracy and yes-ratio (F1 alone can be won by saying yes more; the yes-ratio's truth is 0.5)."""
    labels = {label for label, _, _ in HEADLINE} | {"pope adversarial accuracy", "pope adversarial yes_ratio"}
    return [r for r in rows if r["metric"] in labels or r["metric"].endswith(" f1")]


def format_table(rows: list[dict]) -> str:
    lines = ["| metric | base | aligned | Δ |", "|---|---:|---:|---:|"]
    for r in rows:
        mark = {True: " ✓", False: " ✗", None: ""}[r["better"]]
        lines.append(f"| {r['metric']} | {r['base']:.3f} | {r['aligned']:.3f} | {r['delta']:+.3f}{mark} |")
    return "\n".join(lines)
