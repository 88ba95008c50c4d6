"""Training benchmark, in one run on the same pairs:
- DPO samples/s and peak memory per worker: our train stage (Ray Train × DeepSpeed ZeRO-3, 2 workers)
  against TRL's ``DPOTrainer`` (torchrun, 2 processes, DDP over gloo) with the same model, pairs, batch size
  and steps, full fine-tuning, no activation checkpointing on either side;
- ZeRO-3 model-state memory per worker with 1 and with 2 workers;
- precomputed reference log-probs (our default) against a live reference model (what TRL does for VLMs);
- our ZeRO-0 step without Ray (``ds_dpo.py``: the same engine, batches and loss under torchrun, as TRL is
  launched): how much of the difference to TRL is the step, and how much the runtime around it.

    python benchmarks/bench_train.py [--models tiny,small] [--steps 16] [--images 24]

Samples/s is samples over the total time of the steps after the first few (start-up excluded on every side),
the harmonic mean of per-step rates; peak memory is
each worker's peak resident set (CPU). TRL is installed only for benchmarks (``make bench`` puts it in
``.cache/bench-site``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from common import models, parameters, save, table  # noqa: E402

BENCH_SITE = Path(__file__).resolve().parents[1] / ".cache" / "bench-site"
WARMUP = 3


def config(root: Path, model: Path, images: int, steps: int, *extra: str):
    from bpo_ray.config import PAPER_BPO, load_config

    return load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml", [*PAPER_BPO,
        f"storage_path={root}", f"cache_dir={root / 'cache'}", f"model.name_or_path={model}", "sft.enabled=false",
        f"data.synthetic.num_images={images}", "negatives.weakening.enabled=false", "eval.enabled=false",
        "train.lora.enabled=false", "train.freeze_vision_tower=false", "train.gradient_checkpointing=false",
        "train.per_device_batch_size=4", f"train.max_steps={WARMUP + steps}", "train.epochs=100",
        f"train.checkpoint_every={10 * (WARMUP + steps)}", "train.lr=5e-4", *extra])


def prepare(cfg):
    """The job's own stages up to the scored pairs, so the benchmark trains on what a run would."""
    from bpo_ray.pipeline import RunDir, run_stages

    run_stages(cfg, until="reference")  # sft is off here: it is skipped
    return RunDir.for_config(cfg)


def ours(cfg, run) -> dict:
    from bpo_ray import storage
    from bpo_ray.pipeline import run_stages

    for path in (run.model, run.checkpoints):  # a fresh run each time, never a resumed one
        storage.remove_dir(path)
    run_stages(cfg, until="train", only_stage="train", force=True)
    steps = run.read_training_log("train")[WARMUP:]
    # Samples over the measured steps' total time (the harmonic mean of per-step rates): what the clocks of
    # TRL and of the no-Ray run measure, and a stall in one step counts, as it does in wall-clock time.
    return {"samples_per_second": statistics.harmonic_mean([m["samples_per_second"] for m in steps]),
            "peak_memory_gib": max(m["peak_memory_gib"] for m in steps),
            "model_state_gib": steps[-1]["model_state_gib"]}


def torchrun(script: str, args: list[str], site: str = "") -> dict:
    """2 processes of ``script`` under torchrun; its rank-0 samples/s and the peak memory of either rank."""
    with tempfile.TemporaryDirectory() as out:
        launcher = Path(sys.executable).parent / "torchrun"
        done = subprocess.run(
            [str(launcher), "--nproc_per_node=2", "--master_port=29533", str(Path(__file__).parent / script), *args,
             "--out", out],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": f"{site}:{os.environ.get('PYTHONPATH', '')}"},
            timeout=1800)
        if done.returncode != 0:
            return {"error": done.stderr[-2000:]}
        ranks = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]
    return {"samples_per_second": ranks[0]["samples_per_second"],
            "peak_memory_gib": max(r["peak_memory_gib"] for r in ranks)}


