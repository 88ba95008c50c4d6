"""Read records and validate them over the cluster with Ray Data, writing samples and errors.

``read_validated(data, cache_dir, out_dir)`` writes ``out_dir/samples/*.parquet`` (one row per assistant
turn; its image stored once in the run directory, so later stages need no access to the source) and
``out_dir/errors/*.parquet``
(record id, reason, detail), and returns the counts that conservation is checked against:
``records_in == records_ok + records_rejected``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from bpo_ray import storage
from bpo_ray.config import DataConfig, PairsConfig, SyntheticDataConfig
from bpo_ray.data import readers
from bpo_ray.data.images import ImageStore, store_images
from bpo_ray.data.records import ImageLimits, validate_record
from bpo_ray.raydata import count_by, count_rows, read_json_items, read_parquet, write_by_kind

log = logging.getLogger(__name__)

SAMPLE_COLUMNS = ("sample_id", "record_id", "source_index", "turn", "image", "image_ref", "image_file", "width",
                  "height", "messages", "prompt", "answer")
ERROR_COLUMNS = ("record_id", "source_index", "stage", "reason", "detail")
_EMPTY_SAMPLE = {"sample_id": "", "record_id": "", "source_index": -1, "turn": -1, "image": b"",
                 "image_ref": "", "image_file": "", "width": 0, "height": 0, "messages": "", "prompt": "", "answer": ""}


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
    """One raw record (or a JSON item's text, parsed here) → sample rows, or one error row; every row has the
    same columns (kind tells)."""
    if "text" in raw:
        raw = readers.record_from_json(raw["index"], raw["text"])
    samples, error = validate_record(raw, image_root, limits)
    if error is not None:
        return [{**_EMPTY_SAMPLE, **error, "kind": "error"}]
    return [{**sample, "image_file": "", "kind": "sample", "stage": "data", "reason": "", "detail": ""}
            for sample in samples]


def read_raw(data: DataConfig, cache_dir: str):
    """(Ray dataset of raw records, image root), read by Ray workers: a LLaVA JSON list or JSONL as the text of
    each item (parsed in validation), parquet and HF datasets as their rows."""
    import ray.data

    if data.format == "synthetic":
        root = synthetic_dir(data.synthetic, cache_dir)
        path, fmt, image_root = str(root / "records.json"), "llava_json", str(root)
    else:
        path, fmt, image_root = data.path, data.format, data.image_root
    if fmt == "llava_json":
        if not storage.exists(path):
            raise FileNotFoundError(f"data.path {path} does not exist")
        if image_root is None:  # relative image paths resolve next to the records file
            image_root = storage.absolute(str(Path(path).parent)) if not storage.is_uri(path) else path.rsplit("/", 1)[0]
        ds = read_json_items(path)
    elif fmt == "parquet":
        ds = read_parquet(storage.absolute(path)).select_columns(list(readers.RAW_COLUMNS))
    else:
        ds = ray.data.from_huggingface(readers.load_hf_disk(storage.absolute(path)))
    if data.max_records:
        ds = ds.limit(data.max_records)
    return ds, image_root


def read_validated(data: DataConfig, cache_dir: str, out_dir: str, name: str, store: ImageStore | None = None) -> dict:
    """Read + validate ``data`` into ``out_dir/samples`` and ``out_dir/errors``; the manifest's counts. With
    ``store``, each image is stored there once and samples reference it (``data/images.py``); without, samples
    carry their image bytes."""
    ds, image_root = read_raw(data, cache_dir)
    records_in = count_rows(ds)  # counted on the input side, so the conservation check below can fail
    limits = ImageLimits(data.max_image_pixels, data.max_image_bytes)
    rows = ds.flat_map(_validated_rows, fn_kwargs={"image_root": image_root, "limits": limits})
    if store is not None:
        rows = rows.map_batches(store_images, batch_format="numpy", fn_kwargs={"store": store})
    rows = rows.materialize()  # read twice below (tables, counts); rows hold no image bytes with a store
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


# ------------------------------------------------------------------------------ existing preference pairs
def pairs_format(pairs: PairsConfig) -> str:
    """``auto``: by the path — .jsonl / .json files, parquet files or folders, ``save_to_disk`` folders, and
    anything else a ``datasets.load_dataset`` name (a Hub id, or a local dataset folder)."""
    if pairs.format != "auto":
        return pairs.format
    path = pairs.path.rstrip("/")
    if path.endswith(".jsonl"):
        return "jsonl"
    if path.endswith(".json"):
        return "json"
    if path.endswith(".parquet"):
        return "parquet"
    if not storage.is_uri(path) and Path(path).is_dir():
        if (Path(path) / "state.json").exists() or (Path(path) / "dataset_dict.json").exists():
            return "hf_disk"
        if any(Path(path).glob("*.parquet")) and not any(Path(path).glob("*.json*")):
            return "parquet"
    return "hub"


def _carried(item, text: str | None = None) -> dict:
    """The row that carries one JSON item (``__json``, its text; ``malformed`` says why one is not a row)."""
    if not isinstance(item, dict):
        return {"__json": "", "malformed": f"a JSON {type(item).__name__}, not an object"}
    return {"__json": json.dumps(item) if text is None else text, "malformed": ""}


def _parse_item(row: dict) -> dict:
    """A JSON list's item or a JSONL line → the row carrying it (a line that is not JSON: why)."""
    try:
        return {**_carried(json.loads(row["text"]), row["text"]), "source_index": row["index"]}
    except json.JSONDecodeError as err:
        return {"__json": "", "malformed": f"not JSON: {err}", "source_index": row["index"]}


def read_pairs_raw(pairs: PairsConfig):
    """Rows of an existing preference dataset as a Ray dataset. JSON, JSONL and parquet are read by Ray
    workers, never whole on the driver; ``save_to_disk`` and ``load_dataset`` sources go
    through ``datasets`` (images as encoded bytes, never decoded). JSON rows travel as their text (``__json``),
    so rows of different shapes never have to share an Arrow schema."""
    import ray.data

    fmt = pairs_format(pairs)
    if fmt in ("json", "jsonl"):
        ds = read_json_items(pairs.path, layout="list" if fmt == "json" else "lines").map(_parse_item)
    elif fmt == "parquet":
        ds = read_parquet(storage.absolute(pairs.path))
    elif storage.is_uri(pairs.path) or not Path(pairs.path).exists():  # a Hub id: Ray reads its parquet files
        ds = ray.data.from_huggingface(_hf_pairs(pairs, fmt))
    else:  # on this disk: from_huggingface would first ask the Hub for the files, and wait for its timeout
        ds = ray.data.from_arrow(_hf_pairs(pairs, fmt).with_format("arrow")[:])
    if pairs.max_rows:
        ds = ds.limit(pairs.max_rows)
    return ds, fmt


def pairs_image_root(pairs: PairsConfig, fmt: str) -> str | None:
    """Where relative image paths resolve: ``image_root``, else (JSON sources) next to the file, as for
    LLaVA records; absolute, since Ray workers have another working directory."""
    if pairs.image_root:
        return storage.absolute(pairs.image_root)
    if fmt in ("json", "jsonl"):
        return storage.split(storage.absolute(pairs.path))[0]
    return None


def _hf_pairs(pairs: PairsConfig, fmt: str):
    import datasets

    if fmt == "hf_disk":
        ds = datasets.load_from_disk(storage.absolute(pairs.path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[pairs.split]
    else:  # the Hub, or a local folder of data files: the same call
        ds = datasets.load_dataset(pairs.path, split=pairs.split)
    for name, feature in ds.features.items():  # keep images encoded: validation decodes them once, with limits
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(name, datasets.Image(decode=False))
        elif isinstance(getattr(feature, "feature", None), datasets.Image):
            ds = ds.cast_column(name, type(feature)(datasets.Image(decode=False)))
    return ds
