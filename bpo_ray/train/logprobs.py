"""Response-token log-probs from logits, without materialising a full-vocabulary log-softmax.

``log p(y_t) = logit[y_t] − logsumexp(logits)``: one gather and one reduction per position. Callers pass
logits for the last K positions only (``logits_to_keep``), with sequences left-padded so every response
ends at the right edge; ``labels`` holds the next token for each kept position and −100 where the
position is prompt, image placeholder or padding.
"""

from __future__ import annotations

import torch

IGNORE = -100


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, K, V) logits, (B, K) labels → (B, K) log-probs, 0 where labels are IGNORE."""
    mask = labels != IGNORE
    safe = labels.masked_fill(~mask, 0)
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1).float()
    logps = picked - torch.logsumexp(logits.float(), dim=-1)
    return torch.where(mask, logps, 0.0)  # not ``* mask``: a NaN or inf at a padded position would poison the row


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False):
    """Summed (or mean, for IPO) response log-prob per sequence, and the response token counts."""
    per_token = token_logps(logits, labels)
    counts = (labels != IGNORE).sum(-1)
    total = per_token.sum(-1)
    return (total / counts.clamp(min=1) if average else total), counts
