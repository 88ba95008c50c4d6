"""Stage keys from the config: which fields a stage's output depends on, hashed.

A stage's output is reusable while the config sections (or single fields) it reads hash the same
(``pipeline/rundir.stage_key`` adds its upstream's output). Fields take part unless a marker below (their
``json_schema_extra``) says otherwise.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel

# Fields marked so change how a stage runs, not what it computes: they stay out of ``section_hash``, so
# setting them never invalidates finished stages or checkpoints.
NOT_KEYED = {"stage_key": False}
# An option added after run directories exist: part of the stage keys only when set, so runs made before it
# existed (which behaved as its default does) still resume. A section so marked that is switched off
# (``enabled: false``) counts as unset: nothing reads its other settings.
KEYED_IF_SET = {"stage_key": "if_set"}
# How a stage runs (actor pools, checkpoint cadence, activation checkpointing, serving's address and
# admission), which the stage keys included until 2026-12: left out of them now, so resuming on a bigger
# cluster or another port re-runs nothing; put back in the keys that run directories made before finished
# under (``section_hash(..., earlier=True)``), so those still resume.
NO_LONGER_KEYED = {"stage_key": "earlier"}


def section_hash(cfg: BaseModel, *sections: str, earlier: bool = False) -> str:
    """Stable hash of some sections (``train``) or single fields of one (``train.loss``) of a run config: a
    stage's outputs are reusable while its inputs hash the same. A field outside the keys, or keyed only when
    set and unset, is left out, as it is from a whole section. ``earlier``: the hash run directories made
    before ``NO_LONGER_KEYED`` finished under (those fields in it)."""
    payload = {}
    for name in sections:
        if "." not in name:
            payload[name] = keyed_dump(getattr(cfg, name), earlier)
        elif (value := _keyed_field(cfg, name, earlier)) is not _UNKEYED:
            payload[name] = value
    if "model" in sections and cfg.model.name_or_path.startswith("tiny://"):
        from bpo_ray.models import TINY_VERSION  # a rebuilt tiny model is a different model

        payload["tiny_version"] = TINY_VERSION
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def keyed_dump(value: Any, earlier: bool = False) -> Any:
    """A section (or value) as the stage keys see it: the fields they leave out excluded."""
    if not isinstance(value, BaseModel):
        return value
    return value.model_dump(mode="json", exclude=_unkeyed(value, earlier))


_UNKEYED = object()


def _keyed_field(cfg: BaseModel, path: str, earlier: bool) -> Any:
    """The dumped value at a dotted ``path``, or ``_UNKEYED`` where the stage keys leave it out."""
    *parents, last = path.split(".")
    owner = cfg
    for name in parents:
        owner = getattr(owner, name)
    field = type(owner).model_fields.get(last)
    if field is None:
        raise ValueError(f"{path}: no such config field")
    value = getattr(owner, last)
    if _left_out(field, value, earlier):
        return _UNKEYED
    if isinstance(value, BaseModel):
        return keyed_dump(value, earlier)
    return owner.model_dump(mode="json", include={last})[last]


def _left_out(field, value, earlier: bool) -> bool:
    """Whether a field's value stays out of the stage keys: never keyed, no longer keyed (unless ``earlier``),
    or keyed only once set and unset (or a section switched off)."""
    marker = field.json_schema_extra
    if marker == KEYED_IF_SET:
        return value == field.get_default() or getattr(value, "enabled", True) is False
    return marker == NOT_KEYED or (marker == NO_LONGER_KEYED and not earlier)


def _unkeyed(value: BaseModel, earlier: bool) -> dict:
    """The fields outside the stage keys, at any depth (``negatives.injection.vocabulary`` as well as
    ``train.image_weight``), as pydantic's nested ``exclude``."""
    out: dict = {}
    for name, field in type(value).model_fields.items():
        current = getattr(value, name)
        if _left_out(field, current, earlier):
            out[name] = True
        elif isinstance(current, BaseModel) and (inner := _unkeyed(current, earlier)):
            out[name] = inner
    return out
