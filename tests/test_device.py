"""The one device rule (bpo_ray/models/device.py) and the faults of its class that a first GPU run would hit:
reference log-probs on the CPU meeting a CUDA policy, a reference scored in another dtype than the policy
trains in, dropout noise in DPO's policy forward, metrics from rank 0 alone.

No GPU here: device mixing is caught under torch's FakeTensorMode, where tensors on a fake ``cuda`` device
raise on the same mismatches real ones do."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode

from bpo_ray.config import ModelConfig, TrainConfig
from bpo_ray.models.device import actor_device, resolve_dtype
from bpo_ray.models.loader import load_vlm
from bpo_ray.train.batch import PairLogps, collate, encode_pair, pad_id, pair_logps
from bpo_ray.train.losses import dpo_loss, to_floats, training_objective

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


def test_precision_follows_the_device():
    assert resolve_dtype("auto", CUDA) == torch.bfloat16 and resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("bf16", CPU) == torch.bfloat16 and resolve_dtype("float16", CUDA) == torch.float16
    assert actor_device() == CPU  # no GPU on this machine


def test_loader_places_the_model_in_the_configs_precision(tiny_models):
    model, _ = load_vlm(str(tiny_models["llava"]), device=CPU)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model, _ = load_vlm(str(tiny_models["llava"]), ModelConfig(dtype="bfloat16"), device=CPU)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def _pairs(shapes_dir) -> list[dict]:
    records = json.loads((shapes_dir / "records.json").read_text())[:2]
    return [{"messages": json.dumps([{"role": "user", "content": "Describe the image."}]),
             "image": (shapes_dir / r["image"]).read_bytes(), "chosen": r["conversations"][1]["value"],
             "rejected": "a purple hexagon in the middle"} for r in records]


def test_precomputed_reference_log_probs_meet_a_cuda_policy_on_its_device():
    """What the worker does with ``train.reference: precomputed``: reference log-probs come from the table
    as CPU tensors; the policy's are on its GPU."""
    ref_chosen, ref_rejected = torch.tensor([-3.0, -4.0]), torch.tensor([-5.0, -6.5])  # as the worker reads them
    with FakeTensorMode(allow_non_fake_inputs=True):
        on_gpu = [torch.full((2,), v, device="cuda") for v in (-2.0, -7.0, -40.0)]
        logps = PairLogps(on_gpu[0], on_gpu[1], on_gpu[0], torch.tensor([4, 4], device="cuda"))
        with pytest.raises(FakeTensorDeviceMismatchError):  # the harness sees mixing: the loss alone mixes
            dpo_loss(logps.chosen, logps.rejected, ref_chosen, ref_rejected)
        loss, _ = training_objective(logps, ref_chosen, ref_rejected, TrainConfig(sft_weight=0.5))
        assert loss.device == CUDA


def test_logged_loss_is_the_whole_objective():
    logps = PairLogps(torch.tensor([-2.0, -3.0]), torch.tensor([-5.0, -4.0]), torch.tensor([-2.0, -3.0]),
                      torch.tensor([2, 3]))
    ref = torch.tensor([-2.5, -3.5]), torch.tensor([-4.5, -4.5])
    loss, terms = training_objective(logps, *ref, TrainConfig(sft_weight=0.5))
    metrics = to_floats(terms)
    dpo = dpo_loss(logps.chosen, logps.rejected, *ref).loss.item()
    sft = 5.0 / 5  # −(−2 − 3) / 5 tokens
    assert metrics["dpo_loss"] == pytest.approx(dpo) and metrics["sft_loss"] == pytest.approx(sft)
    assert metrics["loss"] == pytest.approx(dpo + 0.5 * sft) == pytest.approx(loss.item())


