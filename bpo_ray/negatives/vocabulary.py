"""Word lists for the ``rules`` error injector: what it may recolour, recount, mirror, swap and add.

Three vocabularies (``negatives.injection.vocabulary``):
- ``general``: COCO's 80 categories with common synonyms and plurals, colours, counts and spatial
  relations, for LLaVA-style captions of everyday images. An object is swapped for another of its COCO
  supercategory (a dog for a cat, a fork for a spoon) in the same number, and the object added is one
  that shares a scene with something the caption names (a chair beside a dining table): a plausible error.
- ``shapes``: the bundled synthetic data's own words, including its co-occurrence prior (a red circle
  comes with a blue square); the embedded demo's negatives are made with it.
- a path to a JSON file: the dataset's own. Either a COCO instances (or categories) file, whose categories
  become the objects, swapped within their supercategory and added by how often they share an image; or
  ``{"objects": {name: {"plural", "swaps", "companions"}}, "colors", "numbers", "relations"}``, any key
  left out taken from ``general``.
Pure data and functions; ``inject.py`` applies them.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations

from bpo_ray import storage
from bpo_ray.data.synthetic import COMPANIONS


@dataclass(frozen=True)
class Vocabulary:
    colors: tuple[str, ...]
    numbers: tuple[str, ...]
    relations: dict[str, str]                # a spatial word or phrase → its mirror image
    swaps: dict[str, tuple[str, ...]]        # an object as written → what may replace it, same number
    companions: dict[str, tuple[str, ...]]   # an object as written → objects that plausibly come with it
    fallback_companions: tuple[str, ...]     # added when the answer names no known object
    places: tuple[str, ...]                  # where an added object is said to be
    added: str = "There is also {a} {object} {place}."
    name: str = field(default="custom", compare=False)


# ----------------------------------------------------------------------------------------- the shapes
_SHAPE_SWAPS = {
    "circle": ("square", "triangle"), "square": ("circle", "triangle"), "triangle": ("square", "circle"),
    "dog": ("cat", "frisbee", "leash"), "cat": ("dog", "sofa"), "person": ("bicycle", "umbrella"),
    "man": ("woman", "hat"), "woman": ("man", "handbag"), "car": ("truck", "traffic light"),
    "table": ("chair", "cup"), "chair": ("table", "lamp"), "cup": ("plate", "spoon"), "plate": ("fork", "cup"),
    "bed": ("pillow", "lamp"), "horse": ("fence", "rider"), "boat": ("dock", "bird"), "tree": ("bench", "bird"),
    "pizza": ("knife", "plate"), "laptop": ("mouse", "keyboard"), "sink": ("toilet", "mirror"),
}
_SHAPE_COMPANIONS = {f"{a[0]} {a[1]}": f"{c[0]} {c[1]}" for a, c in COMPANIONS.items()}

SHAPES = Vocabulary(
    colors=("red", "green", "blue", "yellow", "purple", "orange", "black", "white", "brown", "pink", "gray"),
    numbers=("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
    relations={"left": "right", "right": "left", "top": "bottom", "bottom": "top", "above": "below",
               "below": "above", "upper": "lower", "lower": "upper", "inside": "outside", "outside": "inside",
               "front": "back", "back": "front"},
    swaps=_SHAPE_SWAPS,
    # The shapes' prior first (a red circle → a blue square), then whatever shares a scene with a word.
    companions={**{a: (c,) for a, c in _SHAPE_COMPANIONS.items()}, **_SHAPE_SWAPS},
    fallback_companions=tuple(_SHAPE_COMPANIONS.values()),
    places=("left", "right", "top", "bottom", "center"),
    added="There is also a small {object} at the {place}.",
    name="shapes",
)


# ------------------------------------------------------------------------------------------ general
# COCO's categories by supercategory; each as its forms: (singular, plural[, synonym singular, plural …]).
# "orange" the fruit is left out: the word is recoloured as a colour, and a fruit swapped for "a blue" is
# not a plausible error.
COCO = {
    "person": [("person", "people"), ("man", "men"), ("woman", "women"), ("boy", "boys"), ("girl", "girls"),
               ("child", "children", "kid", "kids")],
    "vehicle": [("bicycle", "bicycles", "bike", "bikes"), ("car", "cars"),
                ("motorcycle", "motorcycles", "motorbike", "motorbikes"),
                ("airplane", "airplanes", "plane", "planes"), ("bus", "buses"), ("train", "trains"),
                ("truck", "trucks"), ("boat", "boats")],
    "outdoor": [("traffic light", "traffic lights"), ("fire hydrant", "fire hydrants"), ("stop sign", "stop signs"),
                ("parking meter", "parking meters"), ("bench", "benches")],
    "animal": [("bird", "birds"), ("cat", "cats"), ("dog", "dogs"), ("horse", "horses"), ("sheep", "sheep"),
               ("cow", "cows"), ("elephant", "elephants"), ("bear", "bears"), ("zebra", "zebras"),
               ("giraffe", "giraffes")],
    "accessory": [("backpack", "backpacks"), ("umbrella", "umbrellas"), ("handbag", "handbags", "purse", "purses"),
                  ("tie", "ties"), ("suitcase", "suitcases")],
    "sports": [("frisbee", "frisbees"), ("ski", "skis"), ("snowboard", "snowboards"),
               ("ball", "balls", "sports ball", "sports balls"), ("kite", "kites"),
               ("baseball bat", "baseball bats"), ("baseball glove", "baseball gloves"),
               ("skateboard", "skateboards"), ("surfboard", "surfboards"),
               ("tennis racket", "tennis rackets", "racket", "rackets")],
    "kitchen": [("bottle", "bottles"), ("wine glass", "wine glasses"), ("cup", "cups", "mug", "mugs"),
                ("fork", "forks"), ("knife", "knives"), ("spoon", "spoons"), ("bowl", "bowls")],
    "food": [("banana", "bananas"), ("apple", "apples"), ("sandwich", "sandwiches"), ("broccoli", "broccoli"),
             ("carrot", "carrots"), ("hot dog", "hot dogs"), ("pizza", "pizzas"),
             ("donut", "donuts", "doughnut", "doughnuts"), ("cake", "cakes")],
    "furniture": [("chair", "chairs"), ("couch", "couches", "sofa", "sofas"),
                  ("potted plant", "potted plants", "plant", "plants"), ("bed", "beds"),
                  ("dining table", "dining tables", "table", "tables"), ("toilet", "toilets")],
    "electronic": [("tv", "tvs", "television", "televisions"), ("laptop", "laptops"), ("mouse", "mice"),
                   ("remote", "remotes"), ("keyboard", "keyboards"), ("cell phone", "cell phones", "phone", "phones")],
    "appliance": [("microwave", "microwaves"), ("oven", "ovens"), ("toaster", "toasters"), ("sink", "sinks"),
                  ("refrigerator", "refrigerators", "fridge", "fridges")],
    "indoor": [("book", "books"), ("clock", "clocks"), ("vase", "vases"), ("scissors", "scissors"),
               ("teddy bear", "teddy bears"), ("hair dryer", "hair dryers"), ("toothbrush", "toothbrushes")],
}
# Objects seen together (by the head noun of each COCO entry): an added companion comes from a scene that
# the answer's objects belong to.
SCENES = (
    ("dining table", "chair", "cup", "bowl", "fork", "knife", "spoon", "bottle", "wine glass", "pizza", "cake",
     "sandwich", "person"),
    ("oven", "microwave", "refrigerator", "sink", "toaster", "bowl", "cup", "bottle", "knife"),
    ("couch", "tv", "remote", "chair", "potted plant", "book", "clock", "vase", "laptop", "cat", "dog"),
    ("bed", "book", "clock", "laptop", "teddy bear", "cat", "tv"),
    ("toilet", "sink", "toothbrush", "hair dryer", "bottle"),
    ("laptop", "mouse", "keyboard", "cell phone", "book", "cup", "tv", "chair"),
    ("car", "bus", "truck", "traffic light", "stop sign", "fire hydrant", "parking meter", "bench", "person",
     "bicycle", "motorcycle", "umbrella", "handbag", "backpack", "dog"),
    ("train", "person", "bench", "suitcase", "backpack", "traffic light"),
    ("airplane", "truck", "person", "suitcase", "car"),
    ("boat", "bird", "person", "umbrella", "surfboard"),
    ("horse", "cow", "sheep", "dog", "person", "truck"),
    ("elephant", "giraffe", "zebra", "bird", "person", "truck"),
    ("bear", "bird", "bench"),
    ("frisbee", "dog", "person", "kite", "backpack"),
    ("ski", "snowboard", "person", "backpack"),
    ("ball", "baseball bat", "baseball glove", "tennis racket", "person", "bench"),
    ("skateboard", "person", "bench", "car"),
    ("surfboard", "kite", "boat", "person", "umbrella"),
    ("banana", "apple", "carrot", "broccoli", "bowl", "knife", "donut", "hot dog"),
    ("scissors", "book", "cup", "cell phone", "vase"),
)
GENERAL_PLACES = ("on the left", "on the right", "in the background", "in the foreground", "near the center")
GENERAL_RELATIONS = {
    "left": "right", "right": "left", "top": "bottom", "bottom": "top", "above": "below", "below": "above",
    "upper": "lower", "lower": "upper", "inside": "outside", "outside": "inside", "in front of": "behind",
    "behind": "in front of", "on top of": "under", "under": "on top of", "underneath": "on top of",
    "beneath": "above", "over": "under", "near": "far from", "far from": "near", "foreground": "background",
    "background": "foreground", "into": "out of", "out of": "into", "toward": "away from",
    "away from": "toward", "beside": "across from", "across from": "beside",
}
GENERAL_COLORS = SHAPES.colors + ("silver", "gold", "beige", "tan", "grey")
GENERAL_NUMBERS = SHAPES.numbers + ("eleven", "twelve")


def _forms(entry: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(entry[i], entry[i + 1]) for i in range(0, len(entry), 2)]


def _build(groups: dict[str, list[tuple[str, ...]]], scenes, name: str, **words) -> Vocabulary:
    """Swaps within a group in the same number (plural for plural), companions from the scenes."""
    swaps: dict[str, tuple[str, ...]] = {}
    head = {}  # every written form → the name the scenes know it by
    for group, entries in groups.items():
        for entry in entries:
            for singular, plural in _forms(entry):
                head[singular] = head[plural] = group if group == "person" else entry[0]
            others = [e for e in entries if e is not entry]
            for singular, plural in _forms(entry):
                swaps.setdefault(singular, tuple(e[0] for e in others))
                if plural != singular:
                    swaps.setdefault(plural, tuple(e[1] for e in others))
    scene_mates: dict[str, list[str]] = {}
    for scene in scenes:
        for a in scene:
            mates = scene_mates.setdefault(a, [])
            mates += [b for b in scene if b != a and b not in mates]
    companions = {form: tuple(scene_mates.get(h, ())) for form, h in head.items() if scene_mates.get(h)}
    swaps = {k: v for k, v in swaps.items() if v}
    fallback = tuple(dict.fromkeys(c for scene in scenes for c in scene[:2]))
    return Vocabulary(swaps=swaps, companions=companions, fallback_companions=fallback, name=name, **words)


GENERAL = _build(COCO, SCENES, "general", colors=GENERAL_COLORS, numbers=GENERAL_NUMBERS,
                 relations=GENERAL_RELATIONS, places=GENERAL_PLACES)
BUILT_IN = {"general": GENERAL, "shapes": SHAPES}


# ------------------------------------------------------------------------------------- from a file
def plural(noun: str) -> str:
    """A category name's plural, for names a vocabulary file does not spell out."""
    irregular = {"person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice",
                 "knife": "knives", "sheep": "sheep", "scissors": "scissors", "skis": "skis", "fish": "fish"}
    *first, last = noun.split(" ")
    if last in irregular:
        return " ".join([*first, irregular[last]])
    if last.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if last.endswith("y") and last[-2:-1] not in tuple("aeiou"):
        return noun[:-1] + "ies"
    return noun + "s"


