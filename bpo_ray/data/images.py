"""Images stored once in the run directory and referenced by the rows that use them.

The stage that validates images (data, sft, and negatives for existing pairs) writes each one's encoded bytes
once, named by their hash, under ``<stage>/images/``; its rows keep ``image_file`` (that path, relative to the
run directory, so a copied or moved run directory still resolves it) and an empty ``image``. Pairs copy the
reference, not the bytes: however many pairs a sample makes, its image is stored once, and tables that travel
through the object store (sorting, splitting for training workers) stay small. A stage that needs the pixels
attaches the bytes as it reads: weakening and reference scoring block by block (``attach_images``), each training
worker batch by batch as it encodes them (``rows_with_images``).

Tables written before images were stored this way carry the bytes inline and no ``image_file``: every function
here passes such rows through unchanged, so older run directories still resume.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from bpo_ray import storage

IMAGE_FILE = "image_file"
_SUFFIXES = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG", ".png"), (b"GIF8", ".gif"), (b"RIFF", ".webp"), (b"BM", ".bmp"))


def image_name(data: bytes) -> str:
    """A content address: the same image gets the same name, whichever record or pair brings it."""
    suffix = next((s for magic, s in _SUFFIXES if data.startswith(magic)), ".img")
    return hashlib.blake2b(data, digest_size=16).hexdigest() + suffix


@dataclass(frozen=True)
class ImageStore:
    run_root: str  # the run directory (local path or URI)
    folder: str  # where this stage's images go, relative to it: "data/images"

    def put(self, data: bytes) -> str:
        """Stores ``data`` (once: an existing file of that name holds the same bytes); its reference."""
        ref = f"{self.folder}/{image_name(data)}"
        target = storage.join(self.run_root, ref)
        if not storage.exists(target):
            storage.write_bytes(target, data)
        return ref


def _rows(batch: dict) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def store_images(batch: dict, store: ImageStore) -> dict:
    """Ray Data batch fn: rows with image bytes get them stored and carry the reference instead."""
    n = _rows(batch)
    images = batch["image"]
    files = list(batch[IMAGE_FILE]) if IMAGE_FILE in batch else [""] * n
    for i in range(n):
        if images[i] is not None and len(images[i]) and not files[i]:
            files[i] = store.put(bytes(images[i]))
    batch[IMAGE_FILE] = np.array(files, dtype=object)
    batch["image"] = np.array([b"" if f else images[i] for i, f in enumerate(files)], dtype=object)
    return batch


def attach_images(batch: dict, run_root: str) -> dict:
    """Ray Data batch fn: the bytes of every referenced image, read from the run directory (rows that carry
    their bytes inline, as older tables do, pass through); always leaves an ``image_file`` column."""
    n = _rows(batch)
    files = list(batch[IMAGE_FILE]) if IMAGE_FILE in batch else [""] * n
    images = list(batch["image"])
    batch["image"] = np.array([storage.read_bytes(storage.join(run_root, f)) if f else images[i]
                               for i, f in enumerate(files)], dtype=object)
    batch[IMAGE_FILE] = np.array(files, dtype=object)
    return batch


def detach_images(batch: dict) -> dict:
    """Ray Data batch fn: drop attached bytes again before a table is written (the file keeps them)."""
    if IMAGE_FILE in batch:
        batch["image"] = np.array([b"" if f else img for img, f in zip(batch["image"], batch[IMAGE_FILE],
                                                                          strict=True)], dtype=object)
    return batch


def rows_with_images(rows: list[dict], run_root: str) -> list[dict]:
    """Rows (a training batch, or ``pq.read_table(...).to_pylist()``) with their images' bytes; from a bucket
    the batch's images are fetched together, not one round trip after another."""
    files = [r.get(IMAGE_FILE) or "" for r in rows]
    if not any(files):
        return rows

    def read(ref: str) -> bytes | None:
        return storage.read_bytes(storage.join(run_root, ref)) if ref else None

    if storage.is_uri(run_root) and len(rows) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(16, len(rows))) as pool:
            data = list(pool.map(read, files))
    else:
        data = [read(f) for f in files]
    return [{**r, "image": d} if f else r for r, f, d in zip(rows, files, data, strict=True)]


def with_images(ds, run_root: str):
    """``ds`` with its images' bytes attached as its blocks are read."""
    return ds.map_batches(attach_images, batch_format="numpy", fn_kwargs={"run_root": run_root})
