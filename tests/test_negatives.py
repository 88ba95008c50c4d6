"""The negatives stage on local Ray with tiny models: both negative types, conservation, determinism."""

from __future__ import annotations

import io
import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bpo_ray.config import SamplingConfig, load_config
from bpo_ray.eval.metrics import parse_yes_no
from bpo_ray.negatives.existence import EXISTENCE, steering_share
from bpo_ray.negatives.generation import HFGenerator
from bpo_ray.negatives.pairs import ERROR_INJECTION, IMAGE_WEAKENING, Drop
from bpo_ray.pipeline import RunDir, run_stages
from conftest import run_cli


def _run(overrides, force=False):
    cfg = load_config(None, overrides)
    return cfg, RunDir.for_config(cfg), run_stages(cfg, until="negatives", force=force)


def _base(tmp_path, tiny_models, data_path):
    return [f"storage_path={tmp_path}", f"cache_dir={tmp_path / 'cache'}", "data.format=llava_json",
            f"data.path={data_path}", f"model.name_or_path={tiny_models['llava']}",
            "negatives.weakening.sampling.max_new_tokens=8", "negatives.weakening.pool.batch_size=4",
            "negatives.truncated=keep"]  # a random tiny model rarely ends an answer in 8 tokens


def _pairs(run):
    rows = pq.read_table(run.pairs).to_pylist()
    return sorted(rows, key=lambda r: (r["sample_id"], r["negative_type"]))


def test_both_negative_types_with_bad_records_and_conservation(tmp_path, tiny_models, mixed_records, ray_local):
    path, num_good, _ = mixed_records
    cfg, run, manifests = _run(_base(tmp_path, tiny_models, path))
    data, neg = manifests["data"], manifests["negatives"]
    assert data["records_ok"] == num_good and data["records_rejected"] == 7  # bad records stop at the data stage
    assert neg["samples_in"] == data["samples"]
    for negative_type in (IMAGE_WEAKENING, ERROR_INJECTION):
        counts = neg["by_type"][negative_type]
        assert counts["pairs"] > 0
        assert counts["pairs"] + counts["errors"] == neg["samples_in"] - neg["chosen_too_long"]

    pairs = _pairs(run)
    assert len(pairs) == neg["pairs"]
    samples = {s["sample_id"]: s for s in pq.read_table(run.samples).to_pylist()}
    # Each image is stored once in the run directory, as the source's bytes; samples and pairs reference it.
    stored = {s["image_file"] for s in samples.values()}
    assert {f"data/images/{p.name}" for p in (Path(run.root) / "data" / "images").iterdir()} == stored
    for s in samples.values():  # the mixed records name their images by absolute path
        assert s["image"] == b"" and Path(run.root, s["image_file"]).read_bytes() == Path(s["image_ref"]).read_bytes()
    for pair in pairs:
        sample = samples[pair["sample_id"]]
        assert pair["chosen"] == sample["answer"] and pair["image_file"] == sample["image_file"]
        assert pair["image"] == b""
        assert pair["rejected"] and pair["rejected"] != pair["chosen"]
        assert pair["seed"] > 0
        if pair["negative_type"] == IMAGE_WEAKENING:
            assert json.loads(pair["distortion"]) == [{"kind": "diffusion", "step": 900}]
            assert pair["generator"] == str(tiny_models["llava"])
        else:
            assert pair["generator"] == "rules" and json.loads(pair["edits"])
    # The edit mix in the manifest: every rules edit counted once, by kind; LLaVA records get COCO's words.
    injected = neg["by_type"][ERROR_INJECTION]
    made = Counter(e.split(":")[0] for p in pairs if p["negative_type"] == ERROR_INJECTION
                   for e in json.loads(p["edits"]))
    assert injected["vocabulary"] == "general" and injected["edits"] == dict(made) and made
    errors = pq.read_table(run.errors("negatives")).to_pylist() if neg["errors_by_reason"] else []
    assert len(errors) == sum(neg["errors_by_reason"].values())
    assert all(e["reason"] and e["detail"] for e in errors)


