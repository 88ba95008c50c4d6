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

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

from bpo_ray.storage import resolve

RAW_COLUMNS = ("id", "image", "conversations")


CHUNK_CHARS = 1 << 22  # how much of a JSON file is held at a time, whatever its size


def text_chunks(path: str, chunk_bytes: int = CHUNK_CHARS) -> Iterator[str]:
    """A local or cloud file as UTF-8 text, chunk by chunk (never the whole file in memory)."""
    import codecs

    fs, p = resolve(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    with fs.open_input_stream(p) as f:
        while chunk := f.read(chunk_bytes):
            yield decoder.decode(chunk)
    yield decoder.decode(b"", final=True)


def json_items(chunks: Iterator[str], path: str = "", layout: str = "auto") -> Iterator[tuple[int, str]]:
    """(index, text) of each item of a JSON list, or of each non-blank line of JSONL (``layout`` "auto": a list
    when the text starts with ``[``; "list": a list or an error; "lines": JSONL), reading ``chunks`` as they come.
    An item's text is parsed by whoever takes it; here a list is only split, so an invalid one is an error
    naming where."""
    chunks = iter(chunks)
    if layout == "lines":
        yield from _lines("", chunks)
        return
    buffer, ended = "", False

    def more() -> bool:
        nonlocal buffer, ended
        for chunk in chunks:
            buffer += chunk
            if chunk:
                return True
        ended = True
        return False

    while not buffer.strip() and more():
        pass
    start = len(buffer) - len(buffer.lstrip())
    if buffer[start:start + 1] != "[":
        if layout == "list":
            raise ValueError(f"{path}: not a JSON list (it starts with {buffer[start:start + 20]!r})")
        yield from _lines(buffer, chunks)
        return
    decoder, pos, index, expect_item = json.JSONDecoder(), start + 1, 0, True
    while True:
        while pos < len(buffer) and buffer[pos].isspace():
            pos += 1
        if pos >= len(buffer):
            if not more():
                raise ValueError(f"{path}: not a valid JSON list: it ends after item {index} without ']'")
            continue
        if buffer[pos] == "]" and (index == 0 or not expect_item):
            rest = buffer[pos + 1:] + "".join(chunks)
            if rest.strip():
                raise ValueError(f"{path}: not a valid JSON list: {rest.strip()[:20]!r} after its closing ']'")
            return
        if not expect_item:
            if buffer[pos] != ",":
                raise ValueError(f"{path}: not a valid JSON list: expected ',' or ']' after item {index - 1}, "
                                 f"got {buffer[pos:pos + 20]!r}")
            pos, expect_item = pos + 1, True
            continue
        try:
            _, end = decoder.raw_decode(buffer, pos)
            # A number or literal cut by the chunk's end also decodes ("3" of "3.5"): take an item only once the
            # ',' or ']' after it is in view (or the text has ended).
            complete = ended or buffer[end:].lstrip()[:1] in (",", "]")
        except json.JSONDecodeError as err:
            if ended or not more():
                raise ValueError(f"{path}: not a valid JSON list: item {index}: {err}") from None
            continue
        if not complete:
            more()
            continue
        yield index, buffer[pos:end]
        index, pos, expect_item = index + 1, end, False
        if pos > CHUNK_CHARS:  # drop what has been handed out
            buffer, pos = buffer[pos:], 0


def _lines(buffer: str, chunks: Iterator[str]) -> Iterator[tuple[int, str]]:
    index = 0
    for chunk in itertools.chain([""], chunks):
        buffer += chunk
        *lines, buffer = buffer.split("\n")
        for line in lines:
            if line.strip():
                yield index, line
            index += 1
    if buffer.strip():
        yield index, buffer


def record_from_json(index: int, text: str) -> dict:
    """One LLaVA JSON item (or JSONL line) → a raw record; a line that is not JSON is a malformed record."""
    try:
        item = json.loads(text)
    except json.JSONDecodeError as err:
        return {"id": f"line-{index + 1}", "image": None, "conversations": None, "source_index": index,
                "malformed": f"line {index + 1} is not JSON: {err}"}
    return normalize(item, index)


def iter_llava_json(path: str) -> Iterator[dict]:
    for index, text in json_items(text_chunks(path), path):
        yield record_from_json(index, text)


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
    """A file's raw records read locally, without Ray: the data stage reads the same formats through Ray Data
    (``dataset.read_raw``) with the same parsing (``json_items``, ``record_from_json``, ``normalize``)."""
    if fmt not in READERS:
        raise ValueError(f"unknown data format {fmt!r}; choose from {', '.join(READERS)}")
    if fmt != "hf_disk" and "://" not in path and not Path(path).exists():
        raise FileNotFoundError(f"data.path {path} does not exist")
    return READERS[fmt](path)
