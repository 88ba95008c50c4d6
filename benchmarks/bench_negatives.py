"""Negatives benchmark: image-weakening generation, samples/s, in one run on the same samples:
- one sample at a time through ``generate`` in one process (how the authors' script works);
- the raw batched engine in one process (no Ray): what the pipeline could reach at best;
- the real negatives stage (Ray Data: weakening → HF actor pool → pairs), with 1 and with 2 one-CPU
  workers, and with 1 worker that reserves 2 CPUs (and so runs torch on 2 threads).

The stage has a fixed cost (actor start, model load, Ray Data planning, the pairs/errors writes) that a
small run measures more than throughput. So it runs at two sizes, N and ``--scale``·N samples, and reports
both the end-to-end rate at N and the steady-state rate, (scale·N − N) / (T(scale·N) − T(N)), which the
fixed cost cancels out of. The baselines have no such cost (their warm-up is excluded), so they run at N.

    python benchmarks/bench_negatives.py [--images 64] [--scale 8] [--models tiny,small] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from common import models, parameters, save, table  # noqa: E402


def samples(run_dir: str) -> list[dict]:
    import pyarrow.parquet as pq

    from bpo_ray.data.images import rows_with_images

    return rows_with_images(pq.read_table(f"{run_dir}/data/samples").to_pylist(), run_dir)


def in_process(model: Path, rows: list[dict], cfg, batch_size: int) -> float:
    """samples/s of the same weakening + generation without Ray (all cores to torch)."""
    import torch

    from bpo_ray.data.records import decode_image
    from bpo_ray.models.generate import HFEngine, Sampling
    from bpo_ray.negatives import distort
    from bpo_ray.negatives.pairs import IMAGE_WEAKENING, stable_seed

    torch.set_num_threads(os.cpu_count() or 1)
    weak = cfg.negatives.weakening
    engine = HFEngine(str(model))
    sampling = Sampling(weak.sampling.temperature, weak.sampling.top_p, weak.sampling.max_new_tokens)
    distortions = [d.model_dump() for d in weak.distortions]
    engine.generate([json.loads(rows[0]["messages"])], [decode_image(rows[0]["image"])], sampling, [0])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        seeds = [stable_seed(cfg.negatives.seed, IMAGE_WEAKENING, r["sample_id"]) for r in chunk]
        images = [decode_image(distort.weaken_bytes(r["image"], distortions, s)) for r, s in zip(chunk, seeds, strict=True)]
        engine.generate([json.loads(r["messages"]) for r in chunk], images, sampling, seeds)
    return len(rows) / (time.perf_counter() - start)


def pipeline(cfg, workers: int, cpus: int = 1) -> tuple[int, float]:
    """(samples, seconds) of the real stage on the config's data (Ray already up), with ``workers``
    generation actors of ``cpus`` CPUs each (an actor runs torch on as many threads as it reserved)."""
    from bpo_ray.config import validate_config
    from bpo_ray.pipeline import run_stages

    raw = cfg.model_dump(mode="json")
    raw["negatives"]["weakening"]["pool"].update(min_size=workers, max_size=workers, num_cpus=cpus)
    run_cfg = validate_config(raw)
    start = time.perf_counter()
    manifest = run_stages(run_cfg, until="negatives", only_stage="negatives", force=True)["negatives"]
    return manifest["samples_in"], time.perf_counter() - start


def data_config(base: list[str], name: str, images: int):
    """The benchmark config at a data size, with its samples written (one run directory per size)."""
    from bpo_ray.config import load_config
    from bpo_ray.pipeline import RunDir, run_stages

    cfg = load_config(None, [*base, f"data.synthetic.num_images={images}", f"run_name=bench-{name}-{images}"])
    run_stages(cfg, until="data")
    return cfg, RunDir.for_config(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--scale", type=int, default=8, help="the steady-state run has scale × images")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--models", default="tiny,small")
    args = parser.parse_args()

    import ray

    root = Path(tempfile.mkdtemp(prefix="bpo-bench-neg-"))
    paths = models(root)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    rows, results = [], {}
    for name in args.models.split(","):
        base = [f"storage_path={root / 'runs'}", f"cache_dir={root / 'cache'}",
                f"model.name_or_path={paths[name]}", "data.synthetic.qa_per_image=0",
                "negatives.injection.enabled=false",
                f"negatives.weakening.sampling.max_new_tokens={args.max_new_tokens}",
                f"negatives.weakening.pool.batch_size={args.batch_size}"]
        small_cfg, small_run = data_config(base, name, args.images)
        large_cfg, _ = data_config(base, name, args.images * args.scale)
        data = samples(small_run.root)
        one = in_process(paths[name], data, small_cfg, batch_size=1)
        batched = in_process(paths[name], data, small_cfg, batch_size=args.batch_size)
        result = {"parameters": parameters(paths[name]), "samples": len(data), "one_at_a_time": one,
                  "batched_in_process": batched}
        for key, workers, cpus in (("pipeline_1", 1, 1), ("pipeline_2", 2, 1), ("pipeline_1x2cpu", 1, 2)):
            (n_small, t_small), (n_large, t_large) = (pipeline(small_cfg, workers, cpus),
                                                      pipeline(large_cfg, workers, cpus))
            per_sample = (t_large - t_small) / (n_large - n_small)  # steady-state seconds a sample
            result[key] = {"samples": [n_small, n_large], "seconds": [t_small, t_large],
                           "end_to_end": n_small / t_small, "steady": 1 / per_sample,
                           "fixed_seconds": t_small - n_small * per_sample}
        results[name] = result
        p1, p2, p12 = result["pipeline_1"], result["pipeline_2"], result["pipeline_1x2cpu"]
        best = max(p1["steady"], p2["steady"], p12["steady"])
        rows.append([name, len(data), one, batched, p2["end_to_end"], p1["steady"], p2["steady"], p12["steady"],
                     best / one, p12["steady"] / batched, p2["steady"] / p1["steady"], p2["fixed_seconds"]])
    ray.shutdown()
    markdown = table(
        "Negatives (image weakening + generation): samples/s on the same samples",
        ["model", "N", "one-at-a-time", "batched, no Ray", "stage 2 workers, N (end to end)",
         "stage 1 worker, steady", "stage 2 workers, steady", "stage 1 worker × 2 CPUs, steady",
         "best steady / one-at-a-time", "1 worker × 2 CPUs steady / batched", "2 / 1 workers steady",
         "fixed cost s (2 workers)"], rows)
    save("negatives", {"args": vars(args), "results": results}, markdown)


if __name__ == "__main__":
    main()
