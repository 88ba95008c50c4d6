"""The effect sweep (jobs/effect.py): means and 95% intervals over seeds, base beside aligned; bad input."""

from __future__ import annotations

import pytest

from bpo_ray.eval import sweep
from bpo_ray.pipeline import effect
from conftest import REPO


def _report(base_chair, aligned_chair, base_f1, aligned_f1):
    def model(chair, f1):
        return {"chair": {"chair_s": chair, "chair_i": chair / 2, "exact_caption": 0.5,
                          "companion_hallucination": {"rate": chair}},
                "pope": {split: {"f1": f1} for split in ("random", "popular", "adversarial")}}
    return {"eval": {"base": model(base_chair, base_f1), "aligned": model(aligned_chair, aligned_f1)}}


def test_mean_and_interval_by_hand():
    assert sweep.mean_ci([0.5]) == (0.5, 0.0)
    mean, half = sweep.mean_ci([0.2, 0.4, 0.6])
    # sd 0.2, n 3, t(0.975, 2 df) = 4.303 → 4.303 · 0.2 / √3
    assert mean == pytest.approx(0.4) and half == pytest.approx(4.303 * 0.2 / 3 ** 0.5)


def test_summary_pairs_each_seed_with_its_own_base():
    reports = {"both": [_report(0.6, 0.2, 0.5, 0.7), _report(0.4, 0.2, 0.5, 0.6)]}
    row = sweep.summarize(reports)["both"]
    assert row["CHAIR_s"]["base"][0] == pytest.approx(0.5) and row["CHAIR_s"]["aligned"][0] == pytest.approx(0.2)
    assert row["CHAIR_s"]["delta"][0] == pytest.approx(-0.3) and row["CHAIR_s"]["lower_is_better"]
    assert row["POPE F1 adversarial"]["delta"][0] == pytest.approx(0.15)
    table = sweep.format_summary(sweep.summarize(reports), images=64)
    assert "| CHAIR_s | 0.500 | 0.200 ±" in table and "over 2 seeds" in table
    assert "| POPE acc adversarial | nan |" in table  # these reports lack it: shown as missing, no crash


def test_effect_refuses_a_config_without_a_base_to_compare(capsys):
    assert effect.main(["--config", str(REPO / "configs" / "tiny.yaml"), "sft.enabled=false"]) == 2
    assert "sft.enabled=true" in capsys.readouterr().err
    assert effect.main(["--config", str(REPO / "configs" / "tiny.yaml"), "--variants", "nope"]) == 2


@pytest.mark.parametrize("variant", list(effect.VARIANTS))
def test_every_variant_is_a_config_that_loads(variant):
    from bpo_ray.config import load_config

    load_config(REPO / "configs" / "tiny.yaml", effect.VARIANTS[variant])
