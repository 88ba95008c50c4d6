"""The concatenated chosen+rejected batch gives the same log-probs as each sequence alone, and the
precomputed, adapter-disabled and live references agree."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from bpo_ray.config import ModelConfig, TrainConfig
from bpo_ray.data.synthetic import generate as shapes
from bpo_ray.models.loader import load_vlm
from bpo_ray.train.batch import collate, collate_rows, encode_pair, pad_id, pair_logps, response_nll
from bpo_ray.train.losses import dpo_loss
from bpo_ray.train.setup import deepspeed_config, optimizer_steps, param_groups, prepare_model
from conftest import REPO


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


IMAGE = _png(next(shapes(1)).image)
PAIRS = [
    {"messages": json.dumps([{"role": "user", "content": "Describe the image in detail."}]), "image": IMAGE,
     "chosen": "There is one shape. A large red circle is at the top.", "rejected": "There are two shapes."},
    {"messages": json.dumps([{"role": "user", "content": "Is there a blue square?"}]), "image": IMAGE,
     "chosen": "No.", "rejected": "Yes, there is a blue square at the left of the red circle."},
]


def _alone(model, encoded) -> float:
    logits = model(**encoded.model_inputs()).logits[0, :-1]
    targets = torch.tensor(encoded.input_ids[1:])
    logps = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])[:, 0]
    return logps[encoded.prompt_length - 1:].sum().item()


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_batched_left_padded_logps_equal_single_sequences(tiny_models, arch):
    model, processor = load_vlm(str(tiny_models[arch]))
    encoded = [encode_pair(processor, p, 512) for p in PAIRS]
    batch = collate(encoded, pad_id(processor))
    assert batch.logits_to_keep < batch.inputs["input_ids"].shape[1]  # prompt/image logits never computed
    with torch.no_grad():
        out = pair_logps(model, batch)
        expected_c = [_alone(model, c) for c, _ in encoded]
        expected_r = [_alone(model, r) for _, r in encoded]
    assert out.chosen.tolist() == pytest.approx(expected_c, abs=1e-3)
    assert out.rejected.tolist() == pytest.approx(expected_r, abs=1e-3)


def test_sft_nll_is_the_per_token_mean_over_responses(tiny_models):
    model, processor = load_vlm(str(tiny_models["llava"]))
    rows = [e for pair in (encode_pair(processor, p, 512) for p in PAIRS) for e in pair]
    with torch.no_grad():
        nll = response_nll(model, *collate_rows(rows, pad_id(processor))).item()
        total = sum(_alone(model, e) for e in rows)
    tokens = sum(len(e.response_ids) for e in rows)
    assert nll == pytest.approx(-total / tokens, abs=1e-4)


def test_reference_modes_agree(tiny_models):
    """Precomputed (the base model, scored apart) = adapter-disabled LoRA policy = live frozen copy."""
    import pandas as pd

    from bpo_ray.train.reference import ReferenceScorer

    scorer = ReferenceScorer(str(tiny_models["llava"]), ModelConfig(), average=False, precision="fp32")
    scored = scorer(pd.DataFrame(PAIRS))
    base, processor = load_vlm(str(tiny_models["llava"]))
    policy = prepare_model(base, TrainConfig(lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0},
                                             gradient_checkpointing=False))
    with torch.no_grad():
        for module in policy.modules():  # train the adapters a little: the policy must differ from the base
            if hasattr(module, "lora_B"):
                for linear in module.lora_B.values():
                    linear.weight.add_(0.05)
        batch = collate([encode_pair(processor, p, 512) for p in PAIRS], pad_id(processor))
        with policy.disable_adapter():
            disabled = pair_logps(policy, batch)
        live = pair_logps(load_vlm(str(tiny_models["llava"]))[0], batch)
        trained = pair_logps(policy, batch)
    assert scored["ref_chosen_logp"].tolist() == pytest.approx(disabled.chosen.tolist(), abs=1e-3)
    assert scored["ref_rejected_logp"].tolist() == pytest.approx(live.rejected.tolist(), abs=1e-3)
    assert trained.chosen.tolist() != pytest.approx(disabled.chosen.tolist(), abs=1e-3)
    # …so the DPO loss of the trained policy is the same whichever reference is used.
    losses = [dpo_loss(trained.chosen, trained.rejected, c, r).loss.item() for c, r in (
        (torch.tensor(scored["ref_chosen_logp"].tolist()), torch.tensor(scored["ref_rejected_logp"].tolist())),
        (disabled.chosen, disabled.rejected), (live.chosen, live.rejected))]
    assert losses[1] == pytest.approx(losses[0], abs=1e-4) and losses[2] == pytest.approx(losses[0], abs=1e-4)
    assert losses[0] != pytest.approx(math.log(2), abs=1e-3)  # the policy really differs from the reference


@pytest.mark.parametrize("score", [True, False])
def test_reference_scorer_records_too_long_pairs(tiny_models, score):
    """Length problems are recorded whether the reference is precomputed (score) or live (checks only)."""
    import pandas as pd

    from bpo_ray.train.reference import ReferenceScorer

    long_prompt = {**PAIRS[0], "messages": json.dumps([{"role": "user", "content": "Describe it. " * 40}])}
    scorer = ReferenceScorer(str(tiny_models["llava"]), ModelConfig(max_length=120), average=False, precision="fp32",
                             score=score)
    out = scorer(pd.DataFrame([PAIRS[0], long_prompt]))
    assert out["kind"].tolist() == ["pair", "error"] and out["reason"].tolist() == ["", "prompt_too_long"]
    assert "9 image tokens" in out["detail"][1]
    assert (out["ref_chosen_logp"][0] < 0) == score  # scored only when precomputed


def test_freezing_and_lora_targets(tiny_models):
    model, _ = load_vlm(str(tiny_models["qwen2_vl"]))
    full = prepare_model(model, TrainConfig(lora={"enabled": False}, freeze_vision_tower=True, freeze_projector=False,
                                            gradient_checkpointing=False))
    trainable = {n for n, p in full.named_parameters() if p.requires_grad}
    assert not any(".visual.blocks." in n for n in trainable)  # tower frozen
    assert any(".visual.merger." in n for n in trainable)  # projector (Qwen's merger) trains
    model, _ = load_vlm(str(tiny_models["llava"]))
    lora = prepare_model(model, TrainConfig(lora={"enabled": True, "r": 4, "alpha": 8}))
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and "language_model" in n for n in names)  # default: the adapter only


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_lora_trains_the_vision_parts_the_config_leaves_unfrozen(tiny_models, arch):
    """peft freezes all but its adapters: an unfrozen projector (or tower) must train anyway, be switched off
    with the adapter (the adapter_disabled reference is the base) and be merged on export."""
    model, _ = load_vlm(str(tiny_models[arch]))
    lora = prepare_model(model, TrainConfig(lora={"enabled": True, "r": 4, "alpha": 8}, freeze_projector=False,
                                            gradient_checkpointing=False))
    projector = "multi_modal_projector" if arch == "llava" else "merger"
    trained = [n for n, p in lora.named_parameters() if p.requires_grad and "lora_" not in n]
    assert trained and all(f"{projector}.modules_to_save." in n for n in trained)
    assert not any(".visual.blocks." in n or "vision_tower" in n for n in trained)
    with torch.no_grad():
        for p in lora.parameters():
            if p.requires_grad:
                p.add_(0.5)  # a training step's worth of change, in every trained part
    base_state = {k: v.clone() for k, v in load_vlm(str(tiny_models[arch]))[0].state_dict().items()}
    with lora.disable_adapter():
        off = {n.split("base_model.model.", 1)[-1].replace(".original_module", ""): p for n, p in
               lora.named_parameters() if "lora_" not in n and ".modules_to_save." not in n}
    assert all(torch.equal(off[k], v) for k, v in base_state.items() if k in off)
    merged = lora.merge_and_unload().state_dict()
    changed = [k for k, v in merged.items() if not torch.equal(v, base_state[k])]
    assert any(projector in k for k in changed) and all(projector in k or "language_model" in k for k in changed)

    model, _ = load_vlm(str(tiny_models[arch]))  # an unfrozen tower goes in full, its projector with it
    both = prepare_model(model, TrainConfig(lora={"enabled": True}, freeze_projector=False, freeze_vision_tower=False,
                                            gradient_checkpointing=False))
    tower = [n for n, p in both.named_parameters() if p.requires_grad and "lora_" not in n]
    assert any(projector in n for n in tower) and any(".blocks." in n or "vision_tower" in n for n in tower)


@pytest.mark.parametrize("lora", [True, False])
def test_gradient_checkpointing_recomputes_the_same_gradients(tiny_models, lora):
    """train.gradient_checkpointing turns it on in the language model (under LoRA too) through transformers'
    current API, with no deprecation warning, and the recomputed forward gives the gradients of the plain one."""
    import warnings

    _, processor = load_vlm(str(tiny_models["llava"]))
    batch = collate([encode_pair(processor, p, 512) for p in PAIRS], pad_id(processor))
    grads = {}
    for checkpointing in (True, False):
        torch.manual_seed(0)
        model, _ = load_vlm(str(tiny_models["llava"]))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            policy = prepare_model(model, TrainConfig(lora={"enabled": lora, "r": 4, "alpha": 8, "dropout": 0.0},
                                                      gradient_checkpointing=checkpointing))
        assert not [str(w.message) for w in caught if "checkpointing" in str(w.message)]
        assert model.is_activation_checkpointing == checkpointing
        policy.train()
        logps = pair_logps(policy, batch)
        (logps.chosen.sum() - logps.rejected.sum()).backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
    assert grads[True] and grads[True].keys() == grads[False].keys()
    assert all(torch.equal(grads[True][n], grads[False][n]) for n in grads[True])


def test_deepspeed_config_and_steps():
    train = TrainConfig(per_device_batch_size=4, gradient_accumulation_steps=2, epochs=2, zero_stage=3,
                        warmup_ratio=0.1)
    micro, total = optimizer_steps(100, train, world_size=2)
    assert (micro, total) == (13, 13)
    ds = deepspeed_config(train, world_size=2, use_gpu=False, total_steps=total)
    assert ds["train_batch_size"] == 16 and ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert not ds["bf16"]["enabled"] and deepspeed_config(train, 2, True, total)["bf16"]["enabled"]
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 1
    assert optimizer_steps(100, TrainConfig(max_steps=3), 2)[1] == 3


def test_gpu_training_needs_no_nvcc():
    """On GPU workers DeepSpeed's own optimizer choice lands on torch's AdamW, not FusedAdam (a CUDA op
    DeepSpeed compiles with nvcc at first use, which runtime images lack)."""
    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine

    ds = deepspeed_config(TrainConfig(), world_size=8, use_gpu=True, total_steps=10)
    chosen, _ = DeepSpeedEngine.get_optimizer_configuration(None, dict(ds["optimizer"]["params"]), adam_w_mode=True)
    assert chosen is torch.optim.AdamW
    offloaded = deepspeed_config(TrainConfig(offload_optimizer=True), world_size=8, use_gpu=True, total_steps=10)
    assert "torch_adam" not in offloaded["optimizer"]["params"]  # DeepSpeedCPUAdam: a C++ op, no nvcc


def test_vision_lr_puts_the_tower_in_its_own_group_and_the_schedule_keeps_it(tiny_models):
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    model, _ = load_vlm(str(tiny_models["llava"]))
    full = prepare_model(model, TrainConfig(lora={"enabled": False}, freeze_vision_tower=False, lr=2e-3,
                                            vision_lr=5e-4, gradient_checkpointing=False))
    groups = param_groups(full, TrainConfig(lora={"enabled": False}, lr=2e-3, vision_lr=5e-4))
    names = {id(p): n for n, p in full.named_parameters()}
    language, vision = ({names[id(p)] for p in g["params"]} for g in groups)
    assert "lr" not in groups[0] and groups[1]["lr"] == 5e-4
    assert any("multi_modal_projector" in n for n in language)  # the projector learns at lr
    assert all("language_model" in n or "lm_head" in n or "multi_modal_projector" in n for n in language)
    assert vision and all("vision_tower" in n for n in vision)
    assert len(language) + len(vision) == sum(p.requires_grad for p in full.parameters())
    assert len(param_groups(full, TrainConfig(lora={"enabled": False}))) == 1  # no vision_lr: one group
    qwen, _ = load_vlm(str(tiny_models["qwen2_vl"]))  # Qwen's merger sits inside its tower, and learns at lr
    qwen = prepare_model(qwen, TrainConfig(lora={"enabled": False}, freeze_vision_tower=False, vision_lr=5e-4,
                                           gradient_checkpointing=False))
    names = {id(p): n for n, p in qwen.named_parameters()}
    language, vision = ({names[id(p)] for p in g["params"]} for g in param_groups(qwen, TrainConfig(vision_lr=5e-4)))
    assert any(".merger." in n for n in language) and vision and all(".visual.blocks." in n or ".visual.patch_embed." in n for n in vision)
    # the generated DeepSpeed config's optimizer and schedule (WarmupCosineLR scales each group's own rate)
    optimizer = torch.optim.AdamW(groups, lr=2e-3)
    schedule = WarmupCosineLR(optimizer, total_num_steps=10, warmup_num_steps=2, warmup_type="linear")
    for _ in range(4):
        optimizer.step()
        schedule.step()
    rates = schedule.get_last_lr()
    assert 0 < rates[1] < 5e-4 and rates[0] == pytest.approx(4 * rates[1])


def test_vision_lr_with_a_frozen_tower_is_a_config_error():
    from bpo_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.vision_lr is set, but the vision tower is frozen"):
        load_config(None, ["train.vision_lr=1e-5"])
    assert load_config(None, ["train.vision_lr=1e-5", "train.freeze_vision_tower=false"]).train.vision_lr == 1e-5
    with pytest.raises(ConfigError, match="sft.vision_lr is set, but the vision tower is frozen"):
        load_config(REPO / "configs" / "tiny.yaml", ["sft.freeze_vision_tower=true"])  # tiny.yaml sets sft.vision_lr
    assert load_config(REPO / "configs" / "tiny.yaml").sft.vision_lr == 5e-4


def test_the_chosen_answer_is_scored_on_the_image_its_weakening_negative_came_from(tiny_models):
    """With train.image_weight each pair also carries its chosen answer on the weakened image. That image is
    rebuilt, not stored: it must be the negatives stage's image for the sample, and the reference scorer and
    the batch must score it like any other sequence."""
    import numpy as np
    import pandas as pd

    from bpo_ray.config import DistortionConfig
    from bpo_ray.data.records import decode_image
    from bpo_ray.models.prompts import encode_prompt_response
    from bpo_ray.models.vision import model_input_size
    from bpo_ray.negatives.batches import weaken_batch
    from bpo_ray.train.batch import WeakImages
    from bpo_ray.train.reference import WEAK_COLUMN, ReferenceScorer

    model, processor = load_vlm(str(tiny_models["llava"]))
    pairs = [{**p, "sample_id": f"s{i}"} for i, p in enumerate(PAIRS)]
    distortions = [DistortionConfig().model_dump()]
    weak = WeakImages(distortions, seed=3).sized_for(processor)
    samples = {"sample_id": np.array([p["sample_id"] for p in pairs]), "record_id": np.array(["r0", "r1"]),
               "image": np.array([p["image"] for p in pairs], dtype=object), "image_ref": np.array(["a", "b"]),
               "messages": np.array([p["messages"] for p in pairs]), "prompt": np.array(["q", "q"]),
               "answer": np.array([p["chosen"] for p in pairs])}
    made = weaken_batch(samples, distortions, seed=3, size=model_input_size(processor.image_processor))
    assert [weak(p) for p in pairs] == list(made["gen_image"])

    encoded = [encode_pair(processor, p, 512, weak=weak) for p in pairs]
    with torch.no_grad():
        out = pair_logps(model, collate(encoded, pad_id(processor)))
        expected = [_alone(model, encode_prompt_response(processor, json.loads(p["messages"]),
                                                         decode_image(weak(p)), p["chosen"], 512)) for p in pairs]
        plain = pair_logps(model, collate([encode_pair(processor, p, 512) for p in pairs], pad_id(processor)))
    assert out.chosen_weak.tolist() == pytest.approx(expected, abs=1e-3)
    assert out.chosen.tolist() == pytest.approx(plain.chosen.tolist(), abs=1e-4)  # the third group changes nothing
    assert out.rejected.tolist() == pytest.approx(plain.rejected.tolist(), abs=1e-4)
    assert out.chosen_weak.tolist() != pytest.approx(out.chosen.tolist(), abs=1e-3)  # the model sees the image

    scorer = ReferenceScorer(str(tiny_models["llava"]), ModelConfig(), average=False, precision="fp32",
                             weak=WeakImages(distortions, seed=3))
    scored = scorer(pd.DataFrame(pairs))
    assert scored[WEAK_COLUMN].tolist() == pytest.approx(expected, abs=1e-3)
    assert scored["ref_chosen_logp"].tolist() == pytest.approx(plain.chosen.tolist(), abs=1e-3)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_epochs_after_the_first_reuse_encodings_that_equal_fresh_ones(tiny_models, tmp_path, arch):
    """The training loop keeps each row's encoding across epochs (train.encode_cache_gib): a kept row must
    batch exactly as a fresh encoding does, be neither encoded nor fetched again, never stand in for a row
    whose content differs, and the memory budget must bound what is kept."""
    from bpo_ray.train.batch import EncodingCache, encoded_bytes

    _, processor = load_vlm(str(tiny_models[arch]))
    other = _png(list(shapes(2, seed=5))[1].image)
    stored = tmp_path / "data" / "images" / "a.png"
    stored.parent.mkdir(parents=True)
    stored.write_bytes(IMAGE)
    rows = [{**PAIRS[0], "image": b"", "image_file": "data/images/a.png"},  # by reference, as the stages store it
            {**PAIRS[1], "image_file": ""}, {**PAIRS[1], "image": other, "image_file": ""}]
    calls = []

    def encode(row):
        calls.append(row["chosen"])
        return encode_pair(processor, row, 512)

    def batch_tensors(encoded):
        batch = collate(encoded, pad_id(processor))
        return {**batch.inputs, "labels": batch.labels}

    cache = EncodingCache(1.0, str(tmp_path))
    first = cache.encode(rows, encode)
    stored.unlink()  # a kept row is not fetched again
    again = cache.encode(rows, encode)
    assert len(calls) == 3 and cache.hits == 3
    fresh = [encode_pair(processor, {**PAIRS[0]}, 512), encode_pair(processor, rows[1], 512),
             encode_pair(processor, rows[2], 512)]
    for encoded in (first, again):
        got, want = batch_tensors(encoded), batch_tensors(fresh)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # Same text, another image: its own encoding.
    assert not torch.equal(again[1][0].vision_inputs["pixel_values"], again[2][0].vision_inputs["pixel_values"])

    too_long = EncodingCache(1.0).encode([rows[1]], lambda r: encode_pair(processor, r, 4))
    assert too_long == [None]

    one_row = EncodingCache(encoded_bytes(first[1]) * 1.5 / 2**30)
    one_row.encode(rows[1:], encode)
    one_row.encode(rows[1:], encode)
    assert one_row.hits == 1 and one_row.misses == 3 and one_row.used <= one_row.budget
    calls.clear()
    EncodingCache(0.0).encode(rows[1:2], encode)  # 0: nothing kept
    assert len(calls) == 1
