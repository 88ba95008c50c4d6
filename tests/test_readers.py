"""The bundled data round-trips through every reader, and through the Ray data stage with bad records."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bpo_ray.config import load_config
from bpo_ray.data import readers
from bpo_ray.data.images import rows_with_images
from bpo_ray.data.records import Reason, validate_record
from bpo_ray.pipeline import RunDir, run_stages


def _samples(records, image_root=None):
    out = []
    for raw in records:
        samples, error = validate_record(raw, image_root)
        assert error is None, error
        out.extend((s["sample_id"], s["messages"], s["answer"], s["image"]) for s in samples)
    return out


@pytest.fixture(scope="module")
def bundled(shapes_dir):
    records = json.loads((shapes_dir / "records.json").read_text())
    return records, _samples(readers.iter_records("llava_json", str(shapes_dir / "records.json")), str(shapes_dir))


def test_llava_jsonl(tmp_path, shapes_dir, bundled):
    records, expected = bundled
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert _samples(readers.iter_records("llava_json", str(path)), str(shapes_dir)) == expected


def _with_bytes(records, shapes_dir):
    return [{**r, "image": (shapes_dir / r["image"]).read_bytes()} for r in records]


def test_parquet_with_image_bytes(tmp_path, shapes_dir, bundled):
    records, expected = bundled
    pq.write_table(pa.Table.from_pylist(_with_bytes(records, shapes_dir)), tmp_path / "d.parquet")
    assert _samples(readers.iter_records("parquet", str(tmp_path / "d.parquet"))) == expected


def test_hf_dataset_saved_to_disk(tmp_path, shapes_dir, bundled):
    import datasets

    records, expected = bundled
    rows = _with_bytes(records, shapes_dir)
    features = datasets.Features({
        "id": datasets.Value("string"), "image": datasets.Image(),
        "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}]})
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    assert _samples(readers.iter_records("hf_disk", str(tmp_path / "hf"))) == expected


def test_unparseable_jsonl_line_is_a_record_not_a_crash(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": "a", "image": "x.png", "conversations": []}\n{oops\n[1, 2]\n')
    records = list(readers.iter_records("llava_json", str(path)))
    assert len(records) == 3
    assert [validate_record(r)[1]["reason"] for r in records] == [
        Reason.MALFORMED_CONVERSATION, Reason.MALFORMED_RECORD, Reason.MALFORMED_RECORD]


def _chunked(text: str, size: int):
    return (text[i:i + size] for i in range(0, len(text), size))


@pytest.mark.parametrize("chunk", [1, 3, 64, 1 << 20])
def test_json_items_splits_a_list_or_jsonl_as_it_streams(chunk):
    """Items come out whole however the text is cut: strings holding brackets and commas, numbers cut by a
    chunk's end ("3" of "3.5e10"), non-ASCII text; JSONL lines keep their line numbers past blank lines."""
    items = [{"id": i, "conversations": [{"from": "human", "value": "<image>\n]}, [\"x\" é 漢字" * (i % 3)}]}
             for i in range(40)] + [12345, "str", None, [1, 2], 3.5e10, True]
    for indent in (None, 2):
        text = json.dumps(items, indent=indent, ensure_ascii=False)
        assert [json.loads(t) for _, t in readers.json_items(_chunked(text, chunk))] == items
    lines = "\n".join(json.dumps(x) for x in items) + "\n\n  \n" + json.dumps(items[0])
    got = list(readers.json_items(_chunked(lines, chunk)))
    assert [json.loads(t) for _, t in got] == [*items, items[0]] and got[-1][0] == len(items) + 2
    for bad in ("[1, 2", "[1 2]", "[1,]", '[{"a": }]', "[1]]", "[,1]"):
        with pytest.raises(ValueError, match="f.json: not a valid JSON list"):
            list(readers.json_items(_chunked(bad, chunk), "f.json"))
    with pytest.raises(ValueError, match="not a JSON list"):
        list(readers.json_items(_chunked('{"a": 1}', chunk), "f.json", layout="list"))
    # JSONL whose lines are lists is still JSONL when the format says so
    assert list(readers.json_items(_chunked("[1]\n\n[2, 3]", chunk), layout="lines")) == [(0, "[1]"), (2, "[2, 3]")]


def test_json_items_holds_a_chunk_or_two_not_the_file():
    """Streaming: each item comes out once the chunk holding its end (and the ',' after it) has been read,
    not after the whole file."""
    text = json.dumps([{"id": i, "value": "x" * (i % 50)} for i in range(300)])
    pulled, size = [0], 64

    def chunks():
        for piece in _chunked(text, size):
            pulled[0] += 1
            yield piece

    seen_end = 0
    for _, item in readers.json_items(chunks()):
        seen_end = text.index(item, seen_end) + len(item)
        assert pulled[0] <= seen_end // size + 3, (pulled[0], seen_end)