def no_ray(cfg, run, steps: int) -> dict:
    """Our DeepSpeed step without Ray (benchmarks/ds_dpo.py under torchrun): what the runtime around it costs."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        f.write(cfg.model_dump_json())
        f.flush()
        return torchrun("ds_dpo.py", ["--config", f.name, "--pairs", run.scored_pairs,
                                      "--steps", str(steps), "--warmup", str(WARMUP)])


def trl(model: Path, run, steps: int) -> dict:
    if not (BENCH_SITE / "trl").is_dir():
        return {"error": f"TRL is not installed in {BENCH_SITE} (make bench installs it)"}
    return torchrun("trl_dpo.py", ["--model", str(model), "--pairs", run.scored_pairs, "--batch", "4",
                                   "--steps", str(steps), "--warmup", str(WARMUP)], site=str(BENCH_SITE))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,small")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--images", type=int, default=24)
    args = parser.parse_args()

    import ray

    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    built = models(root / "models")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    results, rows_speed, rows_zero, rows_stage = {}, [], [], []
    try:
        for name in [m.strip() for m in args.models.split(",")]:
            model = built[name]
            base = config(root / name, model, args.images, args.steps)
            run = prepare(base)
            r = {
                "ours_2w": ours(base, run),
                "ours_1w": ours(config(root / name, model, args.images, args.steps, "train.num_workers=1"), run),
                "ours_2w_live": ours(config(root / name, model, args.images, args.steps, "train.reference=live"), run),
                # ZeRO stage 0 (plain data parallel, as TRL under torchrun): what ZeRO-3's sharding costs
                "ours_2w_zero0": ours(zero0 := config(root / name, model, args.images, args.steps, "train.zero_stage=0"),
                                      run),
                "no_ray_zero0": no_ray(zero0, run, args.steps),
                "trl_2p": trl(model, run, args.steps),
            }
            results[name] = {"params": parameters(model), **r}
            trl_r = r["trl_2p"]
            speed = [name, r["ours_2w"]["samples_per_second"], r["ours_2w_live"]["samples_per_second"],
                     trl_r.get("samples_per_second", float("nan")), r["ours_2w"]["peak_memory_gib"],
                     r["ours_2w_live"]["peak_memory_gib"], trl_r.get("peak_memory_gib", float("nan"))]
            speed += [speed[1] / speed[3], speed[2] / speed[3], speed[4] / speed[6], speed[5] / speed[6]]
            rows_speed.append(speed)
            zero0, bare = r["ours_2w_zero0"], r["no_ray_zero0"].get("samples_per_second", float("nan"))
            rows_stage.append([name, r["ours_2w"]["samples_per_second"], zero0["samples_per_second"], bare,
                               trl_r.get("samples_per_second", float("nan")), zero0["peak_memory_gib"],
                               zero0["samples_per_second"] / speed[3], zero0["peak_memory_gib"] / speed[6],
                               bare / speed[3], zero0["samples_per_second"] / bare])
            rows_zero.append([name, r["ours_1w"]["model_state_gib"], r["ours_2w"]["model_state_gib"],
                              r["ours_2w"]["model_state_gib"] / r["ours_1w"]["model_state_gib"],
                              r["ours_1w"]["samples_per_second"], r["ours_2w"]["samples_per_second"]])
    finally:
        ray.shutdown()
    markdown = "\n\n".join([
        table("DPO on 2 CPU workers: ours (Ray Train × DeepSpeed ZeRO-3) vs TRL DPOTrainer (torchrun, DDP)",
              ["model", "ours samples/s", "ours live-ref samples/s", "TRL samples/s", "ours peak GiB",
               "ours live-ref peak GiB", "TRL peak GiB", "ours / TRL speed", "live / TRL speed",
               "ours / TRL memory", "live / TRL memory"], rows_speed),
        table("ZeRO stage: ours with ZeRO-3 vs ZeRO-0 (plain data parallel) vs TRL (DDP); the same ZeRO-0 step "
              "without Ray (torchrun)",
              ["model", "ours ZeRO-3 samples/s", "ours ZeRO-0 samples/s", "ZeRO-0 step without Ray samples/s",
               "TRL samples/s", "ours ZeRO-0 peak GiB", "ZeRO-0 / TRL speed", "ZeRO-0 / TRL memory",
               "without Ray / TRL speed", "Ray Train / without Ray"], rows_stage),
        table("ZeRO-3 model states per worker (weights + grads + AdamW moments of the local partition)",
              ["model", "1 worker GiB", "2 workers GiB", "2 / 1", "1 worker samples/s", "2 workers samples/s"],
              rows_zero)])
    save("train", {"steps": args.steps, "images": args.images, "results": results}, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