def test_same_seed_same_pairs(tmp_path, tiny_models, shapes_dir, ray_local):
    data = shapes_dir / "records.json"
    _, run_a, _ = _run(_base(tmp_path / "a", tiny_models, data))
    _, run_b, _ = _run(_base(tmp_path / "b", tiny_models, data) + ["negatives.weakening.pool.batch_size=3"])
    # Another seed (rules only: no model needed to see the seed reach the edits).
    _, run_c, _ = _run(_base(tmp_path / "c", tiny_models, data) + ["negatives.seed=1",
                                                                    "negatives.weakening.enabled=false"])
    a, b, c = _pairs(run_a), _pairs(run_b), _pairs(run_c)
    assert [(p["sample_id"], p["rejected"]) for p in a] == [(p["sample_id"], p["rejected"]) for p in b]
    assert {p["negative_type"] for p in a} == {IMAGE_WEAKENING, ERROR_INJECTION}
    injected = [p["rejected"] for p in a if p["negative_type"] == ERROR_INJECTION]
    assert injected != [p["rejected"] for p in c]


def test_tables_with_inline_images_from_before_the_image_store_make_the_same_pairs(tmp_path, tiny_models, shapes_dir,
                                                                                     ray_local):
    """Run directories written before images were stored once carry each image's bytes in every row and have no
    ``image_file`` column: the negatives and reference stages read them and make the same pairs and scores,
    and their tables go on carrying the bytes."""
    import shutil

    import pyarrow as pa

    from bpo_ray.data.images import rows_with_images

    data = shapes_dir / "records.json"
    new_cfg, old_cfg = (load_config(None, _base(tmp_path / name, tiny_models, data)) for name in ("new", "old"))
    new, old = RunDir.for_config(new_cfg), RunDir.for_config(old_cfg)
    run_stages(new_cfg, until="reference")
    run_stages(old_cfg, until="data")
    samples = rows_with_images(pq.read_table(old.samples).to_pylist(), old.root)
    shutil.rmtree(Path(old.root) / "data" / "images")
    shutil.rmtree(old.samples)
    Path(old.samples).mkdir()
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in s.items() if k != "image_file"} for s in samples]),
                   Path(old.samples) / "part-0.parquet")
    run_stages(old_cfg, until="reference")  # data: finished, skipped; negatives and reference read the old table

    def made(run):
        return sorted((p["sample_id"], p["negative_type"], p["rejected"], round(p["ref_chosen_logp"], 4),
                       round(p["ref_rejected_logp"], 4)) for p in pq.read_table(run.scored_pairs).to_pylist())
    assert made(old) == made(new) and len(made(new)) > 0
    by_id = {s["sample_id"]: s["image"] for s in samples}
    assert all(p["image_file"] == "" and p["image"] == by_id[p["sample_id"]]
               for p in pq.read_table(old.scored_pairs).to_pylist())
    assert all(p["image"] == b"" and p["image_file"] for p in pq.read_table(new.scored_pairs).to_pylist())


def test_llm_injection_on_hf_and_length_limit(tmp_path, tiny_models, shapes_dir, ray_local):
    overrides = _base(tmp_path, tiny_models, shapes_dir / "records.json") + [
        "negatives.weakening.enabled=false", "negatives.injection.engine=hf",
        f"negatives.injection.model={tiny_models['llm']}", "negatives.injection.sampling.max_new_tokens=12",
        "negatives.max_words=6"]
    _, run, manifests = _run(overrides)
    neg = manifests["negatives"]
    assert list(neg["by_type"]) == [ERROR_INJECTION]
    assert neg["chosen_too_long"] > 0  # every description is over 6 words
    counts = neg["by_type"][ERROR_INJECTION]
    assert counts["pairs"] + counts["errors"] == neg["samples_in"] - neg["chosen_too_long"]
    assert all(p["generator"] == str(tiny_models["llm"]) for p in _pairs(run))
    errors = pq.read_table(run.errors("negatives")).to_pylist()
    assert sum(e["reason"] == Drop.CHOSEN_TOO_LONG for e in errors) == neg["chosen_too_long"]


