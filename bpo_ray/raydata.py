"""Small Ray Data helpers shared by the stages: split rows by kind into tables, count without a shuffle, and
give each training worker a fixed, seeded part of the rows; and the one way stages read a Parquet table."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
from collections import Counter

from bpo_ray import storage


@contextlib.contextmanager
def quietly():
    """Ray Data logs seven lines for each execution (its start, its plan, a progress block, its end). A stage
    keeps its books (counts, the tables it writes) with two dozen small executions a job, which would be half
    the job's log: those run with Ray Data at WARNING in this process. The stages' own work keeps its lines,
    progress every 10 s included. Executions started here run to their end inside (Ray Data logs the end as
    the result is handed over)."""
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def count_rows(ds) -> int:
    with quietly():
        return ds.count()


def write_by_kind(rows, out_dir: str, tables: dict[str, tuple[str, tuple[str, ...]]]) -> None:
    """``tables``: name → (kind value, columns). Writes ``out_dir/<name>/*.parquet`` for each, in place of
    whatever the folder held (a reader takes every file in it: a file left from an earlier write would be
    read as more rows); the folder exists even when no row has that kind, so readers never trip on a
    missing table."""
    from ray.data.expressions import col

    for name, (kind, columns) in tables.items():
        target = storage.join(out_dir, name)
        storage.remove_dir(target)
        storage.make_dir(target)
        with quietly():
            rows.filter(expr=col("kind") == kind).select_columns(list(columns)).write_parquet(target)


# Ray Data reads a Parquet folder's footers on a pool of actors it starts for every read: 32 by default, so
# 32 new Python processes each time a stage reads a table, which on a small machine takes longer than the
# stage's own work. One actor drives 128 concurrent footer reads, enough for our tables (a few files each) and
# for external datasets of thousands of files; a cluster that reads more sets the variable, which stays as set.
FOOTER_READERS = ("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")


def read_parquet(path: str, **kwargs):
    """``ray.data.read_parquet`` with the footer-reader pool sized as above (read when the read executes,
    in this process)."""
    import ray.data

    os.environ.setdefault(*FOOTER_READERS)
    return ray.data.read_parquet(path, **kwargs)


def _count_batch(batch, columns: list[str]):
    import pandas as pd

    counts = batch.groupby(columns, dropna=False).size().reset_index(name="n")
    return counts if len(counts) else pd.DataFrame({**{c: [] for c in columns}, "n": []})


def count_by(ds, columns: list[str]) -> Counter:
    """Row counts per value combination, as a per-block map plus a sum on the driver (no shuffle)."""
    partial = ds.select_columns(columns).map_batches(_count_batch, batch_format="pandas",
                                                     fn_kwargs={"columns": columns})
    totals: Counter = Counter()
    with quietly():
        for row in partial.iter_rows():
            totals[tuple(row[c] for c in columns)] += int(row["n"])
    return totals


def read_json_items(path: str, layout: str = "auto", rows_per_block: int = 4096):
    """A JSON list (or JSONL) file as a Ray dataset of ``{"index", "text"}`` rows, one per item: a Ray worker
    streams the file and splits it block by block (``readers.json_items``), so neither the driver nor that
    worker ever holds the whole file; the items are parsed where the rows are used, in parallel."""
    import pyarrow as pa
    import ray.data
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    from bpo_ray.data.readers import json_items, text_chunks

    path = storage.absolute(path)
    fs, local = storage.resolve(path)
    size = fs.get_file_info(local).size

    def read():
        index, text = [], []
        for i, item in json_items(text_chunks(path), path, layout):
            index.append(i)
            text.append(item)
            if len(index) == rows_per_block:
                yield pa.table({"index": index, "text": text})
                index, text = [], []
        if index or not size:
            yield pa.table({"index": pa.array(index, pa.int64()), "text": pa.array(text, pa.string())})

    class JsonItems(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return size

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
            meta = BlockMetadata(num_rows=None, size_bytes=size, input_files=[path], exec_stats=None)
            return [ReadTask(read, meta)]

    return ray.data.read_datasource(JsonItems())


ORDER_COLUMN = "__order"


# Order keys are the first 7 bytes of a blake2b digest as an integer: int64 holds them, they are uniform on
# [0, KEY_SPACE), and they sort as the digest's hex string does (ties need a 56-bit collision).
KEY_BYTES = 7
KEY_SPACE = 1 << (8 * KEY_BYTES)


def order_key(seed: int, key: str) -> int:
    digest = hashlib.blake2b(f"{seed}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:KEY_BYTES], "big")


def _order_keys(batch, columns: list[str], seed: int):
    keys = batch[columns].astype(str).agg("\x1f".join, axis=1)
    batch[ORDER_COLUMN] = [order_key(seed, k) for k in keys]
    return batch


def key_boundaries(parts: int) -> list[int]:
    """Evenly spaced cut points of the key space: ``parts`` sort partitions of about equal size (the keys are
    uniform), so the sort needs no sampling pass and no default partition count. Ray Data ignores an empty
    list, so ``parts`` must be at least 2."""
    return [KEY_SPACE * i // parts for i in range(1, parts)]


# A table this small is ordered on the driver: one read and a local sort, where the cluster's sort takes a few
# seconds of tasks even for a dozen rows (3.5 s for 20, 5.3 s for 4,500 on 2 CPUs, against about 1 s). Rows
# reference their images and weigh a few KB; the bytes bound keeps out tables that still carry them inline
# (written before the image store). Larger tables sort on the cluster and never reach the driver.
SORT_ON_DRIVER_MAX_ROWS = 50_000
SORT_ON_DRIVER_MAX_BYTES = 256 * 2**20


def worker_parts(rows, num_workers: int, order_by: list[str], seed: int, rows_per_block: int = 512,
                 num_rows: int | None = None, on_driver: bool | None = None) -> list:
    """``rows`` as ``num_workers`` equal, materialized parts, in a seeded order that depends only on the rows.

    Stages write their tables in parallel, so the same rows come back in a different order and in different
    files run to run; Ray Train's default ``streaming_split`` then hands blocks to whichever worker asks first.
    Either way two runs of one config trained on different batches, and a resumed run could skip micro-batches
    other than the ones it had trained on. Here a hash of (seed, ``order_by`` columns) orders the rows, fixed-size
    blocks hold them (the workers' shuffle buffer fills block by block), and the driver splits them.
    ``num_rows``: the rows' count where the caller has it (counting is a pass over the table). ``on_driver``:
    where the rows are sorted (None: by their size, ``sorts_on_driver``); the parts are the same either way."""
    num_rows = count_rows(rows) if num_rows is None else num_rows
    blocks = max(num_workers, math.ceil(num_rows / rows_per_block))
    if on_driver is None:
        on_driver, rows = sorts_on_driver(rows, num_rows)
    if on_driver:
        ordered = _sorted_on_driver(rows, order_by, seed)
    else:
        # Without boundaries Ray Data samples the keys first and, when it cannot tell how many blocks a read
        # gives, sorts into 200 partitions: 200 tasks (about 10 s on 2 CPUs) for a few dozen rows.
        ordered = (rows.map_batches(_order_keys, batch_format="pandas", fn_kwargs={"columns": order_by, "seed": seed})
                   .sort(ORDER_COLUMN, boundaries=key_boundaries(max(blocks, 2))).drop_columns([ORDER_COLUMN]))
    return ordered.repartition(blocks).materialize().split(num_workers, equal=True)


def sorts_on_driver(rows, num_rows: int) -> tuple:
    """(whether ``rows`` is small enough to be ordered on the driver, the rows to order): a table within the
    row bound is read once here, materialized, so that its size is known and either sort starts from it."""
    if num_rows > SORT_ON_DRIVER_MAX_ROWS:
        return False, rows
    with quietly():
        rows = rows.materialize()
    return rows.size_bytes() <= SORT_ON_DRIVER_MAX_BYTES, rows


def _sorted_on_driver(rows, order_by: list[str], seed: int):
    """The rows in order of their keys, as a one-block dataset made on the driver."""
    import numpy as np
    import pyarrow as pa
    import ray
    import ray.data

    with quietly():
        tables = ray.get(rows.to_arrow_refs())
    # Blocks may type a column each their own way (all-null in one: type null; string beside large_string), as
    # the cluster's sort takes them.
    table = pa.concat_tables(tables, promote_options="permissive")
    keys = _order_keys(table.select(order_by).to_pandas(), order_by, seed)[ORDER_COLUMN].to_numpy()
    return ray.data.from_arrow(table.take(pa.array(np.argsort(keys, kind="stable"))))
