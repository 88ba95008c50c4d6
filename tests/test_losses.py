"""DPO-family losses and log-prob gathering against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from bpo_ray.train.logprobs import IGNORE, sequence_logps, token_logps
from bpo_ray.train.losses import dpo_loss, sft_loss, to_floats

# One pair: policy chosen/rejected −1/−3, reference −2/−2 → logits = (−1+3) − (−2+2) = 2.
PC, PR, RC, RR = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("loss_type, smoothing, expected", [
    ("sigmoid", 0.0, -math.log(sigmoid(0.2))),
    ("sigmoid", 0.1, -0.9 * math.log(sigmoid(0.2)) - 0.1 * math.log(sigmoid(-0.2))),
    ("robust", 0.1, (-0.9 * math.log(sigmoid(0.2)) + 0.1 * math.log(sigmoid(-0.2))) / 0.8),
    ("ipo", 0.0, (2 - 1 / (2 * 0.1)) ** 2),
    ("hinge", 0.0, 1 - 0.1 * 2),
])
def test_losses_match_hand_computed(loss_type, smoothing, expected):
    out = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type=loss_type, label_smoothing=smoothing)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


def test_rewards_and_metrics():
    out = dpo_loss(torch.tensor([-1.0, -5.0]), torch.tensor([-3.0, -4.0]), torch.tensor([-2.0, -2.0]),
                   torch.tensor([-2.0, -2.0]), beta=0.5)
    assert out.chosen_rewards.tolist() == pytest.approx([0.5, -1.5])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.5, -1.0])
    metrics = to_floats(out.terms())
    assert metrics["reward_margin"] == pytest.approx(((0.5 + 0.5) + (-1.5 + 1.0)) / 2)
    assert metrics["reward_accuracy"] == 0.5


def test_gradient_pushes_chosen_up_and_rejected_down():
    pc, pr = torch.tensor([-2.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    dpo_loss(pc, pr, torch.tensor([-2.0]), torch.tensor([-2.0])).loss.backward()
    assert pc.grad.item() < 0 < pr.grad.item()


def test_unknown_loss():
    with pytest.raises(ValueError):
        dpo_loss(PC, PR, RC, RR, loss_type="nope")


def test_token_logps_match_log_softmax_and_mask():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 11, generator=g)
    labels = torch.tensor([[3, 5, IGNORE, 1], [IGNORE, IGNORE, 7, 2]])
    expected = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = expected * (labels != IGNORE)
    assert torch.allclose(token_logps(logits, labels), expected, atol=1e-6)
    total, counts = sequence_logps(logits, labels)
    assert counts.tolist() == [3, 2] and torch.allclose(total, expected.sum(-1), atol=1e-6)
    mean, _ = sequence_logps(logits, labels, average=True)
    assert torch.allclose(mean, expected.sum(-1) / torch.tensor([3.0, 2.0]), atol=1e-6)


def test_sft_loss_is_per_token_nll():
    assert sft_loss(torch.tensor([-4.0, -2.0]), torch.tensor([2, 4])).item() == pytest.approx(1.0)


def test_a_nan_at_a_masked_position_does_not_poison_the_row():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[IGNORE, 1, 2, 3], [IGNORE, IGNORE, 5, 6]])
    clean, _ = sequence_logps(logits, labels)
    logits[0, 0] = float("nan")  # e.g. a padded position's logits
    logits[1, 1, 2] = float("inf")
    poisoned, _ = sequence_logps(logits, labels)
    assert torch.equal(poisoned, clean)


def test_anchor_matches_hand_computed_and_enters_the_objective():
    from types import SimpleNamespace

    from bpo_ray.config import TrainConfig
    from bpo_ray.train.losses import anchor_loss, training_objective

    # β(π_c − ref_c) = 0.1·(−1 + 2) = 0.1; with margin 0.3: −log σ(0.1 − 0.3).
    assert anchor_loss(PC, RC, beta=0.1).item() == pytest.approx(-math.log(sigmoid(0.1)), rel=1e-6)
    assert anchor_loss(PC, RC, beta=0.1, margin=0.3).item() == pytest.approx(-math.log(sigmoid(-0.2)), rel=1e-6)
    logps = SimpleNamespace(chosen=PC, rejected=PR, chosen_token_sum=PC, chosen_tokens=torch.tensor([4]))
    train = TrainConfig(beta=0.1, anchor_weight=0.5, anchor_margin=0.3)
    loss, terms = training_objective(logps, RC, RR, train)
    expected = -math.log(sigmoid(0.2)) + 0.5 * -math.log(sigmoid(-0.2))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert to_floats(terms)["anchor_loss"] == pytest.approx(-math.log(sigmoid(-0.2)), rel=1e-6)
    assert "anchor_loss" not in training_objective(logps, RC, RR, TrainConfig(beta=0.1))[1]


def test_the_anchor_resists_lowering_both_answers_which_dpo_alone_cannot_see():
    """DPO depends on the chosen−rejected gap only: moving both log-probs down together leaves it unchanged
    (zero gradient along that direction). The anchor's gradient along it is not zero: it pulls both up."""
    from types import SimpleNamespace

    from bpo_ray.config import TrainConfig
    from bpo_ray.train.losses import training_objective

    def gradient_along_both_down(train):
        shift = torch.zeros(1, requires_grad=True)
        chosen, rejected = PC - shift, PR - shift
        logps = SimpleNamespace(chosen=chosen, rejected=rejected, chosen_token_sum=chosen,
                                chosen_tokens=torch.tensor([1]))
        loss, _ = training_objective(logps, RC, RR, train)
        loss.backward()
        return shift.grad.item()

    assert gradient_along_both_down(TrainConfig(beta=0.1)) == pytest.approx(0.0, abs=1e-9)
    assert gradient_along_both_down(TrainConfig(beta=0.1, anchor_weight=1.0)) > 1e-3  # lowering both costs


