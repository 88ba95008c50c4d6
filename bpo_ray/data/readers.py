"""Readers: each source format → raw records ``{"id", "image", "conversations", "source_index"}``.

Readers only reshape; they never judge. A line that cannot be parsed still yields a record (marked
``malformed``) so validation can put it in the errors table with its reason instead of dropping it.
Formats:
- ``llava_json``: a JSON list or JSONL of LLaVA records, images relative to an image root;
- ``parquet``: files with ``id``, ``image`` (bytes, a path, or an HF ``{"bytes", "path"}`` struct) and
  ``conversations`` (list of turns or its JSON string);
- ``hf_disk``: a ``datasets`` dataset saved with ``save_to_disk`` with the same columns.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from bpo_ray.storage import read_text

RAW_COLUMNS = ("id", "image", "conversations")


def iter_llava_json(path: str) -> Iterator[dict]:
    text = read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not a valid JSON list ({err}); JSONL is read line by line instead") from None
        for index, item in enumerate(items):
            yield normalize(item, index)
        return
    for index, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            yield {"id": f"line-{index + 1}", "image": None, "conversations": None, "source_index": index,
                   "malformed": f"line {index + 1} is not JSON: {err}"}
            continue
        yield normalize(item, index)


def normalize(item, index: int) -> dict:
    """Keep the three fields a record has; anything not an object is passed on for validation to reject."""
    if not isinstance(item, dict):
        return {"id": f"item-{index}", "image": None, "conversations": None, "source_index": index,
                "malformed": f"record is a {type(item).__name__}, not an object"}
    record = {key: item.get(key) for key in RAW_COLUMNS}
    if record["id"] is not None and not isinstance(record["id"], str):
        record["id"] = str(record["id"])
    record["source_index"] = index
    return record


def iter_parquet(path: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    _require_columns(table.column_names, path)
    for index, row in enumerate(table.select(list(RAW_COLUMNS)).to_pylist()):
        yield normalize(row, index)


def load_hf_disk(path: str):
    """A ``save_to_disk`` dataset reduced to the raw columns, images as encoded bytes (not PIL)."""
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(f"{path} holds a DatasetDict ({', '.join(ds)}); point data.path at one split")
    _require_columns(ds.column_names, path)
    if isinstance(ds.features.get("image"), datasets.Image):
        ds = ds.cast_column("image", datasets.Image(decode=False))
    return ds.select_columns(list(RAW_COLUMNS))


def iter_hf_disk(path: str) -> Iterator[dict]:
    for index, row in enumerate(load_hf_disk(path)):
        yield normalize(row, index)


def _require_columns(columns, path: str) -> None:
    missing = [c for c in RAW_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; have {', '.join(columns)}")


READERS = {"llava_json": iter_llava_json, "parquet": iter_parquet, "hf_disk": iter_hf_disk}


def iter_records(fmt: str, path: str) -> Iterator[dict]:
    if fmt not in READERS:
        raise ValueError(f"unknown data format {fmt!r}; choose from {', '.join(READERS)}")
    if fmt != "hf_disk" and "://" not in path and not Path(path).exists():
        raise FileNotFoundError(f"data.path {path} does not exist")
    return READERS[fmt](path)
