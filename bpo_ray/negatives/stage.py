"""The negatives stage: samples → bootstrapped rejected answers → preference pairs, over Ray Data.

Two branches from the validated samples (``data/samples``):
- image weakening: distort each image (seeded per sample), let the policy MLLM answer on it;
- error injection: rewrite the annotated answer (``rules``, or a text LLM on ``hf`` / ``vllm``).
Each negative is paired with the annotated answer (chosen) unless it is degenerate. Output in the run
directory: ``negatives/pairs/*.parquet``, ``negatives/errors/*.parquet`` and the manifest, whose counts
satisfy, per branch, ``samples_in − chosen_too_long == pairs + errors``.
"""

from __future__ import annotations

import json
import logging
import pickle
import time

import numpy as np

from bpo_ray.config import RunConfig
from bpo_ray.models.loader import load_processor, resolve_model_path
from bpo_ray.models.vision import model_input_size
from bpo_ray.negatives import distort, inject
from bpo_ray.negatives.generation import GenerationSpec, generate_column
from bpo_ray.negatives.pairs import (
    ERROR_INJECTION,
    IMAGE_WEAKENING,
    Drop,
    degenerate,
    stable_seed,
    word_count,
)
from bpo_ray.raydata import count_by, write_by_kind
from bpo_ray.stages import RunDir, policy_path

log = logging.getLogger(__name__)

PAIR_COLUMNS = ("sample_id", "record_id", "image", "image_ref", "messages", "prompt", "chosen", "rejected",
                "negative_type", "distortion", "edits", "generator", "seed", "rejected_truncated")
ERROR_COLUMNS = ("sample_id", "record_id", "stage", "negative_type", "reason", "detail")
# What a sample carries through generation untouched (packed, so engine columns never collide with it).
CARRIED = ("sample_id", "record_id", "image", "image_ref", "messages", "prompt", "answer")


def _rows(batch: dict) -> list[dict]:
    n = len(batch["sample_id"]) if "sample_id" in batch else len(batch["carry"])
    return [{k: batch[k][i] for k in batch} for i in range(n)]


def _carry(rows: list[dict]) -> np.ndarray:
    return np.array([pickle.dumps({k: r[k] for k in CARRIED}) for r in rows], dtype=object)


def _columns(rows: list[dict], names) -> dict:
    return {name: np.array([r[name] for r in rows], dtype=object) for name in names}


def _out(sample: dict, negative_type: str, rejected: str, *, distortion: str = "", edits: str = "",
         generator: str = "", seed: int = 0, truncated: bool = False, reason: str = "", detail: str = "") -> dict:
    """One output row; the same columns whether it is a pair or an error (``kind`` tells)."""
    return {"sample_id": sample["sample_id"], "record_id": sample["record_id"], "image": sample["image"],
            "image_ref": sample["image_ref"], "messages": sample["messages"], "prompt": sample["prompt"],
            "chosen": sample["answer"], "rejected": rejected, "negative_type": negative_type,
            "distortion": distortion, "edits": edits, "generator": generator, "seed": int(seed),
            "rejected_truncated": truncated, "stage": "negatives", "kind": "error" if reason else "pair",
            "reason": reason, "detail": detail}


OUT_COLUMNS = (*PAIR_COLUMNS, "stage", "kind", "reason", "detail")


def _finish(sample: dict, negative_type: str, rejected: str, error: str, max_words: int, **meta) -> dict:
    if error:
        return _out(sample, negative_type, "", reason=Drop.GENERATION_FAILED, detail=error, **meta)
    problem = degenerate(sample["answer"], rejected, max_words)
    if problem:
        return _out(sample, negative_type, rejected, reason=problem[0], detail=problem[1], **meta)
    return _out(sample, negative_type, rejected, **meta)


# ------------------------------------------------------------------------------------ batch functions
def split_on_chosen_length(batch: dict, max_words: int) -> dict:
    """Mark samples whose annotated answer is over the limit (the paper drops them)."""
    too_long = np.array([word_count(a) > max_words for a in batch["answer"]])
    batch["too_long"] = too_long
    return batch


def chosen_too_long_errors(batch: dict, max_words: int) -> dict:
    rows = [_out(r, "", "", reason=Drop.CHOSEN_TOO_LONG, detail=f"{word_count(r['answer'])} words > {max_words}")
            for r in _rows(batch)]
    return _columns(rows, OUT_COLUMNS)


def weaken_batch(batch: dict, distortions: list[dict], seed: int, size=None) -> dict:
    """``size``: the policy's ``ModelInputSize``, at which images are weakened."""
    rows = _rows(batch)
    seeds = [stable_seed(seed, IMAGE_WEAKENING, r["sample_id"]) for r in rows]
    return {
        "carry": _carry(rows),
        "gen_messages": np.array([r["messages"] for r in rows], dtype=object),
        "gen_image": np.array([distort.weaken_bytes(r["image"], distortions, s, size)
                               for r, s in zip(rows, seeds, strict=True)], dtype=object),
        "seed": np.array(seeds, dtype=np.int64),
    }


def injection_prompts(batch: dict, mode: str, seed: int) -> dict:
    rows = _rows(batch)
    return {
        "carry": _carry(rows),
        "gen_messages": np.array([json.dumps(inject.injection_messages(r["prompt"], r["answer"], mode))
                                  for r in rows], dtype=object),
        "seed": np.array([stable_seed(seed, ERROR_INJECTION, r["sample_id"]) for r in rows], dtype=np.int64),
    }


