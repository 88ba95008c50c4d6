"""DPO on Ray Train with 2 DeepSpeed ZeRO-3 workers on CPU: LoRA and full, LLaVA and Qwen2-VL,
a killed worker, a resumed run, the exported model, and the fixed data each worker trains on."""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import threading
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from bpo_ray import raydata
from bpo_ray.config import PAPER_BPO, load_config
from bpo_ray.models.generate import Sampling, generate
from bpo_ray.pipeline import RunDir, reference, run_stages, train
from bpo_ray.raydata import SORT_ON_DRIVER_MAX_ROWS, order_key, sorts_on_driver, worker_parts
from conftest import REPO, free_ports
from train_checkpoints import recorded_checkpoint

KEY = "0123456789abcdef"  # the stage key these tests train under: checkpoints/train-0123456789ab


def run_train(cfg, run: RunDir) -> dict:
    """The train stage alone, on pairs prepared under another training config (the key is the tests')."""
    return train.run(cfg, run, KEY)


def test_each_worker_trains_on_the_same_rows_however_they_were_written(ray_local):
    """Stages write their tables in parallel, so a rerun reads the same rows in another order and other files
    (and Ray Train's streaming_split would hand blocks to whichever worker asks first). Each worker must still
    get the same rows, in the same blocks, so that it draws the same shuffled batches: a rerun repeats the
    training, and a resume skips exactly the micro-batches already trained on."""
    import ray.data

    # A column all null in some blocks (typed null there), as an unscored reference column can be.
    rows = [{"sample_id": f"s{i:04d}", "answer": f"a{i}", "ref": None if i < 600 else i / 7} for i in range(1203)]
    written_twice = [ray.data.from_items(rows, override_num_blocks=3),
                     ray.data.from_items(random.Random(1).sample(rows, len(rows)), override_num_blocks=7)]

    def seen(dataset, seed=0, on_driver=None):  # each worker's batches, drawn as worker.py draws them
        return [[list(batch["sample_id"]) for batch in part.iter_batches(
            batch_size=16, batch_format="pandas", local_shuffle_buffer_size=64, local_shuffle_seed=5)]
            for part in worker_parts(dataset, 2, ["sample_id"], seed, rows_per_block=100, on_driver=on_driver)]

    assert sorts_on_driver(written_twice[0], len(rows))[0]  # a small table: ordered on the driver
    first, second = (seen(d) for d in written_twice)
    assert first == second
    assert seen(written_twice[1], on_driver=False) == first  # a table too large for the driver: the cluster sorts it alike
    # The parts, in order, are the rows sorted by their seeded hash (the sort's fixed key ranges lose none).
    in_parts = [r["sample_id"] for part in worker_parts(written_twice[1], 2, ["sample_id"], 0, rows_per_block=100)
                for r in part.iter_rows()]
    by_hash = sorted(rows, key=lambda r: order_key(0, f"{r['sample_id']}"))
    assert in_parts == [r["sample_id"] for r in by_hash][:1202]
    ids = [i for part in first for batch in part for i in batch]
    assert len(ids) == 1202 and len(set(ids)) == 1202  # equal parts: one row left out, none repeated
    assert sum(len(b) for b in first[0]) == sum(len(b) for b in first[1]) == 601
    assert first[0][0] != sorted(first[0][0])  # shuffled, and by the seed:
    assert seen(written_twice[0], seed=1) != first


def test_only_small_tables_are_sorted_on_the_driver(ray_local, monkeypatch):
    """Rows reference their images: a table with too many rows, or one that still carries its images inline (from
    before the image store), is sorted on the cluster; the count alone decides the first without a read."""
    import ray.data

    many = ray.data.range(SORT_ON_DRIVER_MAX_ROWS + 1)
    assert sorts_on_driver(many, SORT_ON_DRIVER_MAX_ROWS + 1) == (False, many)
    inline = ray.data.from_items([{"sample_id": f"s{i}", "image": bytes(64 * 1024)} for i in range(40)])
    assert sorts_on_driver(inline, 40)[0]
    monkeypatch.setattr(raydata, "SORT_ON_DRIVER_MAX_BYTES", 2**20)  # 40 images of 64 KB: 2.5 MB
    heavy, read = sorts_on_driver(inline, 40)
    assert not heavy and read.count() == 40


