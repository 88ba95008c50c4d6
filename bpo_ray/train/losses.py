"""DPO-family losses as pure functions of sequence log-probs (tensors in, tensors out).

``logits = (π_c − π_r) − (ref_c − ref_r)``; implicit rewards are ``β·(π − ref)``.
- ``sigmoid`` (DPO, Rafailov et al.): −log σ(β·logits), with optional label smoothing (conservative DPO);
- ``robust`` (Chowdhury et al.): unbiased under label noise ε = label_smoothing;
- ``ipo`` (Azar et al.): (logits − 1/(2β))², on *mean* token log-probs;
- ``hinge`` (SLiC): relu(1 − β·logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bpo_ray.models.device import on_device


@dataclass
class DPOOutput:
    loss: torch.Tensor  # scalar
    losses: torch.Tensor  # per pair
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    def terms(self) -> dict[str, torch.Tensor]:
        """The step's metrics as detached scalars on the loss's device (``to_floats`` reads them)."""
        margin = self.chosen_rewards - self.rejected_rewards
        return {
            "loss": self.loss.detach(),
            "reward_chosen": self.chosen_rewards.mean(),
            "reward_rejected": self.rejected_rewards.mean(),
            "reward_margin": margin.mean(),
            "reward_accuracy": (margin > 0).float().mean(),
        }


def to_floats(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalar tensors → floats, in one device-to-host copy."""
    values = torch.stack([t.float() for t in terms.values()]).tolist()
    return dict(zip(terms, values, strict=True))


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> DPOOutput:
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    elif loss_type == "robust":
        losses = ((-F.logsigmoid(beta * logits) * (1 - label_smoothing) + F.logsigmoid(-beta * logits) * label_smoothing)
                  / (1 - 2 * label_smoothing))
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        raise ValueError(f"unknown loss type {loss_type!r}")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return DPOOutput(losses.mean(), losses, chosen_rewards, rejected_rewards)


def anchor_loss(policy_chosen: torch.Tensor, ref_chosen: torch.Tensor, beta: float, margin: float = 0.0) -> torch.Tensor:
    """−log σ(β·(π_c − ref_c) − margin), mean over pairs: the anchor of mDPO (Wang et al. 2024). DPO sees only
    the gap between chosen and rejected, so it can win by pushing both down; this keeps the chosen answer's
    own reward above ``margin``."""
    return -F.logsigmoid(beta * (policy_chosen - ref_chosen) - margin).mean()


def image_conditional_loss(policy_chosen: torch.Tensor, ref_chosen: torch.Tensor, policy_chosen_weak: torch.Tensor,
                           ref_chosen_weak: torch.Tensor, beta: float) -> torch.Tensor:
    """−log σ(β·((π_c − ref_c) − (π_c|weak − ref_c|weak))), mean over pairs: the conditional preference of mDPO
    (Wang et al. 2024), with BPO's weakened image as the worse image. The same chosen answer is preferred on the
    original image over the weakened one, so its likelihood has to come from the image and not from the text
    alone, which the answer pairs cannot tell apart."""
    return -F.logsigmoid(beta * ((policy_chosen - ref_chosen) - (policy_chosen_weak - ref_chosen_weak))).mean()


def sft_loss(chosen_token_logps_sum: torch.Tensor, chosen_token_counts: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per token of the chosen answers (the optional SFT term)."""
    return -(chosen_token_logps_sum.sum() / chosen_token_counts.sum().clamp(min=1))


def training_objective(logps, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, train,
                       ref_chosen_weak: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """What a DPO step minimises: the ``train.loss`` DPO loss, plus ``train.anchor_weight`` × the anchor,
    ``train.image_weight`` × the image-conditional term and ``train.sft_weight`` × the SFT term on the chosen
    answers, and its metric terms (``loss`` is the whole objective; ``dpo_loss``, ``anchor_loss``,
    ``image_loss`` and ``sft_loss`` its parts; ``to_floats`` reads them). ``logps``: the policy's
    ``PairLogps``; reference log-probs (precomputed ones come from a table, on the CPU) enter on the policy's
    device; ``ref_chosen_weak``: the reference's for the chosen answer on the weakened image (the
    image-conditional term only). ``train``: the train config."""
    ref_chosen, ref_rejected = on_device(ref_chosen, logps.chosen), on_device(ref_rejected, logps.rejected)
    out = dpo_loss(logps.chosen, logps.rejected, ref_chosen, ref_rejected, train.beta, train.loss,
                   train.label_smoothing)
    loss, terms = out.loss, out.terms()
    terms["dpo_loss"] = terms["loss"]
    if train.anchor_weight:
        anchor = anchor_loss(logps.chosen, ref_chosen, train.beta, train.anchor_margin)
        loss = loss + train.anchor_weight * anchor
        terms["anchor_loss"] = anchor.detach()
    if train.image_weight:
        if logps.chosen_weak is None or ref_chosen_weak is None:
            raise ValueError("train.image_weight needs the chosen answer scored on the weakened image, by the policy "
                             "and by the reference")
        ref_weak = on_device(ref_chosen_weak, logps.chosen_weak)
        image = image_conditional_loss(logps.chosen, ref_chosen, logps.chosen_weak, ref_weak, train.beta)
        loss = loss + train.image_weight * image
        terms["image_loss"] = image.detach()
        terms["image_margin"] = (train.beta * ((logps.chosen - ref_chosen) - (logps.chosen_weak - ref_weak))).mean().detach()
    if train.sft_weight:
        sft = sft_loss(logps.chosen_token_sum, logps.chosen_tokens)
        loss = loss + train.sft_weight * sft
        terms["sft_loss"] = sft.detach()
    terms["loss"] = loss.detach()
    return loss, terms