def test_a_failing_row_is_recorded_not_fatal(tiny_models, shapes_dir):
    generator = HFGenerator(str(tiny_models["llava"]), vision=True,
                            sampling=SamplingConfig(temperature=0.2, top_p=1.0, max_new_tokens=4))
    good = (shapes_dir / "images").glob("*.png").__next__().read_bytes()
    messages = json.dumps([{"role": "user", "content": "Describe the image in detail."}])
    batch = {"carry": np.array([pickle.dumps(i) for i in range(3)], dtype=object),
             "gen_messages": np.array([messages] * 3, dtype=object),
             "gen_image": np.array([good, b"not an image", good], dtype=object),
             "seed": np.array([1, 2, 3])}
    out = generator(batch)
    assert [bool(e) for e in out["generation_error"]] == [False, True, False]
    assert out["generated_text"][0] and out["generated_text"][2] and not out["generated_text"][1]
    assert [pickle.loads(c) for c in out["carry"]] == [0, 1, 2]


@pytest.mark.parametrize("mode", ["drop", "keep"])
def test_a_negative_cut_at_max_new_tokens_is_dropped_or_kept_without_eos(mode, shapes_dir):
    from bpo_ray.negatives.batches import finish_generated

    image = next((shapes_dir / "images").glob("*.png")).read_bytes()
    sample = {"sample_id": "s", "record_id": "r", "image": image, "image_ref": "", "answer": "a red circle",
              "messages": json.dumps([{"role": "user", "content": "Describe the image."}]), "prompt": "Describe."}
    batch = {"carry": np.array([pickle.dumps(sample)] * 2, dtype=object), "seed": np.array([1, 2]),
             "generated_text": np.array(["a blue square", "a green triangle on the left of a"], dtype=object),
             "finish_reason": np.array(["stop", "length"], dtype=object),
             "generation_error": np.array(["", ""], dtype=object)}
    out = finish_generated(batch, "image_weakening", "policy", max_words=50, distortion="", truncated=mode)
    assert list(out["kind"]) == (["pair", "error"] if mode == "drop" else ["pair", "pair"])
    assert list(out["reason"]) == (["", "truncated"] if mode == "drop" else ["", ""])
    assert list(out["rejected_truncated"]) == [False, mode == "keep"]


def _llava_file(tmp_path, shapes_dir):
    """A user's LLaVA-format file with images relative to an image root."""
    records = json.loads((shapes_dir / "records.json").read_text())[:6]
    (tmp_path / "user.json").write_text(json.dumps(records))
    return tmp_path / "user.json"


def _ray_sessions() -> set[str]:
    """The session folders of every Ray instance started on this machine (one per ``ray.init``/``ray start``
    of a new cluster), in Ray's temp root."""
    import os
    import tempfile
    from pathlib import Path

    root = Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())) / "ray"
    return {p.name for p in root.glob("session_2*")}


def test_bpo_generate_without_config(tmp_path, shapes_dir):
    data = _llava_file(tmp_path, shapes_dir)
    out = tmp_path / "out"
    args = ["generate", "--data", str(data), "--image-root", str(shapes_dir), "--out", str(out),
            "resources.ray_address=local", "negatives.weakening.sampling.max_new_tokens=8", "negatives.truncated=keep",
            "sft.enabled=false"]  # the embedded default fine-tunes the tiny base first: 4,230 steps
    before = _ray_sessions()
    first = run_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert _ray_sessions() - before  # the first run started its local Ray (what the rerun must not do)
    manifest = json.loads((out / "negatives" / "manifest.json").read_text())
    assert set(manifest["by_type"]) == {IMAGE_WEAKENING, ERROR_INJECTION}
    assert "negatives:" in first.stdout and "samples/s" in first.stdout
    assert (tmp_path / ".cache" / "bpo-ray" / "models" / "tiny-llava-v2").is_dir()  # embedded tiny model

    sessions = _ray_sessions()
    again = run_cli(*args, cwd=tmp_path)  # complete for the same inputs: nothing runs, Ray not even started
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "negatives" / "manifest.json").read_text()) == manifest  # not re-run (same output id)
    assert _ray_sessions() == sessions  # no local Ray instance was started

    # Other settings (another seed, rules only: the overwrite need not load a model again) for the same --out.
    other = ["negatives.seed=5", "negatives.weakening.enabled=false"]
    different = run_cli(*args, *other, cwd=tmp_path)
    assert different.returncode == 2 and "--overwrite" in different.stderr
    replaced = run_cli(*args, *other, "--overwrite", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    rewritten = json.loads((out / "negatives" / "manifest.json").read_text())
    assert rewritten["seed"] == 5 and set(rewritten["by_type"]) == {ERROR_INJECTION}


@pytest.mark.parametrize("size", [(8, 8)])
def test_weakened_image_of_odd_size_still_generates(tiny_models, size):
    """Images smaller than the model's input go through the processor's resize like any other."""
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buf, format="PNG")
    generator = HFGenerator(str(tiny_models["qwen2_vl"]), vision=True,
                            sampling=SamplingConfig(temperature=0.0, top_p=1.0, max_new_tokens=3))
    out = generator({"carry": np.array([b"x"], dtype=object), "seed": np.array([0]),
                     "gen_messages": np.array([json.dumps([{"role": "user", "content": "What is it?"}])], dtype=object),
                     "gen_image": np.array([buf.getvalue()], dtype=object)})
    assert out["generation_error"][0] == ""


