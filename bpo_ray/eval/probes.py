"""POPE-style probe sets, pure: which object to ask about in which image, with the known answer.

For each image, every object in it is asked about once (label yes) and as many absent objects are
sampled (label no) by one of POPE's strategies:
- ``random``: any absent object;
- ``popular``: the absent objects that appear in the most images of the set;
- ``adversarial``: the absent objects that co-occur most often with the ones present (where a language
  prior pulls hardest).
The same code serves the synthetic shapes (objects are "red circle", …) and COCO annotations (category
names).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("random", "popular", "adversarial")
QUESTION = "Is there a {name} in the image?"


@dataclass(frozen=True)
class Probe:
    image_id: str
    image: str  # path of the image file
    name: str  # the object asked about
    label: bool  # truly present

    @property
    def question(self) -> str:
        return QUESTION.format(name=self.name)


@dataclass(frozen=True)
class LabeledImage:
    image_id: str
    image: str
    objects: tuple[str, ...]  # object names present (deduplicated, sorted)


def build_probes(images: list[LabeledImage], vocabulary: list[str], split: str, seed: int) -> list[Probe]:
    if split not in SPLITS:
        raise ValueError(f"unknown POPE split {split!r}; choose from {', '.join(SPLITS)}")
    rng = np.random.default_rng(seed)
    frequency = Counter(name for img in images for name in img.objects)
    together: Counter = Counter()
    for img in images:
        for a in img.objects:
            for b in img.objects:
                if a != b:
                    together[a, b] += 1
    probes = []
    for img in images:
        present = set(img.objects)
        absent = [name for name in vocabulary if name not in present]
        k = min(len(present), len(absent))
        if split == "random":
            chosen = [absent[i] for i in rng.permutation(len(absent))[:k]]
        else:
            def score(name, present=present):
                if split == "popular":
                    return frequency[name]
                return sum(together[p, name] for p in present)
            # Ties broken by a seeded shuffle, so equal candidates are not always taken in vocabulary order.
            shuffled = [absent[i] for i in rng.permutation(len(absent))]
            chosen = sorted(shuffled, key=score, reverse=True)[:k]
        probes += [Probe(img.image_id, img.image, name, True) for name in sorted(present)]
        probes += [Probe(img.image_id, img.image, name, False) for name in chosen]
    return probes


# ---------------------------------------------------------------------------------------------- sources
def synthetic_images(dataset_dir: str | Path) -> list[LabeledImage]:
    root = Path(dataset_dir)
    out = []
    for line in (root / "truth.jsonl").read_text().splitlines():
        row = json.loads(line)
        names = sorted({f"{o['color']} {o['shape']}" for o in row["objects"]})
        out.append(LabeledImage(row["image_id"], str(root / row["image"]), tuple(names)))
    return out


def coco_images(annotations: str | Path, image_root: str | Path, num_images: int, seed: int) -> tuple[list[LabeledImage], list[str]]:
    """A COCO instances file → (a seeded sample of annotated images, the category vocabulary)."""
    path = Path(annotations)
    try:
        coco = json.loads(path.read_text())
        categories = {c["id"]: c["name"] for c in coco["categories"]}
        files = {img["id"]: img["file_name"] for img in coco["images"]}
        objects: dict = {}
        for ann in coco["annotations"]:
            objects.setdefault(ann["image_id"], set()).add(categories[ann["category_id"]])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a COCO instances file ({err.__class__.__name__}: {err})") from err
    ids = sorted(i for i in objects if i in files)
    if not ids:
        raise ValueError(f"{path}: no image has annotations")
    rng = np.random.default_rng(seed)
    picked = [ids[i] for i in sorted(rng.permutation(len(ids))[:num_images])]
    images = [LabeledImage(str(i), str(Path(image_root) / files[i]), tuple(sorted(objects[i]))) for i in picked]
    return images, sorted(set(categories.values()))
