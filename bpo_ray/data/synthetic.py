"""The bundled "shapes" dataset: procedural images whose truth is known, so hallucination can be scored.

Each image holds a few coloured shapes in the cells of a 3×3 grid. Ground truth is structured data
(shape, colour, size, cell, bounding box); captions and QA are rendered from it in LLaVA conversation
format. A *language prior* is built in the way web data has one: some anchor objects are usually
accompanied by a fixed companion (e.g. a red circle by a blue square), drawn small and faint — weak visual
evidence plus a strong prior is what makes a model name the companion when it is absent. With
``caption_prior`` the annotations also carry the prior the way web captions do: an image that shows an anchor
without its companion is sometimes annotated as if the companion were there (its truth file keeps what is
drawn). A model fine-tuned on such data names the companion whether it can see or not. With
``companion_questions`` an image that shows an anchor without its companion is also asked about both (answers:
yes, no), the way negative instructions ask about plausible absent objects: preference data that should teach a
model to say no where its prior says yes needs such questions.

Everything is a pure function of the seed: the same seed writes byte-identical files.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (150, 60, 190),
}
# Row-major names of the 3×3 grid cells.
CELLS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
# anchor → companion: the co-occurrence prior.
COMPANIONS = {("red", "circle"): ("blue", "square"), ("green", "triangle"): ("yellow", "circle")}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
BACKGROUND = (245, 245, 245)
# Bump when the files some setting writes change: cached datasets are keyed by it, with the settings.
VERSION = 2


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str  # "small" | "large"
    cell: int  # index into CELLS
    bbox: tuple[int, int, int, int]
    faint: bool = False

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def position(self) -> str:
        return CELLS[self.cell]


def sample_objects(rng: np.random.Generator, image_size: int, max_objects: int, cooccurrence: float,
                   anchor_rate: float = 0.0):
    """Pick objects for one image: distinct (colour, shape) pairs in distinct cells. With ``anchor_rate`` the
    first object is an anchor that often: frequent anchors make the co-occurrence prior strong."""
    count = int(rng.integers(1, max_objects + 1))
    cells = [int(c) for c in rng.permutation(len(CELLS))]
    kinds: list[tuple[str, str, bool]] = []
    colours = list(COLORS)
    anchors = list(COMPANIONS)
    while len(kinds) < count:
        kind = (colours[int(rng.integers(len(colours)))], SHAPES[int(rng.integers(len(SHAPES)))])
        if not kinds and anchor_rate and rng.random() < anchor_rate:
            kind = anchors[int(rng.integers(len(anchors)))]
        if any(k[:2] == kind for k in kinds):
            continue
        kinds.append((*kind, False))
        companion = COMPANIONS.get(kind)
        if (companion and len(kinds) < len(CELLS) and rng.random() < cooccurrence
                and not any(k[:2] == companion for k in kinds)):
            kinds.append((*companion, True))
    cell_px = image_size / 3
    objects = []
    for (color, shape, is_companion), cell in zip(kinds, cells[: len(kinds)], strict=True):
        size = "small" if is_companion or rng.random() < 0.3 else "large"
        extent = cell_px * (0.45 if size == "small" else 0.85)
        row, col = divmod(cell, 3)
        cx = (col + 0.5) * cell_px + rng.uniform(-0.05, 0.05) * cell_px
        cy = (row + 0.5) * cell_px + rng.uniform(-0.05, 0.05) * cell_px
        half = extent / 2
        bbox = tuple(int(round(v)) for v in (cx - half, cy - half, cx + half, cy + half))
        objects.append(ShapeObject(shape, color, size, cell, bbox, faint=is_companion))
    return objects


def render(objects: list[ShapeObject], image_size: int) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        rgb = COLORS[obj.color]
        if obj.faint:  # low contrast: blend towards the background
            rgb = tuple(int(0.45 * c + 0.55 * b) for c, b in zip(rgb, BACKGROUND, strict=True))
        x0, y0, x1, y1 = obj.bbox
        if obj.shape == "circle":
            draw.ellipse(obj.bbox, fill=rgb)
        elif obj.shape == "square":
            draw.rectangle(obj.bbox, fill=rgb)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=rgb)
    return image


# --------------------------------------------------------------------------------------- text from truth
def describe(objects: list[ShapeObject]) -> str:
    """The caption, objects in reading order (row by row): one right answer per image, so a model that sees
    well can get it exactly."""
    n = len(objects)
    head = "There is one shape." if n == 1 else f"There are {NUMBER_WORDS[n]} shapes."
    parts = [f"A {o.size} {o.color} {o.shape} is at the {o.position}." for o in sorted(objects, key=lambda o: o.cell)]
    return " ".join([head, *parts])


def qa_pairs(objects: list[ShapeObject], rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
    """Short questions with answers that follow from the truth: count, existence, colour, position."""
    present = {o.name for o in objects}
    absent = [f"{c} {s}" for c in COLORS for s in SHAPES if f"{c} {s}" not in present]
    pairs: list[tuple[str, str]] = []
    for kind in rng.permutation(4)[:count] if count <= 4 else rng.integers(0, 4, size=count):
        obj = objects[int(rng.integers(len(objects)))]
        if kind == 0:
            n = len(objects)
            noun = "shape" if n == 1 else "shapes"
            pairs.append(("How many shapes are in the image?", f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} {noun}."))
        elif kind == 1:
            if absent and rng.random() < 0.5:
                name = absent[int(rng.integers(len(absent)))]
                pairs.append((f"Is there a {name} in the image?", f"No, there is no {name}."))
            else:
                pairs.append((f"Is there a {obj.name} in the image?", f"Yes, there is a {obj.name}."))
        elif kind == 2:
            same_shape = [o for o in objects if o.shape == obj.shape]
            if len(same_shape) == 1:
                pairs.append((f"What color is the {obj.shape}?", f"The {obj.shape} is {obj.color}."))
            else:
                pairs.append((f"Where is the {obj.name}?", f"The {obj.name} is at the {obj.position}."))
        else:
            pairs.append((f"Where is the {obj.name}?", f"The {obj.name} is at the {obj.position}."))
    return pairs


DESCRIBE_PROMPT = "Describe the image in detail."


def annotated_objects(objects: list[ShapeObject], rng: np.random.Generator, caption_prior: float) -> list[ShapeObject]:
    """What the annotator wrote down: the drawn objects, plus (with probability ``caption_prior``) the missing
    companion of an anchor, small, in the next free cell after the anchor in reading order: a plausible but
    absent object, like a web caption's. One place, not any free cell: spread over seven cells, the prior
    would be too weak at each for a greedy decoder to ever follow it."""
    taken = {o.cell for o in objects}
    names = {(o.color, o.shape) for o in objects}
    anchor = next((o for o in objects if (o.color, o.shape) in COMPANIONS
                   and COMPANIONS[(o.color, o.shape)] not in names), None)
    if anchor is None or len(taken) == len(CELLS) or rng.random() >= caption_prior:
        return objects
    color, shape = COMPANIONS[(anchor.color, anchor.shape)]
    cell = next(c % len(CELLS) for c in range(anchor.cell + 1, anchor.cell + len(CELLS)) if c % len(CELLS) not in taken)
    return [*objects, ShapeObject(shape, color, "small", cell, bbox=(0, 0, 0, 0), faint=True)]  # text only, never drawn


def missing_companions(objects: list[ShapeObject]) -> list[tuple[str, str]]:
    """(anchor, companion) names for each anchor here whose usual companion is not."""
    names = {(o.color, o.shape) for o in objects}
    return [(" ".join(anchor), " ".join(companion)) for anchor, companion in COMPANIONS.items()
            if anchor in names and companion not in names]


@dataclass
class SyntheticSample:
    image_id: str
    image: Image.Image
    objects: list[ShapeObject]
    records: list[dict]  # LLaVA-format records that use this image


def generate(num_images: int, seed: int = 0, image_size: int = 64, max_objects: int = 3,
             cooccurrence: float = 0.8, qa_per_image: int = 2, anchor_rate: float = 0.0,
             caption_prior: float = 0.0, companion_questions: float = 0.0):
    """Yield SyntheticSample, deterministically for a seed."""
    rng = np.random.default_rng(seed)
    # Their own streams, so that caption_prior=0 and companion_questions=0 leave every other draw (and so the
    # files) as they were.
    annotator = np.random.default_rng([seed, 1])
    asker = np.random.default_rng([seed, 2])
    for index in range(num_images):
        image_id = f"shapes-{seed}-{index:05d}"
        objects = sample_objects(rng, image_size, max_objects, cooccurrence, anchor_rate)
        annotated = annotated_objects(objects, annotator, caption_prior) if caption_prior else objects
        file_name = f"images/{image_id}.png"
        records = [{
            "id": f"{image_id}-desc",
            "image": file_name,
            "conversations": [
                {"from": "human", "value": f"<image>\n{DESCRIBE_PROMPT}"},
                {"from": "gpt", "value": describe(annotated)},
            ],
        }]
        if qa_per_image:
            qa = qa_pairs(objects, rng, qa_per_image)
            if annotated is not objects:  # asked of what was annotated; drawn from the annotator's stream, as above
                qa = qa_pairs(annotated, annotator, qa_per_image)
            turns = []
            for turn, (question, answer) in enumerate(qa):
                turns.append({"from": "human", "value": f"<image>\n{question}" if turn == 0 else question})
                turns.append({"from": "gpt", "value": answer})
            records.append({"id": f"{image_id}-qa", "image": file_name, "conversations": turns})
        if companion_questions:  # asked of what was annotated, like the rest: no "no" after an annotated "yes"
            for anchor, companion in missing_companions(annotated):
                if asker.random() >= companion_questions:
                    continue
                # Both: the anchor that is there (yes) and its companion that is not (no); denials alone
                # would teach "no" to every existence question. Each a conversation of its own, as the
                # question comes first in use (a later turn is asked with other answers in view).
                for name, answer in ((anchor, f"Yes, there is a {anchor}."), (companion, f"No, there is no {companion}.")):
                    records.append({"id": f"{image_id}-ask-{name.replace(' ', '-')}", "image": file_name,
                                    "conversations": [{"from": "human", "value": f"<image>\nIs there a {name} in the image?"},
                                                      {"from": "gpt", "value": answer}]})
        yield SyntheticSample(image_id, render(objects, image_size), objects, records)


def truth_row(sample: SyntheticSample) -> dict:
    return {
        "image_id": sample.image_id,
        "image": f"images/{sample.image_id}.png",
        "objects": [{**asdict(o), "position": o.position} for o in sample.objects],
    }


def write_dataset(out_dir: str | Path, num_images: int = 64, seed: int = 0, image_size: int = 64,
                  max_objects: int = 3, cooccurrence: float = 0.8, qa_per_image: int = 2,
                  anchor_rate: float = 0.0, caption_prior: float = 0.0, companion_questions: float = 0.0) -> Path:
    """Write images/*.png, records.json (LLaVA format) and truth.jsonl (structured truth)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records, truths = [], []
    for sample in generate(num_images, seed, image_size, max_objects, cooccurrence, qa_per_image, anchor_rate,
                           caption_prior, companion_questions):
        buf = io.BytesIO()
        sample.image.save(buf, format="PNG", optimize=False)
        (out / "images" / f"{sample.image_id}.png").write_bytes(buf.getvalue())
        records.extend(sample.records)
        truths.append(truth_row(sample))
    (out / "records.json").write_text(json.dumps(records, indent=1))
    (out / "truth.jsonl").write_text("".join(json.dumps(t) + "\n" for t in truths))
    return out


def corpus(num_images: int = 400, seed: int = 12345) -> list[str]:
    """Text that a tiny tokenizer is trained on: every word the shapes data can produce."""
    lines = []
    for sample in generate(num_images, seed=seed, qa_per_image=4):
        for record in sample.records:
            lines.extend(turn["value"].replace("<image>\n", "") for turn in record["conversations"])
    return lines