def _coco_instances(shapes_dir, path):
    """The shapes' truth as a COCO instances file (categories: every colour-shape name), as a user brings one."""
    from bpo_ray.data.synthetic import COLORS, SHAPES

    names = [f"{c} {s}" for c in COLORS for s in SHAPES]
    truth = [json.loads(line) for line in (shapes_dir / "truth.jsonl").read_text().splitlines()]
    coco = {"categories": [{"id": i, "name": n} for i, n in enumerate(names)],
            "images": [{"id": k, "file_name": t["image"]} for k, t in enumerate(truth)],
            "annotations": [{"image_id": k, "category_id": names.index(f"{o['color']} {o['shape']}")}
                            for k, t in enumerate(truth) for o in t["objects"]]}
    path.write_text(json.dumps(coco))
    return path


def test_existence_pairs_are_balanced_and_reported(tmp_path, tiny_models, shapes_dir, ray_local):
    annotations = _coco_instances(shapes_dir, tmp_path / "instances.json")
    cfg, run, manifests = _run(_base(tmp_path, tiny_models, shapes_dir / "records.json") + [
        "negatives.weakening.enabled=false", "negatives.existence.enabled=true",
        f"negatives.existence.annotations={annotations}", f"data.image_root={shapes_dir}"])
    neg = manifests["negatives"]
    made = neg["by_type"][EXISTENCE]
    truth = [json.loads(line) for line in (shapes_dir / "truth.jsonl").read_text().splitlines()]
    present = sum(len({(o["color"], o["shape"]) for o in t["objects"]}) for t in truth)
    assert made["images"] == len(truth) and made["images_without_annotations"] == 0
    assert made["yes_chosen"] == made["no_chosen"] == present and made["pairs"] == 2 * present
    assert sum(made["by_strategy"].values()) == made["pairs"] and made["by_strategy"]["present"] == present
    assert neg["pairs"] == made["pairs"] + neg["by_type"][ERROR_INJECTION]["pairs"]

    pairs = [p for p in _pairs(run) if p["negative_type"] == EXISTENCE]
    assert len(pairs) == made["pairs"]
    asked_side = {p["sample_id"]: "yes" if p["chosen"].startswith("Yes") else "no" for p in pairs}
    samples = {s["sample_id"]: s for s in pq.read_table(run.samples).to_pylist()}
    for pair in pairs:
        lender = samples[pair["sample_id"].split("~")[0]]  # the image's representative sample
        assert pair["image_file"] == lender["image_file"] and pair["record_id"] == lender["record_id"]
        asked = json.loads(pair["edits"])
        objects = next({f"{o['color']} {o['shape']}" for o in t["objects"]} for t in truth
                       if t["image"] == lender["image_ref"])
        assert asked["present"] == (asked["asked"] in objects)
        assert pair["chosen"].startswith("Yes" if asked["present"] else "No")
    yes_no = neg["yes_no"]  # every yes/no pair of the run: existence's and the injected flips of the QA answers
    assert yes_no["yes_chosen"] > made["yes_chosen"] and yes_no["no_chosen"] > made["no_chosen"]

    # Balanced over the whole mix: existence pairs of the side with more are dropped, as errors that say why.
    _, run, manifests = _run(_base(tmp_path, tiny_models, shapes_dir / "records.json") + [
        "negatives.weakening.enabled=false", "negatives.existence.enabled=true", "negatives.existence.balance=mix",
        f"negatives.existence.annotations={annotations}", f"data.image_root={shapes_dir}"])
    neg = manifests["negatives"]
    mixed, before = neg["by_type"][EXISTENCE], neg["yes_no"]["before_balance"]
    assert before == yes_no and before["yes_chosen"] != before["no_chosen"]  # the injected flips lean one way
    surplus = abs(before["yes_chosen"] - before["no_chosen"])
    assert mixed["dropped_for_balance"] == surplus and mixed["pairs"] + surplus == made["pairs"]
    assert neg["yes_no"]["yes_chosen"] == neg["yes_no"]["no_chosen"]
    assert {mixed["yes_chosen"], mixed["no_chosen"]} == {present, present - surplus}
    dropped = [e for e in pq.read_table(run.path("negatives", "errors")).to_pylist() if e["reason"] == "balance"]
    assert len(dropped) == surplus and {e["negative_type"] for e in dropped} == {EXISTENCE}
    kept = {p["sample_id"] for p in _pairs(run)}
    assert not kept & {e["sample_id"] for e in dropped}

    # Only what the policy answers wrong: it is asked every question on the clean image (greedy, as the eval
    # asks); its answer is in each pair, and every question it answered right is an error that says so.
    _, run, manifests = _run(_base(tmp_path, tiny_models, shapes_dir / "records.json") + [
        "negatives.weakening.enabled=false", "negatives.existence.enabled=true", "negatives.existence.balance=errors",
        f"negatives.existence.annotations={annotations}", f"data.image_root={shapes_dir}"])
    wrong = manifests["negatives"]["by_type"][EXISTENCE]
    assert wrong["questions"] == made["pairs"] and wrong["pairs"] + wrong["errors"] == made["pairs"]
    assert (wrong["questions_yes_chosen"], wrong["questions_no_chosen"]) == (present, present)
    pairs = [p for p in _pairs(run) if p["negative_type"] == EXISTENCE]
    right = [e for e in pq.read_table(run.path("negatives", "errors")).to_pylist() if e["negative_type"] == EXISTENCE]
    assert len(pairs) == wrong["pairs"] and len(right) == wrong["errors"] == wrong["answered_right"]
    assert {e["reason"] for e in right} <= {Drop.ANSWERED_RIGHT}
    assert (wrong["yes_chosen"], wrong["no_chosen"]) == (sum(p["chosen"].startswith("Yes") for p in pairs),
                                                         sum(p["chosen"].startswith("No") for p in pairs))
    for pair in pairs:
        asked = json.loads(pair["edits"])
        said_yes, understood = parse_yes_no(asked["policy_answer"])
        assert asked["policy_answer"] and not (understood and said_yes == asked["present"]), asked

    # Steered: the policy answers every question as above (greedy: the same answers) and all stay pairs; the whole
    # mix is balanced to the yes-chosen share that leans against the policy's bias, its right answers dropped first.
    _, run, manifests = _run(_base(tmp_path, tiny_models, shapes_dir / "records.json") + [
        "negatives.weakening.enabled=false", "negatives.existence.enabled=true", "negatives.existence.balance=steer",
        f"negatives.existence.annotations={annotations}", f"data.image_root={shapes_dir}"])
    neg = manifests["negatives"]
    steered, before, after = neg["by_type"][EXISTENCE], neg["yes_no"]["before_balance"], neg["yes_no"]
    assert before == yes_no  # the same questions and flips as without the policy's answers
    right_ids = {e["sample_id"] for e in right}
    said_yes = (sum(asked_side[i] == "yes" for i in right_ids)  # a right answer says what is there
                + sum(parse_yes_no(json.loads(p["edits"])["policy_answer"])[0] for p in pairs))
    assert steered["policy_answered"] == steered["questions"] == made["pairs"]
    assert steered["policy_accuracy"] == len(right_ids) / made["pairs"] and steered["truth_yes_rate"] == 0.5
    assert steered["policy_yes_rate"] == said_yes / made["pairs"]
    share = steered["target_yes_share"]
    assert steered["steer_gain"] == 0.3  # the default
    assert share == steering_share(made["pairs"], present, said_yes, 0.3) != 0.5  # the tiny random model is biased
    side = "yes" if share < 0.5 else "no"
    kept = [p for p in _pairs(run) if p["negative_type"] == EXISTENCE]
    dropped = {e["sample_id"] for e in pq.read_table(run.path("negatives", "errors")).to_pylist()
               if e["negative_type"] == EXISTENCE and e["reason"] == "balance"}
    assert len(dropped) == steered["dropped_for_balance"] > 0 and len(kept) + len(dropped) == made["pairs"]
    assert {asked_side[i] for i in dropped} == {side}
    yes, no = after["yes_chosen"], after["no_chosen"]
    assert yes + no + len(dropped) == before["yes_chosen"] + before["no_chosen"]
    assert (steered["yes_chosen"], steered["no_chosen"]) == (sum(asked_side[p["sample_id"]] == "yes" for p in kept),
                                                             sum(asked_side[p["sample_id"]] == "no" for p in kept))
    on_share = yes == round(share * no / (1 - share)) if side == "yes" else no == round((1 - share) * yes / share)
    assert on_share or steered[f"{side}_chosen"] == 0  # or that side ran out of existence pairs
    if right_ids & {p["sample_id"] for p in kept if asked_side[p["sample_id"]] == side}:
        assert dropped <= right_ids  # a right answer left while a wrong one went: the right ones were not first