def _cfg(root, model, *extra):
    return load_config(REPO / "configs" / "tiny.yaml", [
        f"storage_path={root}", f"cache_dir={root / 'cache'}", f"model.name_or_path={model}", "sft.enabled=false",
        "train.sft_weight=0",
        "data.synthetic.num_images=6", "negatives.weakening.enabled=false", "train.num_workers=2",
        "train.per_device_batch_size=2", "train.lr=1e-2", "train.warmup_ratio=0", "train.checkpoint_every=2",
        "train.epochs=20",
        "train.lora.r=8", "train.lora.alpha=16",
        # On, as the 7B configs train (reentrant, under ZeRO-3 and LoRA); the embedded default's is off.
        "train.gradient_checkpointing=true", *PAPER_BPO, *extra])  # one round, no existence pairs: training alone


def _prepare(cfg):
    run_stages(cfg, until="reference")
    return RunDir.for_config(cfg)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_models, ray_local):
    """Pairs + reference scores for tiny LLaVA, made once; each test trains on a copy."""
    root = tmp_path_factory.mktemp("train-prep")
    _prepare(_cfg(root, tiny_models["llava"]))
    return root


def _copy(prepared, tmp_path):
    shutil.copytree(prepared, tmp_path, dirs_exist_ok=True)
    return tmp_path


def _losses(run) -> dict[int, float]:
    """Loss per step; for a step trained twice (before and after a restart), the later one."""
    return {m["step"]: m["loss"] for m in run.read_training_log()}


def _answers(model_dir) -> list[str]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from bpo_ray.data.synthetic import generate as shapes

    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    return generate(model, processor, [[{"role": "user", "content": "Describe the image in detail."}]],
                    [next(shapes(1)).image], Sampling(max_new_tokens=4))


def test_lora_zero3_llava_loss_falls_and_exports(prepared, tmp_path, tiny_models, ray_local):
    """With the image-conditional term on: the reference stage scores each chosen answer on its weakened image
    too, and each worker rebuilds that image. The same image on both sides, or the term would not start at ln 2."""
    root = _copy(prepared, tmp_path)
    cfg = _cfg(root, tiny_models["llava"], "train.max_steps=8", "train.image_weight=1")
    run = RunDir.for_config(cfg)
    assert reference.run(cfg, run, KEY)["scored"] > 0  # again, with the weakened image's column
    manifest = run_train(cfg, run)
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 9))
    first = run.read_training_log()[0]  # policy = reference at the start (LoRA B = 0), on either image
    assert first["dpo_loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert first["image_loss"] == pytest.approx(math.log(2), abs=1e-3) and losses[1] == pytest.approx(2 * math.log(2), abs=2e-3)
    assert sum(losses[s] for s in (7, 8)) / 2 < losses[1] - 0.05
    assert manifest["workers"] == 2 and manifest["final_metrics"]["step"] == 8
    metrics = run.read_training_log()[-1]
    assert {"reward_margin", "reward_accuracy", "lr", "grad_norm", "samples_per_second"} <= set(metrics)
    assert (root / "bpo-tiny" / "train" / "tb").is_dir()

    model_dir = root / "bpo-tiny" / "model"
    assert (model_dir / "model.safetensors").is_file() and not list(model_dir.glob("adapter_*"))
    exported = load_file(str(model_dir / "model.safetensors"))
    base = load_file(str(tiny_models["llava"] / "model.safetensors"))
    assert exported.keys() == base.keys()  # LoRA merged away: a plain LLaVA checkpoint
    changed = [k for k in base if not torch.equal(base[k], exported[k])]
    assert changed and all("language_model" in k for k in changed)  # the frozen vision tower is untouched
    assert isinstance(_answers(model_dir)[0], str)


def test_full_finetune_zero3_qwen2_vl(tmp_path, tiny_models, ray_local):
    cfg = _cfg(tmp_path, tiny_models["qwen2_vl"], "train.lora.enabled=false", "train.lr=2e-3", "train.max_steps=4",
               "train.freeze_vision_tower=false")
    run = _prepare(cfg)
    run_train(cfg, run)
    losses = _losses(run)
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1]
    exported = load_file(str(tmp_path / "bpo-tiny" / "model" / "model.safetensors"))
    base = load_file(str(tiny_models["qwen2_vl"] / "model.safetensors"))
    assert any("visual" in k and not torch.equal(base[k], exported[k]) for k in base)  # tower trained too
    assert isinstance(_answers(tmp_path / "bpo-tiny" / "model")[0], str)


