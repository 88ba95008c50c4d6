"""``bpo``: one command line for every stage. ``bpo <command> --help`` documents each."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bpo_ray.config import ConfigError, add_config_args, literal_override, load_config


def _path(value: str) -> str:
    """A path argument, ``~`` expanded as the config's paths are (a shell leaves ``--out=~/x`` as it is)."""
    return os.path.expanduser(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bpo", description="Bootstrapped Preference Optimization on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser("make-tiny", help="build a tiny random model (+ tokenizer trained here) and save it")
    p.add_argument("--arch", required=True, choices=["llava", "qwen2_vl", "llm"])
    p.add_argument("--out", type=_path, required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("make-data", help="write the synthetic shapes dataset (LLaVA format + truth)")
    p.add_argument("--out", type=_path, required=True, help="output directory")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--max-objects", type=int, default=3)
    p.add_argument("--cooccurrence", type=float, default=0.8, help="how often an anchor brings its companion")
    p.add_argument("--anchor-rate", type=float, default=0.0, help="how often an image is built around an anchor")
    p.add_argument("--caption-prior", type=float, default=0.0,
                   help="how often an anchor without its companion is annotated as if it were there")
    p.add_argument("--companion-questions", type=float, default=0.0,
                   help="how often an anchor without its companion is asked about both (yes, no)")
    p.add_argument("--qa-per-image", type=int, default=2)

    p = sub.add_parser("config", help="validate a config and print it resolved (with overrides)")
    add_config_args(p)

    p = sub.add_parser("run", help="run the whole pipeline (the job jobs/bpo.py submits) on local Ray or a cluster")
    add_config_args(p)
    p.add_argument("--from-stage")
    p.add_argument("--only-stage")
    p.add_argument("--force", action="store_true")

    p = sub.add_parser(
        "generate", help="build preference pairs (image weakening + error injection) with Ray Data",
        description="Without --config: the embedded default (the demo's tiny models and settings; its sft stage "
                    "fine-tunes the base first, sft.enabled=false skips that) on a LLaVA-format file "
                    "(bpo generate --data FILE --image-root DIR --out DIR). With --config: everything from it.")
    add_config_args(p)
    p.add_argument("--data", type=_path, help="LLaVA JSON/JSONL (or .parquet) file of records")
    p.add_argument("--image-root", type=_path, help="where the records' relative image paths resolve")
    p.add_argument("--out", type=_path, help="output run directory (default: storage_path/run_name of the config)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, different or unfinished output")

    p = sub.add_parser(
        "sft", help="supervised fine-tuning of the base model (the sft stage) on Ray Train with DeepSpeed",
        description="Runs the sft stage of the config (sft.enabled=true) into its run directory: validates "
                    "sft.data, fine-tunes model.name_or_path, exports sft/model, which later stages align. "
                    "Skipped when finished for the same config.")
    add_config_args(p)

    p = sub.add_parser(
        "train", help="DPO on Ray Train with DeepSpeed ZeRO-3 (runs the stages before it when needed)",
        description="Runs data → negatives → reference → train into the config's run directory, skipping "
                    "finished stages; training resumes from its latest checkpoint. Exports model/. With "
                    "--pairs, trains on existing preference pairs instead of bootstrapping them.")
    add_config_args(p)
    p.add_argument("--pairs", type=_path,
                   help="existing preference pairs (TRL, RLAIF-V or scored-completions layout; .json, .jsonl, "
                        "parquet, a save_to_disk folder or a load_dataset name): train on them alone "
                        "(negatives.extra_pairs with bootstrapping off)")

    p = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP endpoint (Ray Serve) until interrupted",
        description="Serves --model (a directory, hub id or tiny://arch; default: the config's run_dir/model) "
                    "at http://HOST:PORT/v1 with the config's serve section. Ctrl-C / SIGTERM stops it.")
    add_config_args(p)
    p.add_argument("--model", type=_path,
                   help="model to serve (default: the run's exported model, storage_path/run_name/model)")
    p.add_argument("--model-id", help="the name clients pass as `model` (default: serve.model_id)")
    p.add_argument("--host", help="bind address (default: serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: serve.port, 8000)")
    p.add_argument("--engine", choices=["hf", "vllm"], help="default: serve.engine (hf)")

    p = sub.add_parser(
        "eval", help="POPE / CHAIR hallucination evaluation against any OpenAI-compatible endpoint",
        description="POPE (random, popular, adversarial) and CHAIR on held-out synthetic shapes (or --data), "
                    "and POPE on a COCO annotation file when given. Prints the metrics; --out saves them "
                    "with every prediction.")
    add_config_args(p)
    p.add_argument("--endpoint", required=True, help="OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True, help="the model name the endpoint serves")
    p.add_argument("--api-key", help="Bearer key, if the endpoint needs one")
    p.add_argument("--data", type=_path, help="a shapes dataset directory (bpo make-data); default: held-out images "
                                  "generated from the config's eval section")
    p.add_argument("--coco-annotations", type=_path, help="COCO instances JSON for POPE on real images")
    p.add_argument("--coco-image-root", type=_path, help="directory the COCO file names resolve in")
    p.add_argument("--out", type=_path, help="write metrics + predictions JSON here")
    return parser


def _load(config: str | None, overrides: list[str]):
    """The config, or None after saying what is wrong with it (the command then exits 2, before Ray)."""
    try:
        return load_config(config, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return None


def pairs_overrides(path: str) -> list[str]:
    """``bpo train --pairs PATH``: the existing pairs alone, nothing bootstrapped (so one round: a second would
    train on the same pairs again)."""
    return [literal_override("negatives.extra_pairs.path", path), "negatives.weakening.enabled=false",
            "negatives.injection.enabled=false", "negatives.existence.enabled=false", "rounds=1"]


def generate_overrides(data: str | None, image_root: str | None, out: str | None) -> list[str]:
    """``bpo generate --data FILE --image-root DIR --out DIR``: local paths made absolute, URIs as given (the
    output's parent is the storage path, its name the run's). Records from a file carry no object truth to
    ask existence questions about (the bundled shapes do): those pairs are off unless the overrides after these
    turn them on with ``negatives.existence.annotations``."""
    from bpo_ray import storage

    overrides = []
    if data:
        fmt = "parquet" if data.endswith(".parquet") else "llava_json"
        overrides += [f"data.format={fmt}", literal_override("data.path", storage.absolute(data)),
                      "negatives.existence.enabled=false"]
        if image_root:
            overrides.append(literal_override("data.image_root", storage.absolute(image_root)))
    if out:
        storage_path, _, run_name = storage.absolute(out).rstrip("/").rpartition("/")
        overrides += [literal_override("storage_path", storage_path), literal_override("run_name", run_name)]
    return overrides


def _run_job(flags: list[str], overrides, until: str | None = None, prog: str = "bpo run") -> int:
    """Run the pipeline's job, optionally only up to a stage."""
    from bpo_ray.pipeline import main as job_main

    return job_main([*flags, *overrides], until=until, prog=prog)


def _generate(args) -> int:
    """Data + negatives stages into one run directory; refuses to touch a different output unless asked."""
    from bpo_ray import storage
    from bpo_ray.pipeline import MissingInputs, Pipeline, RunDir, stages_until
    from bpo_ray.pipeline.summary import summary
    from bpo_ray.runtime import init_ray, setup_logging

    setup_logging()
    cfg = _load(args.config, [*generate_overrides(args.data, args.image_root, args.out), *args.overrides])
    if cfg is None:
        return 2
    run = RunDir.for_config(cfg)
    stages = stages_until("negatives")
    pipeline = Pipeline(cfg, run, stages, force=args.overwrite)
    existing = [s.name for s in stages if storage.exists(run.stage_dir(s.name))]
    pending = pipeline.pending()  # all of them with --overwrite
    if existing and not args.overwrite and pending:
        print(f"error: {run.root} already holds different or unfinished output ({', '.join(existing)}); "
              "pass --overwrite to replace it", file=sys.stderr)
        return 2
    try:  # before Ray starts
        pipeline.check_inputs(pending)
    except MissingInputs as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run.save_config(cfg)
    if pending:  # nothing to run: no need to start Ray
        init_ray(cfg.resources)
    pipeline.run_all()
    print(f"\npairs: {run.pairs}")
    print(summary(pipeline.manifests, run))
    return 0


def _serve(args) -> int:
    from bpo_ray import storage
    from bpo_ray.models.loader import resolve_model_path
    from bpo_ray.pipeline import RunDir
    from bpo_ray.serve.launch import serve_until_stopped

    overrides = list(args.overrides)
    for flag in ("host", "port", "engine", "model_id"):
        if getattr(args, flag) is not None:
            overrides.append(literal_override(f"serve.{flag}", getattr(args, flag)))
    cfg = _load(args.config, overrides)
    if cfg is None:
        return 2
    if args.model:
        path = resolve_model_path(args.model, cfg.cache_dir)
    else:
        path = RunDir.for_config(cfg).at_round(cfg.rounds).model  # the last bootstrapping round's
        if not storage.exists(path):
            print(f"error: no --model given and {path} does not exist (train first, or pass --model)",
                  file=sys.stderr)
            return 2
    if not storage.is_uri(path) and Path(path).exists():
        path = str(Path(path).absolute())
    return serve_until_stopped(cfg, path)


def _eval(args) -> int:
    import json

    from bpo_ray.eval.client import Endpoint
    from bpo_ray.eval.evaluate import evaluate, heldout_dir

    overrides = list(args.overrides)
    # Only the flags given: an absent one written as an override would be the string "None".
    if args.coco_annotations:
        overrides.append(literal_override("eval.coco_annotations", args.coco_annotations))
    if args.coco_image_root:
        overrides.append(literal_override("eval.coco_image_root", args.coco_image_root))
    cfg = _load(args.config, overrides)
    if cfg is None:
        return 2
    dataset = Path(args.data) if args.data else heldout_dir(cfg)
    if not (dataset / "truth.jsonl").is_file():
        print(f"error: {dataset} is not a shapes dataset (no truth.jsonl; make one with bpo make-data)",
              file=sys.stderr)
        return 2
    try:
        metrics, rows = evaluate(Endpoint(args.endpoint.rstrip("/"), args.model, args.api_key), cfg, dataset)
    except ValueError as err:  # e.g. an unreadable COCO file
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps({"metrics": metrics, "predictions": rows}, indent=1))
    failed = sum(r["error"] is not None for r in rows)
    if failed:
        print(f"warning: {failed} of {len(rows)} requests failed (see the predictions' error field)", file=sys.stderr)
    return 1 if failed == len(rows) else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "make-tiny":
        from bpo_ray.models.tiny import make_tiny

        print(make_tiny(args.arch, args.out, seed=args.seed))
        return 0
    if args.command == "make-data":
        from bpo_ray.data.synthetic import write_dataset

        out = write_dataset(args.out, num_images=args.num_images, seed=args.seed, image_size=args.image_size,
                            max_objects=args.max_objects, cooccurrence=args.cooccurrence, anchor_rate=args.anchor_rate,
                            caption_prior=args.caption_prior, companion_questions=args.companion_questions,
                            qa_per_image=args.qa_per_image)
        print(out)
        return 0
    if args.command == "config":
        cfg = _load(args.config, args.overrides)
        if cfg is None:
            return 2
        print(cfg.to_yaml(), end="")
        return 0
    if args.command == "generate":
        return _generate(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "sft":
        cfg = _load(args.config, args.overrides)
        if cfg is None:
            return 2
        if not cfg.sft.enabled:
            print("error: sft.enabled is false in this config; set it (e.g. bpo sft --config C sft.enabled=true) so "
                  "that later stages of the same run align the fine-tuned model", file=sys.stderr)
            return 2
        return _run_job(["--config", args.config], args.overrides, until="sft", prog="bpo sft")
    if args.command == "train":
        overrides = list(args.overrides)
        if args.pairs:
            overrides = [*pairs_overrides(args.pairs), *overrides]
        return _run_job(["--config", args.config], overrides, until="train", prog="bpo train")
    if args.command == "run":
        flags = [f"--config={args.config}"] + (["--force"] if args.force else [])
        for flag in ("from_stage", "only_stage"):
            if getattr(args, flag):
                flags.append(f"--{flag.replace('_', '-')}={getattr(args, flag)}")
        return _run_job(flags, args.overrides)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