def test_steering_takes_its_share_from_the_answers_and_drops_the_right_ones_first(ray_local):
    """``balance: steer`` on a table of answered existence pairs: the policy says yes to 16 of 20 questions about
    10 objects there and 10 not (unclear answers count as yes, as POPE reads them), so at gain 1 the share is
    one half moved by the most allowed, 0.1, against it: 0.4. Ten yes- and ten no-chosen pairs: 3 yes-chosen go, and
    they are the 3 the policy answered right, not any of the 7 it answered unclearly."""
    import ray.data

    from bpo_ray.negatives.batches import OUT_COLUMNS, judge_policy_answers, yes_no_sides
    from bpo_ray.pipeline.negatives import _balance_the_mix, _steer

    answers = {True: ["Yes, there is one."] * 3 + ["A red circle."] * 7, False: ["Yes."] * 6 + ["No."] * 4}
    carried = []
    for present, said in answers.items():
        for k, answer in enumerate(said):
            chosen, rejected = ("Yes, there is.", "No, there is not.") if present else ("No, there is not.", "Yes.")
            pair = {c: "" for c in OUT_COLUMNS} | {
                "sample_id": f"s{int(present)}{k}~{EXISTENCE}:red star", "negative_type": EXISTENCE, "kind": "pair",
                "chosen": chosen, "rejected": rejected, "edits": json.dumps({"asked": "red star", "present": present}),
                "seed": 0, "rejected_truncated": False, "image": b""}
            carried.append((pickle.dumps(pair), answer))
    judged = judge_policy_answers({"carry": np.array([c for c, _ in carried], dtype=object),
                                   "generated_text": np.array([a for _, a in carried], dtype=object),
                                   "generation_error": np.array([""] * len(carried), dtype=object)}, keep_right=True)
    rows = ray.data.from_items([{c: judged[c][i] for c in OUT_COLUMNS} for i in range(len(carried))]).materialize()
    sides = rows.map_batches(yes_no_sides).materialize()
    steer = _steer(rows, gain=1.0)
    assert steer["policy_answered"] == 20 and steer["policy_yes_rate"] == 16 / 20 and steer["truth_yes_rate"] == 0.5
    assert steer["target_yes_share"] == pytest.approx(0.4) and steer["policy_accuracy"] == 7 / 20
    right_there = {f"s1{k}~{EXISTENCE}:red star" for k in range(3)}
    assert right_there < steer["right"] and len(steer["right"]) == 7  # and the 4 absent ones it said no to
    balanced, side = _balance_the_mix(rows, sides, {"yes_chosen": 10, "no_chosen": 10}, 0, "steer", steer)
    dropped = [r for r in balanced.iter_rows() if r["kind"] == "error"]
    assert side == "yes" and {r["sample_id"] for r in dropped} == right_there
    assert {r["reason"] for r in dropped} == {"balance"} and all("steered share" in r["detail"] for r in dropped)


def test_the_functions_ray_data_runs_as_plain_tasks_import_without_torch():
    """Ray Data runs the batch functions of the data, negatives and reference stages in plain task workers; a
    worker that imported torch to edit text or count rows spent about 1.4 s of CPU on it before its first row."""
    import subprocess
    import sys

    modules = ["bpo_ray.negatives.batches", "bpo_ray.data.dataset", "bpo_ray.data.images", "bpo_ray.raydata"]
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint([m for m in ('torch', 'transformers') if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