def _recorded_checkpoint(run) -> bool:
    """Ray Train has recorded a checkpoint of this run (a checkpoint it has not recorded is not resumable)."""
    return recorded_checkpoint(run.checkpoint_run("train", KEY)) is not None


def _train_workers() -> set[int]:
    """This session's Ray Train worker processes (children of its local cluster, titled by their actor class)."""
    found = set()
    for p in psutil.Process().children(recursive=True):
        try:
            title = p.cmdline()[:1]  # read once: a process exiting between two reads has an empty command line
            if title and title[0].startswith("ray::RayTrainWorker"):
                found.add(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


class _KillAWorker(threading.Thread):
    """Kills one training worker process of this run once ``step`` is logged and a checkpoint is recorded.
    ``killed``: its pid; ``workers``: every worker pid of this run seen, before and after. ``check()`` joins it
    and raises what stopped it, if anything did: a watcher that died must fail the test, not leave the run
    unharmed. Workers alive when it starts belong to an earlier run still exiting, and are never picked."""

    def __init__(self, run, step: int):
        super().__init__(daemon=True)
        self.rundir, self.step = run, step
        self.earlier = _train_workers()
        self.killed: int | None = None
        self.workers: set[int] = set()
        self.error: BaseException | None = None
        self.start()

    def run(self):
        try:
            self._watch()
        except BaseException as e:  # handed to the test thread by check()
            self.error = e

    def _watch(self):
        deadline = time.time() + 300
        while time.time() < deadline:
            alive = _train_workers() - self.earlier
            self.workers |= alive
            if self.killed is None and alive and any(m["step"] >= self.step for m in self.rundir.read_training_log()) \
                    and _recorded_checkpoint(self.rundir):
                victim = max(alive)
                with contextlib.suppress(psutil.NoSuchProcess):  # gone since the listing: pick again
                    psutil.Process(victim).kill()
                    self.killed = victim
            if self.killed is not None and not psutil.pid_exists(self.killed):
                return
            time.sleep(0.05)
        raise TimeoutError(f"no worker killed in 300 s (workers seen: {self.workers})")

    def check(self) -> None:
        self.join(timeout=5)
        if self.error is not None:
            raise AssertionError("the watcher that kills a worker failed") from self.error
        assert self.killed is not None and not self.is_alive(), "no worker was killed"


STEPS = 30  # long enough that a worker is killed mid-run: a checkpoint is recorded up to 2 s after it is made
# A gentler step than the other tests: at lr 1e-2 float noise after a restore grows chaotically over 30 steps
# (1.6e-4 by step 14, 1.8e-3 by step 20), which would hide whether the trajectory really continued.
TRAJECTORY = [f"train.max_steps={STEPS}", "train.lr=2e-3"]


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory, tiny_models, ray_local):
    root = _copy(prepared, tmp_path_factory.mktemp("uninterrupted"))
    cfg = _cfg(root, tiny_models["llava"], *TRAJECTORY)
    run = RunDir.for_config(cfg)
    run_train(cfg, run)
    return _losses(run), load_file(str(root / "bpo-tiny" / "model" / "model.safetensors"))


def _same_trajectory(run, root, uninterrupted, base_dir):
    losses, weights = uninterrupted
    resumed = _losses(run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):  # a restart from scratch would differ by ~0.1
        assert resumed[step] == pytest.approx(losses[step], rel=5e-3, abs=1e-3), step
    # Weights: the restarted run must land where the uninterrupted one did, relative to how far training
    # moved them (Adam turns float-level noise on near-zero gradients into lr-sized steps, so not bit-exact).
    exported = load_file(str(root / "bpo-tiny" / "model" / "model.safetensors"))
    base = load_file(str(base_dir / "model.safetensors"))
    gap = max((exported[k] - weights[k]).abs().max().item() for k in weights)
    moved = max((weights[k] - base[k]).abs().max().item() for k in weights)
    assert moved > 0 and gap <= 0.02 * moved, (gap, moved)


