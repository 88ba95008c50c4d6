"""Read records and validate them over the cluster with Ray Data, writing samples and errors.

``read_validated(data, cache_dir, out_dir)`` writes ``out_dir/samples/*.parquet`` (one row per assistant
turn, image bytes inline so later stages need no access to the source) and ``out_dir/errors/*.parquet``
(record id, reason, detail), and returns the counts that conservation is checked against:
``records_in == records_ok + records_rejected``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from bpo_ray import storage
from bpo_ray.config import DataConfig, SyntheticDataConfig
from bpo_ray.data import readers
from bpo_ray.data.records import ImageLimits, validate_record
from bpo_ray.raydata import count_by, write_by_kind

log = logging.getLogger(__name__)

SAMPLE_COLUMNS = ("sample_id", "record_id", "source_index", "turn", "image", "image_ref", "width", "height",
                  "messages", "prompt", "answer")
ERROR_COLUMNS = ("record_id", "source_index", "stage", "reason", "detail")
_EMPTY_SAMPLE = {"sample_id": "", "record_id": "", "source_index": -1, "turn": -1, "image": b"",
                 "image_ref": "", "width": 0, "height": 0, "messages": "", "prompt": "", "answer": ""}


def synthetic_dir(cfg: SyntheticDataConfig, cache_dir: str) -> Path:
    """The bundled dataset for these settings, written once into the cache."""
    from bpo_ray.data.synthetic import VERSION, write_dataset

    settings = {**cfg.model_dump(mode="json"), "version": VERSION}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    target = Path(cache_dir).absolute() / "data" / f"shapes-{key}"
    if not (target / "records.json").exists():
        write_dataset(target, **cfg.model_dump())
    return target


def _validated_rows(raw: dict, image_root: str | None, limits: ImageLimits) -> list[dict]:
    """One raw record → sample rows, or one error row; every row has the same columns (kind tells)."""
    samples, error = validate_record(raw, image_root, limits)
    if error is not None:
        return [{**_EMPTY_SAMPLE, **error, "kind": "error"}]
    return [{**sample, "kind": "sample", "stage": "data", "reason": "", "detail": ""} for sample in samples]


def read_raw(data: DataConfig, cache_dir: str):
    """(Ray dataset of raw records, image root). LLaVA JSON is parsed on the driver (it holds paths only);
    parquet and HF datasets, which may hold image bytes, are read by Ray workers."""
    import ray.data

    if data.format == "synthetic":
        root = synthetic_dir(data.synthetic, cache_dir)
        path, fmt, image_root = str(root / "records.json"), "llava_json", str(root)
    else:
        path, fmt, image_root = data.path, data.format, data.image_root
    if fmt == "llava_json":
        records = list(readers.iter_records(fmt, path))
        if image_root is None:  # relative image paths resolve next to the records file
            image_root = storage.absolute(str(Path(path).parent)) if not storage.is_uri(path) else path.rsplit("/", 1)[0]
        ds = ray.data.from_items(records, override_num_blocks=max(1, min(64, len(records) // 256))) if records \
            else ray.data.from_items([])
    elif fmt == "parquet":
        ds = ray.data.read_parquet(storage.absolute(path)).select_columns(list(readers.RAW_COLUMNS))
    else:
        ds = ray.data.from_huggingface(readers.load_hf_disk(storage.absolute(path)))
    if data.max_records:
        ds = ds.limit(data.max_records)
    return ds, image_root


def read_validated(data: DataConfig, cache_dir: str, out_dir: str, name: str) -> dict:
    """Read + validate ``data`` into ``out_dir/samples`` and ``out_dir/errors``; the manifest's counts."""
    ds, image_root = read_raw(data, cache_dir)
    records_in = ds.count()  # counted on the input side, so the conservation check below can fail
    limits = ImageLimits(data.max_image_pixels, data.max_image_bytes)
    rows = ds.flat_map(_validated_rows, fn_kwargs={"image_root": image_root, "limits": limits}).materialize()
    write_by_kind(rows, out_dir, {"samples": ("sample", SAMPLE_COLUMNS), "errors": ("error", ERROR_COLUMNS)})
    counts = count_by(rows, ["kind", "turn", "reason"])
    num_samples = sum(n for (kind, _, _), n in counts.items() if kind == "sample")
    records_ok = counts.get(("sample", 0, ""), 0)
    reasons: dict[str, int] = {}
    for (kind, _, reason), n in counts.items():
        if kind == "error":
            reasons[reason] = reasons.get(reason, 0) + n
    rejected = sum(reasons.values())
    if records_in != records_ok + rejected:
        raise RuntimeError(f"{name}: {records_in} records in but {records_ok} kept + {rejected} rejected")
    manifest = {
        "records_in": records_in,
        "records_ok": records_ok,
        "records_rejected": rejected,
        "samples": num_samples,
        "errors_by_reason": reasons,
        "source": data.path or "synthetic",
    }
    log.info("%s: %d records → %d samples, %d rejected %s", name, records_in, num_samples, rejected, reasons)
    return manifest
