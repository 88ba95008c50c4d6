"""The effect sweep's arithmetic: each metric's mean over seeds with a 95% confidence interval (Student t),
base beside aligned, and its table."""

from __future__ import annotations

import math
import statistics

from bpo_ray.eval.compare import lower_is_better, metric_value

# (label, path into one model's eval metrics)
SWEPT = [
    ("CHAIR_s", ("chair", "chair_s")),
    ("CHAIR_i", ("chair", "chair_i")),
    ("CHAIR_s shape only", ("chair", "chair_s_shape")),
    ("companion halluc.", ("chair", "companion_hallucination", "rate")),
    ("exact captions", ("chair", "exact_caption")),
    ("POPE acc adversarial", ("pope", "adversarial", "accuracy")),
    ("POPE F1 adversarial", ("pope", "adversarial", "f1")),
    ("POPE yes-ratio adversarial", ("pope", "adversarial", "yes_ratio")),  # truth: 0.5 (POPE is balanced)
    ("POPE F1 popular", ("pope", "popular", "f1")),
    ("POPE F1 random", ("pope", "random", "f1")),
]
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (0 for a single value; NaN for both when a run
    lacks the metric, e.g. a report written before it was measured)."""
    if any(math.isnan(v) for v in values):
        return math.nan, math.nan
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def _metric(tree: dict, path: tuple) -> float:
    value = metric_value(tree, path)
    return math.nan if value is None else float(value)


def summarize(reports: dict[str, list[dict]]) -> dict:
    """{variant: {metric: {base, aligned, delta: (mean, ci)}}} from each run's report.json."""
    out = {}
    for variant, runs in reports.items():
        rows = {}
        for label, path in SWEPT:
            base = [_metric(r["eval"]["base"], path) for r in runs]
            aligned = [_metric(r["eval"]["aligned"], path) for r in runs]
            rows[label] = {"base": mean_ci(base), "aligned": mean_ci(aligned),
                           "delta": mean_ci([a - b for a, b in zip(aligned, base, strict=True)]),
                           "lower_is_better": lower_is_better(path), "seeds": len(runs)}
        out[variant] = rows
    return out


def format_summary(summary: dict, images: int) -> str:
    variants = list(summary)
    head = "| metric | base | " + " | ".join(f"{v}" for v in variants) + " |"
    lines = [f"Aligned vs its SFT base on {images} held-out images; mean ± 95% CI over "
             f"{next(iter(summary.values()))['CHAIR_s']['seeds']} seeds (Δ = aligned − base).", "",
             head, "|---|---:|" + "---:|" * len(variants)]
    for label, _ in SWEPT:
        base = summary[variants[0]][label]["base"]
        cells = []
        for v in variants:
            (a, ci), (d, _) = summary[v][label]["aligned"], summary[v][label]["delta"]
            cells.append(f"{a:.3f} ± {ci:.3f} ({d:+.3f})")
        lines.append(f"| {label} | {base[0]:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