def from_coco(coco: dict, source: str) -> Vocabulary:
    """A COCO instances or categories file: objects swap within their supercategory; where image
    annotations are given, an object's companions are the categories most often in an image with it."""
    try:
        categories = {c["id"]: (c["name"], c.get("supercategory", "object")) for c in coco["categories"]}
    except (KeyError, TypeError) as err:
        raise ValueError(f"{source}: categories need an id and a name ({err})") from err
    groups: dict[str, list[tuple[str, ...]]] = {}
    for name, supercategory in categories.values():
        groups.setdefault(supercategory, []).append((name, plural(name)))
    per_image: dict = {}
    for ann in coco.get("annotations", ()):
        if ann.get("category_id") in categories:
            per_image.setdefault(ann.get("image_id"), set()).add(categories[ann["category_id"]][0])
    together = Counter(pair for names in per_image.values() for pair in combinations(sorted(names), 2))
    scenes = []
    for name, _ in categories.values():
        mates = Counter({b if a == name else a: n for (a, b), n in together.items() if name in (a, b)})
        if mates:
            scenes.append((name, *(m for m, _ in mates.most_common(5))))
    if not scenes:  # no annotations: the supercategory is the best guess at a scene
        scenes = [tuple(e[0] for e in entries) for entries in groups.values()]
    return _build(groups, scenes, source, colors=GENERAL_COLORS, numbers=GENERAL_NUMBERS,
                  relations=GENERAL_RELATIONS, places=GENERAL_PLACES)