def test_killed_worker_is_restarted_and_continues_the_same_trajectory(prepared, tmp_path, tiny_models, ray_local,
                                                                      uninterrupted):
    root = _copy(prepared, tmp_path)
    cfg = _cfg(root, tiny_models["llava"], *TRAJECTORY, "train.max_failures=1")
    run = RunDir.for_config(cfg)
    watcher = _KillAWorker(run, step=3)
    before = _train_workers()
    run_train(cfg, run)
    watcher.check()
    # The group restarted: workers that were not there when the kill came trained the rest.
    assert watcher.workers - before - {watcher.killed}
    _same_trajectory(run, root, uninterrupted, tiny_models["llava"])


def test_rerun_with_same_run_name_resumes_from_checkpoint(prepared, tmp_path, tiny_models, ray_local, uninterrupted):
    root = _copy(prepared, tmp_path)
    cfg = _cfg(root, tiny_models["llava"], *TRAJECTORY, "train.max_failures=0")
    run = RunDir.for_config(cfg)
    watcher = _KillAWorker(run, step=3)
    failed = None
    try:
        run_train(cfg, run)
    except Exception as e:  # Ray wraps the worker death in its own error types
        failed = e
    watcher.check()
    assert failed is not None, "the run finished although a worker was killed and max_failures is 0"
    logged_before = len(run.read_training_log())
    done_before = max(m["step"] for m in run.read_training_log())
    assert done_before < STEPS
    run_train(cfg, run)  # same run name and storage: picks up the latest checkpoint
    first_after = run.read_training_log()[logged_before]["step"]
    assert 1 < first_after <= done_before + 1  # resumed from a checkpoint, did not start over
    assert json.loads((root / "bpo-tiny" / "model" / "config.json").read_text())["model_type"] == "llava"
    _same_trajectory(run, root, uninterrupted, tiny_models["llava"])


