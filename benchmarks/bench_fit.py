"""Fixed cost of a training run: what our training stages cost on the tiny model, where the steps themselves
are almost free, against a Ray Train run that does nothing, side by side on one local cluster.

- bare: a Ray Train fit (``TorchTrainer``, 2 workers) of a function that returns at once: the controller and
  two worker processes started, torch's process group set up, the run torn down;
- sft: our sft stage, 2 steps (its data read on Ray Data, DeepSpeed ZeRO-0, a checkpoint, the export);
- dpo: our train stage, 3 steps (ZeRO-3, LoRA, precomputed reference log-probs; its pairs prepared once).

Interleaved, ``--repeats`` times each; the median, and its ratio to bare's. Every job pays this once per
training run, and the test suite once per training test.

    python benchmarks/bench_fit.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))  # as the Makefile
# Ray Train's controller polls its workers every 2 s by default; the test suite polls every 0.5 s (tests/conftest.py).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

from common import save, table  # noqa: E402

# The tiny settings the whole-job tests use (tests/test_job.py).
SMALL = ["data.synthetic.num_images=8", "negatives.weakening.sampling.max_new_tokens=8", "negatives.truncated=keep",
         "eval.enabled=false", "rounds=1", "sft.max_steps=2", "sft.data.synthetic.num_images=8",
         "sft.per_device_batch_size=4", "train.max_steps=3"]


def _nothing(config: dict) -> None:
    return None


def bare(storage: Path, name: str) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = time.perf_counter()
    TorchTrainer(_nothing, scaling_config=ScalingConfig(num_workers=2),
                 run_config=RunConfig(storage_path=str(storage), name=name)).fit()
    return time.perf_counter() - started


def config(root: Path, *extra: str):
    from bpo_ray.config import load_config

    return load_config(ROOT / "configs" / "tiny.yaml",
                       [*SMALL, f"storage_path={root}", f"cache_dir={root / 'cache'}", *extra])


def sft(root: Path, name: str) -> float:
    """A fresh run directory each time: the stage trains from the start."""
    from bpo_ray.pipeline import run_stages

    cfg = config(root, f"run_name={name}")
    started = time.perf_counter()
    run_stages(cfg, until="sft")
    return time.perf_counter() - started


def dpo(cfg) -> float:
    """The train stage again on the same scored pairs, its checkpoints removed so it trains from the start."""
    from bpo_ray.pipeline import RunDir, run_stages

    shutil.rmtree(RunDir.for_config(cfg).checkpoints, ignore_errors=True)
    started = time.perf_counter()
    run_stages(cfg, until="train", only_stage="train", force=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import ray

    from bpo_ray.pipeline import run_stages

    root = Path(tempfile.mkdtemp(prefix="bench-fit-"))
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    try:
        cfg = config(root, "run_name=dpo", "sft.enabled=false")
        run_stages(cfg, until="reference")  # the pairs and their reference log-probs, once
        seconds: dict[str, list[float]] = {"bare": [], "sft": [], "dpo": []}
        for i in range(args.repeats):
            seconds["bare"].append(bare(root / "bare", f"bare-{i}"))
            seconds["sft"].append(sft(root, f"sft-{i}"))
            seconds["dpo"].append(dpo(cfg))
            print({k: round(v[-1], 2) for k, v in seconds.items()}, flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)

    base = statistics.median(seconds["bare"])
    what = {"bare": "Ray Train fit of a function that returns at once", "sft": "our sft stage, 2 steps",
            "dpo": "our train stage (DPO), 3 steps"}
    rows = [[name, what[name], statistics.median(s), min(s), max(s), statistics.median(s) / base,
             statistics.median(s) - base] for name, s in seconds.items()]
    markdown = table(f"A training run's fixed cost: 2 workers, tiny LLaVA, {args.repeats} runs each, interleaved "
                     f"(Ray Train polls every {os.environ['RAY_TRAIN_HEALTH_CHECK_INTERVAL_S']} s)",
                     ["run", "what", "median s", "min s", "max s", "median / bare", "median − bare s"], rows)
    save("fit", {"repeats": args.repeats, "seconds": seconds}, markdown)


if __name__ == "__main__":
    main()
