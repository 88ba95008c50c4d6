"""BPO end to end: the stage table and the job that runs it, reading top to bottom. Each stage is a thin
module here (``bpo_ray.pipeline.<stage>``) wiring library code (``bpo_ray.data``, ``negatives``, ``train``,
``eval``, ``serve``) to Ray; ``jobs/bpo.py`` (what ``ray job submit`` runs) and ``bpo run`` both call
``main``, and ``run_stages`` is the same loop for code (the CLI, the effect sweep, benchmarks, tests).

Stages whose outputs are complete in the run directory (``storage_path/run_name``, local or ``s3://``/``gs://``)
are skipped, so a crashed or cancelled job resumes where it stopped (training from its latest checkpoint).

    sft        (when sft.enabled) fine-tune the base that BPO aligns       → sft/  (skipped when finished)
    data       read + validate records (Ray Data)                      → data/
    negatives  weakened-image answers + injected errors → pairs         → negatives/
    reference  reference-model log-probs of every pair (Ray Data)      → reference/
    train      DPO on Ray Train × DeepSpeed ZeRO-3, export             → train/ checkpoints/ model/
    eval       serve base and aligned (Ray Serve), POPE + CHAIR over HTTP → eval/
    report     training curves and the base-vs-aligned table           → report.json report.md plots/

With ``rounds: N`` (bootstrapping), negatives → reference → train run again for rounds 2 … N before eval,
each on the model the round before aligned (``round-<k>/``); eval compares the base with the last round's.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence

from bpo_ray.config import ConfigError, RunConfig, add_config_args, load_config
from bpo_ray.eval.compare import format_table, headline
from bpo_ray.models.loader import resolve_model_path
from bpo_ray.pipeline import data, inputs, negatives, reference, report, sft, train
from bpo_ray.pipeline import eval as evaluation
from bpo_ray.pipeline.rundir import RunDir, round_prefix, split_stage_name
from bpo_ray.pipeline.runner import MissingInputs, Pipeline, Stage
from bpo_ray.pipeline.summary import summary
from bpo_ray.runtime import init_ray, setup_logging
from bpo_ray.train.worker import TRAINING_LOG

log = logging.getLogger("bpo_ray.job")

# In order; ``reads``: the config sections or fields a stage's output depends on (with its upstream's output);
# ``inputs``: the paths from outside the run directory it opens, looked for before Ray starts.
STAGES = (
    Stage("sft", sft.run, reads=("model", "sft"), keep=TRAINING_LOG, inputs=inputs.sft),
    Stage("data", data.run, reads=("data",), inputs=inputs.data),
    Stage("negatives", negatives.run, reads=("model", "negatives"), inputs=inputs.negatives),
    Stage("reference", reference.run, reads=reference.READS, read_before=(("model", "train"),), inputs=inputs.policy),
    Stage("train", train.run, reads=("model", "train"), keep=TRAINING_LOG, inputs=inputs.policy),
    Stage("eval", evaluation.run, reads=("model", "serve", "eval"), inputs=inputs.evaluation),
    Stage("report", report.run, reads=()),
)


ROUND_STAGES = ("negatives", "reference", "train")  # what a bootstrapping round repeats


def stages_for(rounds: int, stages: Sequence[Stage] = STAGES) -> tuple[Stage, ...]:
    """The stage table of a run with ``rounds`` bootstrapping rounds: rounds 2 … N repeat negatives →
    reference → train (``round-<k>/negatives``, …) after round 1's, and the stages after training (eval,
    report) read the last round's model."""
    last = max(i for i, s in enumerate(stages) if s.name in ROUND_STAGES)
    again = [dataclasses.replace(s, name=f"{round_prefix(k)}/{s.name}", round=k)
             for k in range(2, rounds + 1) for s in stages if s.name in ROUND_STAGES]
    after = [dataclasses.replace(s, round=rounds) for s in stages[last + 1:]]
    return (*stages[:last + 1], *again, *after)