def finish_generated(batch: dict, negative_type: str, generator: str, max_words: int, distortion: str,
                     truncated: str) -> dict:
    """Generated answers → pairs or errors; ``truncated`` ("drop" | "keep") says what becomes of an answer
    cut at max_new_tokens."""
    out = []
    for r in _rows(batch):
        sample = pickle.loads(r["carry"])
        text = r["generated_text"] or ""
        if negative_type == ERROR_INJECTION:
            text = inject.clean_llm_rewrite(text)
        meta = {"distortion": distortion, "generator": generator, "seed": r["seed"]}
        cut = r["finish_reason"] == "length" and not r["generation_error"]
        if cut and truncated == "drop":
            out.append(_out(sample, negative_type, text, reason=Drop.TRUNCATED,
                            detail="the answer reached max_new_tokens before it ended", **meta))
        else:
            out.append(_finish(sample, negative_type, text, r["generation_error"], max_words, truncated=cut, **meta))
    return _columns(out, OUT_COLUMNS)


def rules_batch(batch: dict, seed: int, max_words: int) -> dict:
    out = []
    for r in _rows(batch):
        s = stable_seed(seed, ERROR_INJECTION, r["sample_id"])
        rejected, edits = inject.rules_inject(r["answer"], s)
        out.append(_finish(r, ERROR_INJECTION, rejected, "", max_words, edits=json.dumps(edits),
                           generator="rules", seed=s))
    return _columns(out, OUT_COLUMNS)


# ------------------------------------------------------------------------------------------------ stage
def run_negatives(cfg: RunConfig, run: RunDir) -> dict:
    import ray.data
    from ray.data.expressions import col

    ray.data.DataContext.get_current().execution_options.preserve_order = True  # reproducible batches
    neg = cfg.negatives
    started = time.time()
    samples = ray.data.read_parquet(run.path("data", "samples"))
    samples_in = samples.count()
    marked = samples.map_batches(split_on_chosen_length, fn_kwargs={"max_words": neg.max_words})
    ok = marked.filter(expr=col("too_long") == False).drop_columns(["too_long"])  # noqa: E712
    too_long = marked.filter(expr=col("too_long") == True).drop_columns(["too_long"])  # noqa: E712
    outputs = [too_long.map_batches(chosen_too_long_errors, fn_kwargs={"max_words": neg.max_words})]
    generators: dict[str, str] = {}

    if neg.weakening.enabled:
        policy = policy_path(cfg, run)
        distortions = [d.model_dump() for d in neg.weakening.distortions]
        described = distort.describe(distortions)
        generators[IMAGE_WEAKENING] = policy
        size = model_input_size(load_processor(policy, cfg.model).image_processor)
        prepared = ok.map_batches(weaken_batch, fn_kwargs={"distortions": distortions, "seed": neg.seed,
                                                           "size": size})
        spec = GenerationSpec(neg.weakening.engine, policy, True, neg.weakening.sampling, neg.weakening.pool,
                              cfg.model.max_length, model=cfg.model)
        outputs.append(generate_column(prepared, spec).map_batches(
            finish_generated, fn_kwargs={"negative_type": IMAGE_WEAKENING, "generator": policy,
                                         "max_words": neg.max_words, "distortion": described,
                                         "truncated": neg.truncated}))

    if neg.injection.enabled:
        inj = neg.injection
        if inj.engine == "rules":
            generators[ERROR_INJECTION] = "rules"
            outputs.append(ok.map_batches(rules_batch, fn_kwargs={"seed": neg.seed, "max_words": neg.max_words}))
        else:
            generators[ERROR_INJECTION] = inj.model
            rewriter = resolve_model_path(inj.model, cfg.cache_dir)
            prepared = ok.map_batches(injection_prompts, fn_kwargs={"mode": inj.mode, "seed": neg.seed})
            # The rewriter is another model: the run's kernel and dtype, not the policy's revision or code.
            loading = cfg.model.model_copy(update={"revision": None, "trust_remote_code": False})
            spec = GenerationSpec(inj.engine, rewriter, False, inj.sampling, inj.pool, model=loading)
            outputs.append(generate_column(prepared, spec).map_batches(
                finish_generated, fn_kwargs={"negative_type": ERROR_INJECTION, "generator": inj.model,
                                             "max_words": neg.max_words, "distortion": "",
                                             "truncated": neg.truncated}))

    rows = outputs[0].union(*outputs[1:]).materialize()
    write_by_kind(rows, run.path("negatives"), {"pairs": ("pair", PAIR_COLUMNS), "errors": ("error", ERROR_COLUMNS)})
    counts = count_by(rows, ["kind", "negative_type", "reason"])
    return _manifest(counts, samples_in, generators, neg, time.time() - started)


def _manifest(counts, samples_in: int, generators: dict, neg, seconds: float) -> dict:
    too_long = counts.get(("error", "", Drop.CHOSEN_TOO_LONG), 0)
    per_type, errors_by_reason = {}, {}
    for (kind, _, reason), n in counts.items():
        if kind == "error":
            errors_by_reason[reason] = errors_by_reason.get(reason, 0) + n
    for negative_type in generators:
        made = counts.get(("pair", negative_type, ""), 0)
        dropped = sum(n for (k, t, _), n in counts.items() if k == "error" and t == negative_type)
        if made + dropped != samples_in - too_long:  # conservation, per branch
            raise RuntimeError(f"negatives/{negative_type}: {samples_in - too_long} samples in but "
                               f"{made} pairs + {dropped} errors out")
        per_type[negative_type] = {"pairs": made, "errors": dropped, "generator": generators[negative_type]}
    return {
        "samples_in": samples_in,
        "chosen_too_long": too_long,
        "pairs": sum(t["pairs"] for t in per_type.values()),
        "by_type": per_type,
        "errors_by_reason": errors_by_reason,
        "samples_per_second": round(samples_in / max(seconds, 1e-9), 2),
        "seed": neg.seed,
    }
