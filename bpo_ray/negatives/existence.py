"""Balanced existence pairs: POPE-like yes/no questions from the training images' object annotations. Pure.

Weakening argues only for "no" (on a true-yes question the weakened image's answer agrees with the prior, so
the pair is dropped as identical), and injected errors are mostly added or swapped objects. Pairs built from
the annotations put both answers in play, one to one per image:
- every object present: "Is there a {name} in the image?" with "yes" chosen and "no" rejected;
- as many absent objects, drawn in turn by POPE's strategies (``random``, ``popular``, ``adversarial``),
  counted over the training images only (never the evaluation set): "no" chosen, "yes" rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from bpo_ray.eval.probes import QUESTION, SPLITS, LabeledImage, build_probes
from bpo_ray.negatives.pairs import normalize, stable_seed

EXISTENCE = "existence"
PRESENT = "present"  # the strategy column of a question about an object that is there


@dataclass(frozen=True)
class ExistenceQuestion:
    image_id: str
    name: str
    present: bool
    strategy: str  # PRESENT, or the POPE strategy that drew this absent object

    @property
    def question(self) -> str:
        return QUESTION.format(name=self.name)

    @property
    def yes(self) -> str:
        return f"Yes, there is a {self.name} in the image."

    @property
    def no(self) -> str:
        return f"No, there is no {self.name} in the image."

    @property
    def chosen(self) -> str:
        return self.yes if self.present else self.no

    @property
    def rejected(self) -> str:
        return self.no if self.present else self.yes


def existence_questions(images: list[LabeledImage], vocabulary: list[str], strategies: list[str],
                        seed: int) -> list[ExistenceQuestion]:
    """Per image: one question per object present, and as many about absent objects, taken from the
    strategies in turn (the first one seeded per image) so a small image is not always asked by the first."""
    unknown = [s for s in strategies if s not in SPLITS]
    if unknown or not strategies:
        raise ValueError(f"existence strategies {strategies}: choose one or more of {', '.join(SPLITS)}")
    absent_by: dict[str, dict[str, list[str]]] = {s: {} for s in strategies}
    for strategy in strategies:
        for probe in build_probes(images, vocabulary, strategy, seed):
            if not probe.label:
                absent_by[strategy].setdefault(probe.image_id, []).append(probe.name)
    out: list[ExistenceQuestion] = []
    for img in images:
        present = sorted(set(img.objects))
        out += [ExistenceQuestion(img.image_id, name, True, PRESENT) for name in present]
        queues = {s: list(absent_by[s].get(img.image_id, ())) for s in strategies}
        start = stable_seed(seed, img.image_id) % len(strategies)
        order = strategies[start:] + strategies[:start]
        taken: list[str] = []
        turn = 0
        while len(taken) < len(present) and any(queues.values()):
            strategy = order[turn % len(order)]
            turn += 1
            queue = queues[strategy]
            while queue and queue[0] in taken:
                queue.pop(0)
            if queue:
                taken.append(queue.pop(0))
                out.append(ExistenceQuestion(img.image_id, taken[-1], False, strategy))
    return out


def image_keys(image: str, root: str) -> tuple[str, ...]:
    """Names under which a sample's ``image_ref`` may point at an annotated image: its path under the
    annotations' image root, and its file name (LLaVA records often prefix a folder the annotations lack)."""
    path = PurePosixPath(image)
    try:
        relative = str(path.relative_to(root))
    except ValueError:
        relative = str(path)
    return relative, path.name


def plan(images: list[LabeledImage], questions: list[ExistenceQuestion], root: str) -> dict[str, list[ExistenceQuestion]]:
    """Questions grouped per image, under each name ``image_keys`` gives the image."""
    by_image: dict[str, list[ExistenceQuestion]] = {}
    for q in questions:
        by_image.setdefault(q.image_id, []).append(q)
    keyed: dict[str, list[ExistenceQuestion]] = {}
    for img in images:
        for key in image_keys(img.image, root):
            keyed.setdefault(key, by_image.get(img.image_id, []))
    return keyed


def questions_for(image_ref: str, keyed: dict[str, list[ExistenceQuestion]]) -> list[ExistenceQuestion] | None:
    """The planned questions for a sample's image (None: the image has no annotation)."""
    for key in (image_ref, PurePosixPath(image_ref).name):
        if key in keyed:
            return keyed[key]
    return None


def by_representative(samples, keyed: dict[str, list[ExistenceQuestion]]
                      ) -> tuple[dict[str, list[ExistenceQuestion]], int, int]:
    """Each annotated image's questions under the one sample that lends the image (its smallest sample id),
    so an image's pairs are made once however many samples show it; and how many of the images shown have
    an annotation and how many have none. ``samples``: (sample_id, image_ref) pairs."""
    first: dict[str, str] = {}
    for sample_id, image_ref in samples:
        if image_ref not in first or sample_id < first[image_ref]:
            first[image_ref] = sample_id
    asked = {ref: questions_for(ref, keyed) for ref in first}
    return ({first[ref]: qs for ref, qs in asked.items() if qs},
            sum(qs is not None for qs in asked.values()), sum(qs is None for qs in asked.values()))


def yes_no_side(chosen: str, rejected: str) -> str | None:
    """``yes`` or ``no``: which answer a pair argues for when it is a yes/no pair (the chosen answer opens
    with one, the rejected with the other); None for any other pair."""
    first = [(normalize(text).split() or [""])[0] for text in (chosen, rejected)]
    if set(first) == {"yes", "no"}:
        return first[0]
    return None


def balancing_drops(yes: int, no: int, candidates: dict[str, list[str]], seed: int, share: float = 0.5,
                    first: frozenset[str] = frozenset()) -> tuple[str | None, list[str]]:
    """Which existence pairs to drop so that yes-chosen pairs are ``share`` of the whole mix's yes/no pairs (0.5:
    as many as no-chosen ones): from the side over its share, as many as it is over by, or all it has; those in
    ``first`` before the others, each group drawn seeded, not in table order. ``candidates``: the existence
    pairs' ids per side. Returns (side, ids)."""
    if not 0 < share < 1:
        raise ValueError(f"share {share} is not between 0 and 1")
    surplus_yes = yes - round(share * no / (1 - share))  # yes-chosen pairs over the share the no-chosen allow
    surplus_no = no - round((1 - share) * yes / share)
    if surplus_yes <= 0 and surplus_no <= 0:
        return None, []
    side, surplus = ("yes", surplus_yes) if surplus_yes > 0 else ("no", surplus_no)
    pool = sorted(candidates.get(side, ()),
                  key=lambda pair_id: (pair_id not in first, stable_seed(seed, "balance", pair_id), pair_id))
    return side, pool[:surplus]


def steering_share(questions: int, present: int, said_yes: int, gain: float, limit: float = 0.1) -> float:
    """``balance: steer``: the yes-chosen share of the run's yes/no pairs that leans against the policy's own
    bias: one half, moved by ``gain`` times how much more (or less) often the policy says yes than the objects
    asked about are there, on the training questions; within ``limit`` of one half."""
    if questions <= 0:
        raise ValueError("no existence questions were answered")
    lean = gain * (present - said_yes) / questions
    return 0.5 + max(-limit, min(limit, lean))