def test_a_json_list_is_read_by_a_ray_worker_in_order(tmp_path, ray_local):
    """The Ray side of ``json_items`` (whose streaming the test above guards): every item, in order."""
    from bpo_ray.raydata import read_json_items

    path = tmp_path / "records.json"
    path.write_text(json.dumps([{"id": f"r{i}"} for i in range(95)]))
    rows = read_json_items(str(path), rows_per_block=10).take_all()
    assert [r["index"] for r in rows] == list(range(95)) and json.loads(rows[94]["text"]) == {"id": "r94"}


def test_a_table_read_starts_one_footer_reader_not_thirty_two(tmp_path, ray_local, monkeypatch):
    """Ray Data starts a pool of footer-reading actors, 32 by default, for every Parquet read; the stages' reads
    start one (each a Python process: 32 of them outlasted a small stage's own work on 2 CPUs)."""
    # The GCS actor table, dead actors too: this cluster has no dashboard for the state API.
    from ray._private.state import actors

    from bpo_ray.raydata import read_parquet

    monkeypatch.delenv("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", raising=False)
    for i in range(3):
        pq.write_table(pa.table({"x": [i, i + 10]}), tmp_path / f"part-{i}.parquet")

    def footer_readers() -> int:
        return sum(a["ActorClassName"] == "FooterReader" for a in actors().values())

    before = footer_readers()
    assert sorted(r["x"] for r in read_parquet(str(tmp_path)).take_all()) == [0, 1, 2, 10, 11, 12]
    assert footer_readers() - before == 1


def test_missing_columns_and_files(tmp_path):
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match="missing column"):
        list(readers.iter_records("parquet", str(tmp_path / "p.parquet")))
    with pytest.raises(FileNotFoundError):
        readers.iter_records("llava_json", str(tmp_path / "nope.json"))


# ----------------------------------------------------------------------------- Ray Data, bad records mixed in
def test_data_stage_on_ray_records_every_skip(tmp_path, mixed_records, ray_local):
    path, num_good, num_lines = mixed_records
    cfg = load_config(None, ["data.format=llava_json", f"data.path={path}", f"storage_path={tmp_path / 'runs'}",
                             "data.max_image_pixels=4000000"])
    run = RunDir.for_config(cfg)
    manifest = run_stages(cfg, until="data")["data"]

    assert manifest["records_in"] == num_lines
    assert manifest["records_ok"] == num_good
    assert manifest["records_in"] == manifest["records_ok"] + manifest["records_rejected"]
    errors = pq.read_table(run.errors("data")).to_pylist()
    by_id = {e["record_id"]: e["reason"] for e in errors}
    assert by_id == {
        "missing": Reason.MISSING_IMAGE, "corrupt": Reason.UNDECODABLE_IMAGE, "bomb": Reason.IMAGE_TOO_LARGE,
        "notag": Reason.NO_IMAGE_TAG, "empty": Reason.EMPTY_ANSWER, "badconv": Reason.MALFORMED_CONVERSATION,
        f"line-{num_lines}": Reason.MALFORMED_RECORD,
    }
    samples = pq.read_table(run.samples).to_pylist()
    assert len(samples) == manifest["samples"]
    assert {s["record_id"] for s in samples} == {json.loads(line)["id"] for line in path.read_text().splitlines()[:num_good]}
    # Each sample references its image, stored once in the run directory (not inline in every row).
    assert all(s["image"] == b"" and (Path(run.root) / s["image_file"]).read_bytes()[:4] == b"\x89PNG"
               for s in samples)


@pytest.mark.parametrize("fmt", ["parquet", "hf_disk"])
def test_data_stage_reads_parquet_and_hf_on_ray(tmp_path, shapes_dir, bundled, ray_local, fmt):
    records, expected = bundled
    rows = _with_bytes(records, shapes_dir)
    if fmt == "parquet":
        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        path = tmp_path / "hf"
        datasets.Dataset.from_list(rows).cast_column("image", datasets.Image()).save_to_disk(str(path))
    cfg = load_config(None, [f"data.format={fmt}", f"data.path={path}", f"storage_path={tmp_path / 'runs'}"])
    run = RunDir.for_config(cfg)
    manifest = run_stages(cfg, until="data")["data"]
    assert manifest["records_rejected"] == 0 and manifest["samples"] == len(expected)
    got = rows_with_images(pq.read_table(run.samples).to_pylist(), run.root)
    assert sorted((s["sample_id"], s["messages"], s["answer"], s["image"]) for s in got) == sorted(expected)