def from_mapping(spec: dict, source: str) -> Vocabulary:
    """``{"objects": {name: {"plural", "swaps", "companions"}}, "colors", "numbers", "relations"}``."""
    unknown = set(spec) - {"objects", "colors", "numbers", "relations", "places"}
    if unknown:
        raise ValueError(f"{source}: unknown keys {sorted(unknown)} (objects, colors, numbers, relations, places)")
    swaps, companions = dict(GENERAL.swaps), dict(GENERAL.companions)
    objects = spec.get("objects", {})
    if not isinstance(objects, dict):
        raise ValueError(f"{source}: objects must map a name to its plural, swaps and companions")
    for name, entry in objects.items():
        entry = entry or {}
        many = entry.get("plural", plural(name))
        alternatives = [str(s) for s in entry.get("swaps", ())]
        if alternatives:
            swaps[name] = tuple(alternatives)
            swaps[many] = tuple(plural(s) for s in alternatives)
        if entry.get("companions"):
            companions[name] = companions[many] = tuple(str(c) for c in entry["companions"])
    relations = spec.get("relations", GENERAL.relations)
    if not isinstance(relations, dict):
        raise ValueError(f"{source}: relations must map a word to its mirror image")
    return Vocabulary(colors=tuple(spec.get("colors", GENERAL.colors)), numbers=tuple(spec.get("numbers", GENERAL.numbers)),
                      relations=dict(relations), swaps=swaps, companions=companions,
                      fallback_companions=GENERAL.fallback_companions,
                      places=tuple(spec.get("places", GENERAL.places)), name=source)


def load(spec: str) -> Vocabulary:
    """``general``, ``shapes`` or a JSON file (COCO categories or our own layout, see the module doc)."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    try:
        data = json.loads(storage.read_text(spec))
    except (OSError, ValueError) as err:
        raise ValueError(f"{spec!r} is not auto, general, shapes or a readable JSON "
                         f"file ({err.__class__.__name__}: {err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{spec}: a vocabulary file holds a JSON object")
    return from_coco(data, spec) if "categories" in data else from_mapping(data, spec)


def for_data(spec: str, data_format: str) -> Vocabulary:
    """``auto`` (the default): the shapes' own words for the bundled synthetic data, COCO's otherwise."""
    if spec == "auto":
        return SHAPES if data_format == "synthetic" else GENERAL
    return load(spec)