def stages_until(last: str, stages: Sequence[Stage] = STAGES) -> tuple[Stage, ...]:
    """The stages up to and including ``last``: a later round's stage by its name (``round-2/train``, as
    ``--from-stage`` takes it), or a bare name in its last round (``train``: ``bpo train`` runs every round's)."""
    names = [s.name for s in stages]
    if last in names and split_stage_name(last)[0] > 1:
        return tuple(stages[: names.index(last) + 1])
    kinds = [split_stage_name(name)[1] for name in names]
    if last not in kinds:
        raise ValueError(f"unknown stage {last!r}; stages are: {', '.join(names)}")
    return tuple(stages[: len(kinds) - kinds[::-1].index(last)])


def run_stages(cfg: RunConfig, *, until: str | None = None, from_stage: str | None = None,
               only_stage: str | None = None, force: bool = False, stages: Sequence[Stage] = STAGES) -> dict[str, dict]:
    """Run the stages (up to ``until``; with ``cfg.rounds`` rounds) in ``cfg``'s run directory on the Ray
    cluster this process is connected to; every stage's manifest by name."""
    stages = stages_for(cfg.rounds, stages)
    chosen = stages_until(until, stages) if until else stages
    pipeline = Pipeline(cfg, RunDir.for_config(cfg), chosen, from_stage=from_stage, only_stage=only_stage, force=force)
    pipeline.check_inputs()
    return pipeline.run_all()


def parse_args(argv: list[str] | None, stages: Sequence[Stage], prog: str = "bpo run") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    names = ", ".join(s.name for s in stages)
    parser.add_argument("--from-stage", metavar="STAGE",
                        help=f"run this stage and the ones after it ({names}; round-<k>/<stage> for rounds ≥ 2)")
    parser.add_argument("--only-stage", metavar="STAGE", help="run just this stage")
    parser.add_argument("--force", action="store_true", help="re-run selected stages even if finished")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, until: str | None = None, prog: str = "bpo run") -> int:
    """``until``: the last stage to run (``bpo train`` stops after training)."""
    setup_logging()
    args = parse_args(argv, stages_until(until) if until else STAGES, prog)
    try:  # every config problem surfaces here, before Ray starts
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if "runtime_resources" in os.getcwd() and not (cfg.storage_path.startswith("/") or "://" in cfg.storage_path):
        log.warning("storage_path %r is relative to this job's uploaded working directory; set an absolute "
                    "path or a cloud URI so results outlive the job and a resubmission resumes", cfg.storage_path)
    stages = stages_for(cfg.rounds, STAGES)
    stages = stages_until(until, stages) if until else stages
    try:
        pipeline = Pipeline(cfg, RunDir.for_config(cfg), stages, from_stage=args.from_stage,
                            only_stage=args.only_stage, force=args.force)
    except ValueError as err:  # an unknown stage name
        print(f"error: {err}", file=sys.stderr)
        return 2
    run = pipeline.run
    try:  # before Ray starts: what the stages to run open exists, and the run directory can be reached
        pending = pipeline.pending()
        pipeline.check_inputs(pending)
        log.info("resolved config (saved to %s):\n%s", run.save_config(cfg), cfg.to_yaml())
    except MissingInputs as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: the run directory {run.root} cannot be reached: {err}", file=sys.stderr)
        return 2

    if pending:  # nothing to run (all finished for these inputs, or not selected): no Ray needed
        init_ray(cfg.resources)
        # Tiny models (tiny://...) are built once into cache_dir; real ones resolve to their hub id or path.
        base = resolve_model_path(cfg.model.name_or_path, cfg.cache_dir)
        log.info("policy model: %s%s", base, f" (fine-tuned into {run.sft_model} first)" if cfg.sft.enabled else "")
    pipeline.run_all()

    print(f"\nrun directory: {run.root}")
    print(summary(pipeline.manifests, run))
    if "report" in pipeline.manifests.get("report", {}):
        if rows := pipeline.manifests["report"].get("comparison"):
            print("\nbase vs aligned (held-out images):\n" + format_table(headline(rows)))
        print(f"\nreport: {run.report_md}")
    return 0

