"""BPO end to end: the stage table and the job that runs it, reading top to bottom. The work lives in the
library (``bpo_ray.data``, ``negatives``, ``train``, ``eval``); ``jobs/bpo.py`` (what ``ray job submit`` runs)
and ``bpo run`` both call ``main``.

Stages whose outputs are complete in the run directory (``storage_path/run_name``, local or ``s3://``/``gs://``)
are skipped, so a crashed or cancelled job resumes where it stopped (training from its latest checkpoint).

    sft        (when sft.enabled) fine-tune the base that BPO aligns       → sft/  (skipped when finished)
    data       read + validate records (Ray Data)                      → data/
    negatives  weakened-image answers + injected errors → pairs         → negatives/
    reference  reference-model log-probs of every pair (Ray Data)      → reference/
    train      DPO on Ray Train × DeepSpeed ZeRO-3, export             → train/ checkpoints/ model/
    eval       serve base and aligned (Ray Serve), POPE + CHAIR over HTTP → eval/
    report     training curves and the base-vs-aligned table           → report.json report.md plots/
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from bpo_ray.config import ConfigError, load_config
from bpo_ray.data.stage import run_data
from bpo_ray.eval.run import run_eval
from bpo_ray.models.loader import resolve_model_path
from bpo_ray.negatives.stage import run_negatives
from bpo_ray.report import format_table, headline, run_report
from bpo_ray.runtime import init_ray, setup_logging
from bpo_ray.stages import Pipeline, RunDir, summary
from bpo_ray.train.sft import run_sft
from bpo_ray.train.stage import run_reference, run_train

log = logging.getLogger("bpo_ray.job")

# (stage, function, config sections it reads), in order.
STAGES = [
    ("sft", run_sft, ("model", "sft")),
    ("data", run_data, ("data",)),
    ("negatives", run_negatives, ("model", "negatives")),
    ("reference", run_reference, ("model", "train")),
    ("train", run_train, ("model", "train")),
    ("eval", run_eval, ("model", "serve", "eval")),
    ("report", run_report, ()),
]


def parse_args(argv: list[str] | None, stages: list, prog: str = "bpo run") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config YAML (default: the embedded tiny default)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-5")
    stage_names = [name for name, _, _ in stages]
    parser.add_argument("--from-stage", choices=stage_names, help="run this stage and the ones after it")
    parser.add_argument("--only-stage", choices=stage_names, help="run just this stage")
    parser.add_argument("--force", action="store_true", help="re-run selected stages even if finished")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, stages: list | None = None, prog: str = "bpo run") -> int:
    """``stages``: a prefix of STAGES (``bpo train`` stops after training)."""
    stages = STAGES if stages is None else stages
    setup_logging()
    args = parse_args(argv, stages, prog)
    try:  # every config problem surfaces here, before Ray starts
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if "runtime_resources" in os.getcwd() and not (cfg.storage_path.startswith("/") or "://" in cfg.storage_path):
        log.warning("storage_path %r is relative to this job's uploaded working directory; set an absolute "
                    "path or a cloud URI so results outlive the job and a resubmission resumes", cfg.storage_path)
    run = RunDir.for_config(cfg)
    log.info("resolved config (saved to %s):\n%s", run.save_config(cfg), cfg.to_yaml())

    init_ray(cfg.resources)
    # Tiny models (tiny://...) are built once into cache_dir; real ones resolve to their hub id or path.
    base = resolve_model_path(cfg.model.name_or_path, cfg.cache_dir)
    log.info("policy model: %s%s", base, f" (fine-tuned into {run.path('sft', 'model')} first)" if cfg.sft.enabled else "")

    pipeline = Pipeline(cfg, run, order=[name for name, _, _ in stages], from_stage=args.from_stage,
                        only_stage=args.only_stage, force=args.force)
    for name, fn, sections in stages:
        pipeline.stage(name, fn, sections)

    print(f"\nrun directory: {run.root}")
    print(summary(pipeline.manifests))
    if report := pipeline.manifests.get("report", {}).get("report"):
        if rows := pipeline.manifests["report"].get("comparison"):
            print("\nbase vs aligned (held-out images):\n" + format_table(headline(rows)))
        print(f"\nreport: {report}")
    return 0


def stages_until(last: str, stages: list | None = None) -> list:
    """STAGES up to and including ``last`` (``bpo train`` runs sft … train)."""
    stages = STAGES if stages is None else stages
    return stages[: [name for name, _, _ in stages].index(last) + 1]
