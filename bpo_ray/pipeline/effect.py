"""Does BPO make the model more grounded? Base vs aligned over several seeds, with ablations.

    python jobs/effect.py --config configs/tiny.yaml [--seeds 0,1,2] [--variants both,injection,...] [key=value ...]
    make effect

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
import sys

from bpo_ray import storage
from bpo_ray.config import PAPER_BPO, ConfigError, add_config_args, literal_override, load_config
from bpo_ray.eval.sweep import format_summary, summarize
from bpo_ray.pipeline import job
from bpo_ray.pipeline.rundir import RunDir

PAPER = list(PAPER_BPO)


def _existence(balance: str) -> list[str]:
    return ["rounds=1", "negatives.existence.enabled=true", f"negatives.existence.balance={balance}"]


# name → overrides on top of the config: the paper's BPO (both kinds of negatives, one round) and ablations of
# it, then the grounding options alone and combined.
VARIANTS = {
    "both": PAPER,
    "injection": [*PAPER, "negatives.weakening.enabled=false"],
    "weakening": [*PAPER, "negatives.injection.enabled=false"],
    "beta0.05": [*PAPER, "train.beta=0.05"],
    "beta0.5": [*PAPER, "train.beta=0.5"],
    "companion-q": [*PAPER, "data.synthetic.companion_questions=1.0"],
    # Grounding yes/no answers (not in the paper): balanced existence pairs, mDPO's anchor and its
    # image-conditional term, and combinations.
    "existence": _existence("existence"),
    "existence-mix": _existence("mix"),
    "existence-errors": _existence("errors"),
    "existence-steer": _existence("steer"),
    "anchor": [*PAPER, "train.anchor_weight=1.0"],
    "existence+anchor": [*_existence("existence"), "train.anchor_weight=1.0"],
    "image": [*PAPER, "train.image_weight=1.0"],
    "existence+image": [*_existence("existence"), "train.image_weight=1.0"],
    "image-crop": [*PAPER, "train.image_weight=1.0", "train.image_distortions=[{kind: crop, strength: 0.85}]"],
    # Bootstrapping: a second round on the model the first aligned; with steered existence pairs, the
    # embedded default.
    "rounds2": ["negatives.existence.enabled=false", "rounds=2"],
    "steer-rounds2": ["negatives.existence.enabled=true", "negatives.existence.balance=steer", "rounds=2"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs/effect.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)  # a run config with sft.enabled: the embedded default has it
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated, e.g. 0,1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--prefix", default="effect", help="run names start with this")
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
    if job.main([*common, f"run_name={base_run}"], until="sft", prog="jobs/effect.py") != 0:
        return 1
    base_model = RunDir.for_config(cfg.model_copy(update={"run_name": base_run})).sft_model

    # The base is the same model on the same images (greedy): the first run scores it, the others reuse it.
    reports: dict[str, list[dict]] = {}
    base_metrics = None
    for variant in variants:
        for seed in seeds:
            run_name = f"{args.prefix}-{variant}-s{seed}"
            overrides = [*args.overrides, "sft.enabled=false", literal_override("model.name_or_path", base_model),
                         f"run_name={run_name}", f"seed={seed}", f"negatives.seed={seed}", f"train.seed={seed}",
                         f"eval.base={str(base_metrics is None).lower()}", *VARIANTS[variant]]
            if job.main(["--config", args.config, *overrides], prog="jobs/effect.py") != 0:
                return 1
            report = json.loads(storage.read_text(RunDir.for_config(cfg.model_copy(update={"run_name": run_name}))
                                                  .report_json))
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

