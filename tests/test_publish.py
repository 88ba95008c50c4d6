"""The aligned model's card (from a run's manifests) and the Hub push's failure offline."""

from __future__ import annotations

import pytest
import yaml

from bpo_ray.config import load_config
from bpo_ray.eval.compare import format_table
from bpo_ray.train.publish import model_card, push_to_hub

MANIFESTS = {
    "negatives": {"pairs": 1280, "samples_in": 768,
                  "by_type": {"image_weakening": {"pairs": 504, "generator": "runs/x/sft/model"},
                              "error_injection": {"pairs": 768, "generator": "rules"},
                              "external": {"pairs": 8, "generator": "rlaif.parquet"}}},
    "train": {"steps": 318, "workers": 2, "final_metrics": {"loss": 0.4152, "reward_margin": 0.9785,
                                                            "reward_accuracy": 1.0}},
    "eval": {"metrics": {"aligned": {"images": 100}}},
}
ROWS = [{"metric": "CHAIR_s", "base": 0.15, "aligned": 0.03, "delta": -0.12, "better": True}]


def _front_matter(card: str) -> dict:
    _, meta, _ = card.split("---", 2)
    return yaml.safe_load(meta)


def test_card_has_the_base_data_training_and_eval():
    cfg = load_config(None, ["model.name_or_path=llava-hf/llava-1.5-7b-hf", "train.beta=0.2"])
    card = model_card(cfg, MANIFESTS, ROWS, cfg.model.name_or_path)
    meta = _front_matter(card)
    assert meta["base_model"] == "llava-hf/llava-1.5-7b-hf" and "bpo" in meta["tags"]
    assert meta["pipeline_tag"] == "image-text-to-text"
    assert "1280 preference pairs from 768 samples" in card
    for row in ("| 504 | image_weakening |", "| 768 | error_injection | `rules` |", "| 8 | external | `rlaif.parquet` |"):
        assert row in card
    assert "318 steps on 2 workers" in card and "final loss 0.4152" in card and "| train.beta | 0.2 |" in card
    assert f"LoRA r {cfg.train.lora.r}" in card and format_table(ROWS) in card and "on 100 held-out images" in card


def test_card_without_a_hub_base_or_an_eval():
    cfg = load_config(None, [])
    card = model_card(cfg, MANIFESTS, [], "tiny://llava (+ sft stage)")
    assert "base_model" not in _front_matter(card)  # the Hub links a base by its id only
    assert "Not evaluated against the base" in card


def test_push_fails_clearly_offline(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match=r"export.push_to_hub: could not upload .* 'someone/bpo-test'.*stay in"):
        push_to_hub(str(tmp_path), "someone/bpo-test", private=True)


def test_push_target_is_validated():
    from bpo_ray.config import ConfigError

    assert load_config(None, ["export.push_to_hub=me/aligned"]).export.push_to_hub == "me/aligned"
    with pytest.raises(ConfigError, match="push_to_hub"):
        load_config(None, ["export.push_to_hub=not a repo"])