def test_reference_is_scored_in_the_policys_precision(tiny_models, shapes_dir):
    """Scored in the precision the policy trains in, the reference equals the untrained policy, so DPO's
    first loss is ln 2; a reference in fp32 against a bf16 policy offsets every pair's margin."""
    import pandas as pd

    from bpo_ray.train.reference import ReferenceScorer

    pairs = _pairs(shapes_dir)
    path = str(tiny_models["llava"])
    policy, processor = load_vlm(path, dtype=torch.bfloat16)
    with torch.no_grad():
        own = pair_logps(policy, collate([encode_pair(processor, p, 512) for p in pairs], pad_id(processor)))

    def first_loss(precision: str) -> float:
        scorer = ReferenceScorer(path, ModelConfig(), average=False, precision=precision)
        assert {p.dtype for p in scorer.model.parameters()} == {resolve_dtype(precision, CPU)}
        scored = scorer(pd.DataFrame(pairs))
        return dpo_loss(own.chosen, own.rejected, torch.tensor(scored["ref_chosen_logp"].tolist()),
                        torch.tensor(scored["ref_rejected_logp"].tolist())).loss.item()

    assert first_loss("bf16") == pytest.approx(math.log(2), abs=1e-6)
    assert first_loss("fp32") != pytest.approx(math.log(2), abs=1e-6)


def test_dpo_policy_forward_has_no_dropout(tiny_models, shapes_dir):
    from bpo_ray.train.setup import disable_dropout, prepare_model

    base, processor = load_vlm(str(tiny_models["llava"]))
    policy = prepare_model(base, TrainConfig(lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.5},
                                             gradient_checkpointing=False))
    with torch.no_grad():  # a trained adapter, so its dropout shows in the output
        for module in policy.modules():
            if hasattr(module, "lora_B"):
                for linear in module.lora_B.values():
                    linear.weight.add_(0.05)
    batch = collate([encode_pair(processor, p, 512) for p in _pairs(shapes_dir)], pad_id(processor))
    policy.train()
    with torch.no_grad():
        torch.manual_seed(0)
        noisy = [pair_logps(policy, batch).chosen for _ in range(2)]
        assert not torch.equal(*noisy)  # dropout is on in train mode…
        disable_dropout(policy)
        quiet = [pair_logps(policy, batch).chosen for _ in range(2)]
        assert torch.equal(*quiet)  # …and off after


def _rank_metrics(rank: int, world: int, port: int, out: str) -> None:
    from bpo_ray.train.worker import mean_over_ranks

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    # Rank 0 saw 2 + 1 pairs at losses 1.0 and 4.0; rank 1 saw 3 pairs at loss 0.0.
    window = [({"loss": 1.0}, 2), ({"loss": 4.0}, 1)] if rank == 0 else [({"loss": 0.0}, 3)]
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(mean_over_ranks(window, CPU), f)
    torch.distributed.destroy_process_group()


def test_step_metrics_are_pair_weighted_means_over_every_rank(tmp_path):
    import torch.multiprocessing as mp

    from conftest import free_ports

    mp.spawn(_rank_metrics, args=(2, free_ports()[0], str(tmp_path)), nprocs=2)
    means = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert means[0] == means[1] == {"loss": pytest.approx((2 * 1.0 + 4.0 + 3 * 0.0) / 6)}


def test_the_gpu_smoke_script_runs_here_without_ray():
    """``make test-gpu``'s script on the CPU (fp32, tiny models) with Ray unimportable, as on the GPU machine
    that has none: it must keep working between GPU runs."""
    import subprocess
    import sys

    from conftest import REPO

    code = ("import runpy, sys; sys.modules['ray'] = None; "
            "sys.argv = ['gpu_smoke.py', '--allow-cpu', '--size', 'tiny', '--steps', '1']; "
            "runpy.run_path('tests/gpu_smoke.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    results = [json.loads(line.split(" ", 1)[1]) for line in done.stdout.splitlines() if line.startswith("GPU-SMOKE ")]
    assert [r["arch"] for r in results] == ["llava", "qwen2_vl"]
    for r in results:
        assert r["step0_loss"] == pytest.approx(math.log(2), abs=1e-4) and r["precomputed_vs_live_max_abs"] < 1e-3
        assert r["tokens_per_s"] > 0 and r["serve_finish"] in ("stop", "length")
