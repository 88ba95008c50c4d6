"""Loading a run config: a YAML file (or the code's defaults) plus dotted ``key=value`` overrides, validated
into a ``RunConfig``; every error names the offending key (and the closest valid one for a typo).

The command lines read ``EMBEDDED_DEFAULT`` when given no ``--config``: the demo's tuned run (an SFT base
for BPO to align, learning rates for tiny models), which the code's defaults alone are not."""

from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from bpo_ray.config.sections import RunConfig

# Shipped in the package (the wheel has no configs/; configs/tiny.yaml links here).
EMBEDDED_DEFAULT = Path(__file__).with_name("tiny.yaml")
# What makes the embedded default (which grounds yes/no answers too, over two rounds) the paper's BPO: its two
# kinds of negatives, one round.
PAPER_BPO = ("negatives.existence.enabled=false", "rounds=1")


class ConfigError(ValueError):
    """A config that cannot run; the message names the offending key."""


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` (the embedded default when not given) and ``key=value`` overrides, as every command
    line that runs a config takes them."""
    parser.add_argument("--config", default=str(EMBEDDED_DEFAULT),
                        help="run config YAML (default: the embedded default, the demo: configs/tiny.yaml, "
                             "shipped in the package)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-5")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """YAML file (or ``RunConfig``'s defaults when ``path`` is None) + dotted ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return validate_config(raw)


def validate_config(raw: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None


def literal_override(key: str, value: str | int | float | bool) -> str:
    """``key=value`` that reads back as exactly ``value``, for a value a program passes on (a path, a name):
    overrides are YAML, in which a path's " #" starts a comment, ": " makes a mapping and 2024 is a number. A
    JSON scalar is YAML too."""
    return f"{key}={json.dumps(value)}"


def apply_override(raw: dict[str, Any], item: str) -> None:
    """``train.lr=1e-5`` → raw["train"]["lr"] = 1e-5 (the value is parsed as YAML: numbers, lists, null)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=1e-5)")
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:depth + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        key = ".".join(loc) or "<config>"
        if e["type"] == "extra_forbidden":
            hint = _closest_key(loc)
            lines.append(f"unknown key '{key}'" + (f" (did you mean '{hint}'?)" if hint else ""))
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {msg}" if loc else msg)
    return "invalid config:\n  " + "\n  ".join(lines)


def _closest_key(loc: list[str]) -> str | None:
    """Suggest the nearest valid key at the same place, e.g. train.lrr → train.lr."""
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    candidates = list(model.model_fields)
    match = difflib.get_close_matches(loc[-1], candidates, n=1, cutoff=0.5)
    return ".".join([*loc[:-1], match[0]]) if match else None