@pytest.mark.parametrize("mode", ["adapter_disabled", "live"])
def test_live_reference_modes_train(prepared, tmp_path, tiny_models, ray_local, mode):
    """The reference scored inside the step (LoRA adapters off, or a frozen ZeRO-3 copy of the base) is the
    base model: the first loss is exactly ln 2 (policy = reference at init), then the loss falls. A wrong
    reference (say, the adapters left on) would keep it at ln 2. Their agreement with the precomputed
    reference, number for number, is test_pair_batch.py::test_reference_modes_agree. With adapters off, the
    projector trains too (in full): turning the adapter off must turn that off as well."""
    root = _copy(prepared, tmp_path)
    projector = ["train.freeze_projector=false"] if mode == "adapter_disabled" else []
    image = ["train.image_weight=1"] if mode == "live" else []  # the frozen copy scores the weakened image too
    cfg = _cfg(root, tiny_models["llava"], "train.max_steps=6", f"train.reference={mode}", *projector, *image)
    run = RunDir.for_config(cfg)
    manifest = reference.run(cfg, run, KEY)  # length checks only in these modes
    assert manifest["mode"] == mode and manifest["scored"] == manifest["pairs_in"]
    run_train(cfg, run)
    losses = _losses(run)
    first = run.read_training_log()[0]
    assert first["dpo_loss"] == pytest.approx(math.log(2), abs=1e-4)
    if image:
        assert first["image_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert losses[1] == pytest.approx(math.log(2) * (2 if image else 1), abs=2e-4)
    assert losses[6] < losses[1] - 0.005  # a wrong reference (= the policy) keeps every loss at exactly ln 2
    exported = load_file(str(root / "bpo-tiny" / "model" / "model.safetensors"))
    base = load_file(str(tiny_models["llava"] / "model.safetensors"))
    changed = {k.split(".")[0] for k in base if not torch.equal(base[k], exported[k])}
    assert changed == ({"language_model", "multi_modal_projector"} if projector else {"language_model"})


def test_epochs_reshuffle_and_a_rerun_sees_the_same_batches(ray_local):
    """Every epoch mixes the rows anew, and the same seed gives the same batches again: what resume (skip the
    batches already trained on) needs."""
    import ray.data

    from bpo_ray.config import TrainConfig
    from bpo_ray.train.worker import _forever

    shard = ray.data.range(64).iterator()

    def epochs(train, n=3):
        batches = _forever(shard, 8, lambda rows: [r["id"] for r in rows], "row", train)
        flat = [i for _ in range(8 * n) for i in next(batches)]
        return [flat[k * 64:(k + 1) * 64] for k in range(n)]

    first = epochs(TrainConfig(shuffle_buffer=64))
    assert all(sorted(e) == list(range(64)) for e in first)  # every row once an epoch
    assert first[0] != first[1] != first[2]
    assert epochs(TrainConfig(shuffle_buffer=64)) == first
    assert epochs(TrainConfig(shuffle_buffer=64, seed=1)) != first
    assert epochs(TrainConfig(shuffle_buffer=0))[0] == list(range(64))  # off: the stored order


def test_step_lines_show_rate_and_eta(tmp_path):
    """Over this attempt's own steps: a run resumed at step 2 that did 4 more in 4 s has 4 to go, 4 s."""
    from bpo_ray.train.worker import TrainingLog

    progress = TrainingLog(str(tmp_path), trainable=1, total=2, total_steps=10, first_step=2)
    start = progress.since[0]
    assert progress.progress(6, now=start + 4.0) == " | 1.00 steps/s, ETA 0m 04s"
    progress.since = (start, 0)
    assert progress.progress(1, now=start + 150.0) == " | 0.01 steps/s, ETA 22m 30s"
    assert progress.progress(3, now=start) == ""  # no time yet: no rate
    assert TrainingLog(str(tmp_path), 1, 2).progress(3) == ""  # no total known: no ETA
    progress.close()


def test_step_lines_come_at_the_first_and_last_step_and_every_ten_seconds(tmp_path):
    """A step every 0.125 s for 200 steps (resumed after 20): the log gets step 21, one every 10 s after it
    (101, 181) and the last; metrics.jsonl gets all 200."""
    import logging

    from bpo_ray.train.worker import METRICS_FILE, TrainingLog

    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.args[0])
    logger = logging.getLogger("bpo_ray.train")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # (setLevel, not the attribute: it also drops the logger's cached verdicts)
    try:
        training_log = TrainingLog(str(tmp_path), trainable=1, total=2, total_steps=220, first_step=20)
        start = training_log.since[0]
        for step in range(21, 221):
            training_log.log({"step": step, "loss": 1.0, "lr": 1e-3}, now=start + (step - 20) * 0.125)
        training_log.sync()
        training_log.close()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert lines == [21, 101, 181, 220]
    assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == 200


def _adopt(rank: int, world: int, port: int, out: str) -> None:
    import sys

    import deepspeed.comm
    from deepspeed.ops.op_builder.cpu import FusedAdamBuilder

    from bpo_ray.train.setup import adopt_process_group, probe_the_cpu_once

    probes = []  # py-cpuinfo's probe: a subprocess of its own module
    sys.addaudithook(lambda event, args: event == "subprocess.Popen" and "cpuinfo" in str(args[1])
                     and probes.append(args[1]))
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    adopt_process_group()
    probe_the_cpu_once()
    flags = [FusedAdamBuilder().cxx_args() for _ in range(2)]  # two loads' worth of the optimizer op's flags
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump({"world": deepspeed.comm.get_world_size(),
                   "shm_all_reduce": deepspeed.comm.comm.cdb.shm_comm_op is not None,
                   "cpu_probes": len(probes), "same_flags": flags[0] == flags[1]}, f)
    torch.distributed.destroy_process_group()


def test_deepspeed_starts_in_a_worker_with_both_ranks_one_cpu_probe_and_no_inference_all_reduce(tmp_path,
                                                                                                 monkeypatch):
    """The worker's DeepSpeed sees both ranks; its CPU backend builds no shared-memory all-reduce (only
    tensor-parallel inference calls it) into an empty extensions folder; and the optimizer op's compile flags,
    which DeepSpeed asks py-cpuinfo for twice per load, cost one probe (a subprocess, ~1 s) per worker."""
    import torch.multiprocessing as mp

    extensions = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    mp.spawn(_adopt, args=(2, free_ports()[0], str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == {
            "world": 2, "shm_all_reduce": False, "cpu_probes": 1, "same_flags": True}
    assert not (extensions / "deepspeed_shm_comm").exists()
