"""Does BPO make the model more grounded? Base vs aligned over several seeds, with ablations.

    python jobs/effect.py --config configs/tiny.yaml [--seeds 0,1,2] [--variants both,injection,...] [key=value ...]

1. The base: the config's sft stage, trained once (run ``<prefix>-base``; skipped when finished).
2. For every variant and seed: the whole BPO job (data → negatives → reference → train → eval → report)
   on that base, in its own run ``<prefix>-<variant>-s<seed>`` (finished runs are skipped, so an
   interrupted sweep resumes). A seed sets the negatives' sampling and injection, the training order and
   the LoRA init; the held-out evaluation images are the same for every run.
3. The table: each metric's mean over seeds with a 95% confidence interval (Student t), base beside
   aligned, written to ``<storage_path>/<prefix>/effect.{json,md}`` and printed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bpo_ray import pipeline as job  # noqa: E402  (the one recipe and its stages)
from bpo_ray import storage  # noqa: E402
from bpo_ray.config import ConfigError, load_config  # noqa: E402

# name → overrides on top of the config (which makes both kinds of negatives with its own beta).
VARIANTS = {
    "both": [],
    "injection": ["negatives.weakening.enabled=false"],
    "weakening": ["negatives.injection.enabled=false"],
    "beta0.05": ["train.beta=0.05"],
    "beta0.5": ["train.beta=0.5"],
    "companion-q": ["data.synthetic.companion_questions=1.0"],
}
# (label, path into one model's eval metrics, lower is better)
METRICS = [
    ("CHAIR_s", ("chair", "chair_s"), True),
    ("CHAIR_i", ("chair", "chair_i"), True),
    ("companion halluc.", ("chair", "companion_hallucination", "rate"), True),
    ("exact captions", ("chair", "exact_caption"), False),
    ("POPE F1 adversarial", ("pope", "adversarial", "f1"), False),
    ("POPE F1 popular", ("pope", "popular", "f1"), False),
    ("POPE F1 random", ("pope", "random", "f1"), False),
]
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (0 for a single value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def _metric(tree: dict, path: tuple) -> float:
    for key in path:
        tree = tree.get(key, {}) if isinstance(tree, dict) else {}
    return float(tree) if isinstance(tree, (int, float)) else math.nan


def summarize(reports: dict[str, list[dict]]) -> dict:
    """{variant: {metric: {base, aligned, delta: (mean, ci)}}} from each run's report.json."""
    out = {}
    for variant, runs in reports.items():
        rows = {}
        for label, path, lower in METRICS:
            base = [_metric(r["eval"]["base"], path) for r in runs]
            aligned = [_metric(r["eval"]["aligned"], path) for r in runs]
            rows[label] = {"base": mean_ci(base), "aligned": mean_ci(aligned),
                           "delta": mean_ci([a - b for a, b in zip(aligned, base, strict=True)]),
                           "lower_is_better": lower, "seeds": len(runs)}
        out[variant] = rows
    return out


def format_summary(summary: dict, images: int) -> str:
    variants = list(summary)
    head = "| metric | base | " + " | ".join(f"{v}" for v in variants) + " |"
    lines = [f"Aligned vs its SFT base on {images} held-out images; mean ± 95% CI over "
             f"{next(iter(summary.values()))['CHAIR_s']['seeds']} seeds (Δ = aligned − base).", "",
             head, "|---|---:|" + "---:|" * len(variants)]
    for label, _, _ in METRICS:
        base = summary[variants[0]][label]["base"]
        cells = []
        for v in variants:
            (a, ci), (d, _) = summary[v][label]["aligned"], summary[v][label]["delta"]
            cells.append(f"{a:.3f} ± {ci:.3f} ({d:+.3f})")
        lines.append(f"| {label} | {base[0]:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs/effect.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a run config with sft.enabled (e.g. configs/tiny.yaml)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated, e.g. 0,1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--prefix", default="effect", help="run names start with this")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    try:
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise ConfigError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
        cfg = load_config(args.config, args.overrides)
        if not cfg.sft.enabled or not cfg.eval.enabled:
            raise ConfigError("jobs/effect.py compares a fine-tuned base with its aligned model: "
                              "the config needs sft.enabled=true and eval.enabled=true")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    common = ["--config", args.config, *args.overrides]
    base_run = f"{args.prefix}-base"
    if job.main([*common, f"run_name={base_run}"], stages=job.STAGES[:1]) != 0:
        return 1
    base_model = storage.join(storage.absolute(cfg.storage_path), base_run, "sft", "model")

    # The base is the same model on the same images (greedy): the first run scores it, the others reuse it.
    reports: dict[str, list[dict]] = {}
    base_metrics = None
    for variant in variants:
        for seed in seeds:
            run_name = f"{args.prefix}-{variant}-s{seed}"
            overrides = [*args.overrides, "sft.enabled=false", f"model.name_or_path={base_model}",
                         f"run_name={run_name}", f"seed={seed}", f"negatives.seed={seed}", f"train.seed={seed}",
                         f"eval.base={str(base_metrics is None).lower()}", *VARIANTS[variant]]
            if job.main(["--config", args.config, *overrides]) != 0:
                return 1
            report = json.loads(storage.read_text(
                storage.join(storage.absolute(cfg.storage_path), run_name, "report.json")))
            if base_metrics is None:
                base_metrics = report["eval"]["base"]
            report["eval"]["base"] = base_metrics
            reports.setdefault(variant, []).append(report)

    summary = summarize(reports)
    table = format_summary(summary, cfg.eval.num_images)
    out = storage.join(storage.absolute(cfg.storage_path), args.prefix)
    storage.write_text(storage.join(out, "effect.json"), json.dumps(
        {"config": args.config, "overrides": args.overrides, "seeds": seeds, "base_model": base_model,
         "summary": summary}, indent=2))
    storage.write_text(storage.join(out, "effect.md"), table + "\n")
    print("\n" + table + f"\n\nwritten: {out}/effect.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
