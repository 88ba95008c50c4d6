"""Preference pairs: chosen = the annotated answer, rejected = a bootstrapped negative. Pure functions."""

from __future__ import annotations

import hashlib
import re

from bpo_ray.data.records import placeholder_in

IMAGE_WEAKENING = "image_weakening"
ERROR_INJECTION = "error_injection"


class Drop:
    """Why a sample or negative does not become a pair (stable strings for the errors table)."""

    CHOSEN_TOO_LONG = "chosen_too_long"
    EMPTY_NEGATIVE = "empty_negative"
    SAME_AS_CHOSEN = "same_as_chosen"
    REJECTED_TOO_LONG = "rejected_too_long"
    IMAGE_PLACEHOLDER = "image_placeholder"
    TRUNCATED = "truncated"
    GENERATION_FAILED = "generation_failed"
    BALANCE = "balance"  # an existence pair left out so the run's yes/no pairs balance (existence.balance: mix, steer)
    ANSWERED_RIGHT = "answered_right"  # an existence question the policy already answers right (balance: errors)


def normalize(text: str) -> str:
    """Case, punctuation and whitespace do not make an answer different."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def word_count(text: str) -> int:
    return len(text.split())


def degenerate(chosen: str, rejected: str, max_words: int) -> tuple[str, str] | None:
    """(reason, detail) when a negative cannot train anything, else None."""
    if not rejected or not rejected.strip():
        return Drop.EMPTY_NEGATIVE, "the negative is empty"
    if normalize(rejected) == normalize(chosen):
        return Drop.SAME_AS_CHOSEN, "the negative equals the chosen answer after normalisation"
    if word_count(rejected) > max_words:
        return Drop.REJECTED_TOO_LONG, f"{word_count(rejected)} words > {max_words}"
    if found := placeholder_in(rejected):  # it would be tokenised as an image token with no image behind it
        return Drop.IMAGE_PLACEHOLDER, f"the negative contains the image placeholder {found}"
    return None


def stable_seed(*parts) -> int:
    """A per-sample seed that does not depend on process, batch or Python's hash randomisation."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF
