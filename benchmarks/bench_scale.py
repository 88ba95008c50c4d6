"""Scale benchmark: how the pipeline's cost grows with the data, at N = 1K, 10K, 100K samples.

Each N is a LLaVA JSON list (as the paper's data) of N single-turn records, each with its own 336 px JPEG
(shapes drawn on a textured background, ~30–60 KB), run through data → negatives (tiny-LLaVA weakening +
rule injection) → reference scoring, then the training data preparation up to the first batch a worker
would train on (``worker_parts`` and one batch with its images, as ``fit`` hands it over; no DeepSpeed). Each N runs in a fresh process with its own
local Ray cluster, so the driver's peak RSS is that N's.

Per N: seconds per 1K samples, per stage and in all; driver peak RSS; object-store peak (polled each second)
and bytes spilled; run-directory bytes per sample and against the source images' bytes. Ratios against the
previous N of the same run say whether cost is linear (time per sample) and flat (driver memory).

    python benchmarks/bench_scale.py [--sizes 1000,10000,100000] [--max-new-tokens 16]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from common import save, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".cache" / "bench-scale"
IMAGE_SIZE = 336
STAGES = ("data", "negatives", "reference")


def make_dataset(n: int, seed: int = 0) -> Path:
    """``records.json`` + ``images/*.jpg`` for n samples (kept: later runs reuse it)."""
    import numpy as np
    from PIL import Image

    from bpo_ray.data.synthetic import generate

    out = DATA / f"n{n}"
    if (out / "records.json").exists():
        return out
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # Texture: a few noise fields, one blended under each image, so a JPEG weighs what a photo does.
    textures = [Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
                for _ in range(16)]
    records = []
    for index, sample in enumerate(generate(n, seed=seed, image_size=IMAGE_SIZE, max_objects=3, qa_per_image=0)):
        image = Image.blend(sample.image.convert("RGB"), textures[index % len(textures)], 0.12)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        name = f"images/{sample.image_id}.jpg"
        (out / name).write_bytes(buf.getvalue())
        [record] = sample.records
        records.append({**record, "image": name})
    (out / "records.json").write_text(json.dumps(records))
    return out


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class StorePoller:
    """The object store's peak use on this cluster, polled every second (Ray keeps no peak itself)."""

    def __init__(self):
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        self.state = get_state_from_address(ray.get_runtime_context().gcs_address)
        self.reply = lambda: get_memory_info_reply(self.state)
        self.peak, self.stop = 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.wait(1.0):
            self.peak = max(self.peak, self.reply().store_stats.object_store_bytes_used)

    def finish(self) -> dict:
        self.stop.set()
        self.thread.join()
        stats = self.reply().store_stats
        return {"store_peak_bytes": max(self.peak, stats.object_store_bytes_used),
                "spilled_bytes": stats.spilled_bytes_total, "store_capacity_bytes": stats.object_store_bytes_avail}


def one(n: int, max_new_tokens: int, work: Path) -> dict:
    """Run the stages on the n-sample dataset in this process (the driver); what it measured."""
    from bpo_ray.config import PAPER_BPO, load_config
    from bpo_ray.data.images import rows_with_images
    from bpo_ray.pipeline import RunDir, run_stages
    from bpo_ray.raydata import read_parquet, worker_parts
    from bpo_ray.runtime import init_ray
    from bpo_ray.train.fit import ORDER_BY

    source = make_dataset(n)
    shutil.rmtree(work / f"scale-{n}", ignore_errors=True)  # a fresh run: finished stages would be skipped
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"storage_path={work}", f"run_name=scale-{n}", f"cache_dir={ROOT / '.cache' / 'bpo-ray'}",
        "sft.enabled=false", "eval.enabled=false", "data.format=llava_json",
        f"data.path={source / 'records.json'}", f"data.image_root={source}",
        f"negatives.weakening.sampling.max_new_tokens={max_new_tokens}", "negatives.truncated=keep", *PAPER_BPO])
    init_ray(cfg.resources)
    poller = StorePoller()
    started = time.time()
    manifests = run_stages(cfg, until="reference")
    prep_started = time.time()
    run = RunDir.for_config(cfg)
    parts = worker_parts(read_parquet(run.scored_pairs), cfg.train.num_workers, list(ORDER_BY["dpo"]),
                         cfg.train.seed)
    first = next(iter(parts[0].iter_batches(batch_size=cfg.train.per_device_batch_size, batch_format="pandas")))
    rows_with_images(first.to_dict("records"), run.root)  # as a training worker reads its first batch
    ended = time.time()
    store = poller.finish()
    run_root = Path(run.root)
    return {
        "n": n, "pairs": manifests["reference"].get("scored"),
        "seconds": {**{s: manifests[s]["seconds"] for s in STAGES}, "train_prep": round(ended - prep_started, 2),
                    "total": round(ended - started, 2)},
        "driver_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        **store,
        "source_image_bytes": _dir_bytes(source / "images"),
        "run_dir_bytes": {s: _dir_bytes(run_root / s) for s in STAGES},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process: one N
    parser.add_argument("--work", default=str(DATA / "runs"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args.max_new_tokens, Path(args.work))))
        return
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        make_dataset(n)  # outside the timed child
        done = subprocess.run([sys.executable, __file__, "--one", str(n), "--max-new-tokens", str(args.max_new_tokens),
                               "--work", args.work], capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            sys.exit(f"N={n} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))
        print(f"N={n}: {results[-1]['seconds']}", flush=True)
    rows, previous = [], None
    for r in results:
        per_k = 1000 * r["seconds"]["total"] / r["n"]
        run_bytes = sum(r["run_dir_bytes"].values())
        rows.append([r["n"], r["pairs"], round(per_k, 1),
                     *(round(1000 * r["seconds"][s] / r["n"], 1) for s in (*STAGES, "train_prep")),
                     round(per_k / previous[0], 2) if previous else "",
                     round(r["driver_peak_rss_bytes"] / 2**20), round(r["driver_peak_rss_bytes"] / previous[1], 2)
                     if previous else "", round(r["store_peak_bytes"] / 2**20), round(r["spilled_bytes"] / 2**20),
                     round(run_bytes / r["n"] / 1024, 1), round(run_bytes / r["source_image_bytes"], 2)])
        previous = (per_k, r["driver_peak_rss_bytes"])
    markdown = table(
        "Scale: data → negatives → reference → first training batch, per N samples",
        ["N", "pairs", "s / 1K", "data s/1K", "negatives s/1K", "reference s/1K", "train prep s/1K",
         "s/1K vs previous N", "driver peak RSS MiB", "RSS vs previous N", "store peak MiB", "spilled MiB",
         "run dir KiB / sample", "run dir / source images"], rows)
    save("scale", {"results": results}, markdown)


if __name__ == "__main__":
    main()