def test_image_conditional_term_matches_hand_computed_and_enters_the_objective():
    from types import SimpleNamespace

    from bpo_ray.config import TrainConfig
    from bpo_ray.train.losses import image_conditional_loss, training_objective

    # Chosen on the image: π − ref = −1 + 2 = 1; on the weakened image: −4 + 3 = −1 → β·(1 − (−1)) = 0.2.
    pcw, rcw = torch.tensor([-4.0]), torch.tensor([-3.0])
    assert image_conditional_loss(PC, RC, pcw, rcw, beta=0.1).item() == pytest.approx(-math.log(sigmoid(0.2)), rel=1e-6)
    logps = SimpleNamespace(chosen=PC, rejected=PR, chosen_token_sum=PC, chosen_tokens=torch.tensor([1]),
                            chosen_weak=pcw)
    loss, terms = training_objective(logps, RC, RR, TrainConfig(beta=0.1, image_weight=0.5), rcw)
    assert loss.item() == pytest.approx(-math.log(sigmoid(0.2)) * 1.5, rel=1e-6)  # the DPO term is also −log σ(0.2)
    assert to_floats(terms)["image_margin"] == pytest.approx(0.2, rel=1e-6)
    with pytest.raises(ValueError, match="weakened image"):  # the term without its inputs is an error, not a no-op
        training_objective(SimpleNamespace(**{**vars(logps), "chosen_weak": None}), RC, RR,
                           TrainConfig(beta=0.1, image_weight=0.5))


def test_the_image_term_moves_the_answer_on_the_weakened_image_which_dpo_cannot_see():
    """DPO and the anchor never read the chosen answer's log-prob on the weakened image: their gradient there is
    zero. The image term pushes it down (the answer should need the image), so its gradient is positive."""
    from types import SimpleNamespace

    from bpo_ray.config import TrainConfig
    from bpo_ray.train.losses import training_objective

    def gradient_on_the_weakened_image(train):
        chosen, weak = (torch.tensor([v], requires_grad=True) for v in (-1.0, -4.0))
        logps = SimpleNamespace(chosen=chosen, rejected=PR, chosen_token_sum=chosen, chosen_tokens=torch.tensor([1]),
                                chosen_weak=weak)
        loss, _ = training_objective(logps, RC, RR, train, torch.tensor([-3.0]))
        loss.backward()
        return 0.0 if weak.grad is None else weak.grad.item()

    assert gradient_on_the_weakened_image(TrainConfig(beta=0.1, anchor_weight=1.0)) == 0.0
    assert gradient_on_the_weakened_image(TrainConfig(beta=0.1, image_weight=1.0)) > 1e-3
