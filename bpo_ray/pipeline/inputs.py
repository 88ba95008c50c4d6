"""What each stage opens from outside the run directory: data files and image folders, existing pairs, COCO
annotations, models given as paths. The job looks for those of the stages it is about to run before Ray
starts, so a mistyped path is named at once, not found by a stage after the stages before it have run (in
the demo, 10 minutes of sft) and reported as a Ray Data traceback.

Hub ids (models, ``load_dataset`` names) cannot be looked up from here: a name counts as a path when it is
a URI, absolute or starts with ``./`` or ``../``, or when the format it is read in is a file's.
"""

from __future__ import annotations

from bpo_ray import storage
from bpo_ray.config import TINY_SCHEME, DataConfig, RunConfig, bootstraps
from bpo_ray.data.dataset import pairs_format

PATH_PREFIXES = ("/", "./", "../")


def _is_path(name: str) -> bool:
    """Whether a model or dataset name is a path rather than a Hub id (``tiny://`` names are built, not read)."""
    return not name.startswith(TINY_SCHEME) and (storage.is_uri(name) or name.startswith(PATH_PREFIXES))


def _source(data: DataConfig, key: str) -> dict[str, str | None]:
    if data.format == "synthetic":  # bundled: written into the cache on first use
        return {}
    return {f"{key}.path": data.path, f"{key}.image_root": data.image_root}


def _model(cfg: RunConfig) -> dict[str, str | None]:
    name = cfg.model.name_or_path
    return {"model.name_or_path": name} if _is_path(name) else {}


def _base_model(cfg: RunConfig) -> dict[str, str | None]:
    """The base model, read by every stage that loads the policy when no sft stage makes one in the run."""
    return {} if cfg.sft.enabled else _model(cfg)


def sft(cfg: RunConfig) -> dict[str, str | None]:
    return {**_source(cfg.sft.data, "sft.data"), **_model(cfg)} if cfg.sft.enabled else {}


def data(cfg: RunConfig) -> dict[str, str | None]:
    return _source(cfg.data, "data") if bootstraps(cfg) else {}


def negatives(cfg: RunConfig) -> dict[str, str | None]:
    named = _base_model(cfg)
    injection = cfg.negatives.injection
    if injection.enabled and injection.engine != "rules" and _is_path(injection.model):
        named["negatives.injection.model"] = injection.model
    pairs = cfg.negatives.extra_pairs
    if pairs is not None:
        if pairs_format(pairs) != "hub" or _is_path(pairs.path):
            named["negatives.extra_pairs.path"] = pairs.path
        named["negatives.extra_pairs.image_root"] = pairs.image_root
    return named


def policy(cfg: RunConfig) -> dict[str, str | None]:
    """reference and train: the model they align (the sft stage's output, in the run, when there is one)."""
    return _base_model(cfg)


def evaluation(cfg: RunConfig) -> dict[str, str | None]:
    if not cfg.eval.enabled:
        return {}
    return {**_base_model(cfg), "eval.coco_annotations": cfg.eval.coco_annotations,
            "eval.coco_image_root": cfg.eval.coco_image_root}
