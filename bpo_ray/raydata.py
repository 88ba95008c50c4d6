"""Small Ray Data helpers shared by the stages: split rows by kind into tables, count without a shuffle."""

from __future__ import annotations

from collections import Counter

from bpo_ray import storage


def write_by_kind(rows, out_dir: str, tables: dict[str, tuple[str, tuple[str, ...]]]) -> None:
    """``tables``: name → (kind value, columns). Writes ``out_dir/<name>/*.parquet`` for each; the folder
    exists even when no row has that kind, so readers never trip on a missing table."""
    from ray.data.expressions import col

    for name, (kind, columns) in tables.items():
        target = storage.join(out_dir, name)
        storage.make_dir(target)
        rows.filter(expr=col("kind") == kind).select_columns(list(columns)).write_parquet(target)


def _count_batch(batch, columns: list[str]):
    import pandas as pd

    counts = batch.groupby(columns, dropna=False).size().reset_index(name="n")
    return counts if len(counts) else pd.DataFrame({**{c: [] for c in columns}, "n": []})


def count_by(ds, columns: list[str]) -> Counter:
    """Row counts per value combination, as a per-block map plus a sum on the driver (no shuffle)."""
    partial = ds.select_columns(columns).map_batches(_count_batch, batch_format="pandas",
                                                     fn_kwargs={"columns": columns})
    totals: Counter = Counter()
    for row in partial.iter_rows():
        totals[tuple(row[c] for c in columns)] += int(row["n"])
    return totals
