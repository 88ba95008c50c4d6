"""negatives: samples → bootstrapped rejected answers → preference pairs, over Ray Data.

Two branches from the validated samples (``data/samples``):
- image weakening: distort each image (seeded per sample), let the policy MLLM answer on it;
- error injection: rewrite the annotated answer (``rules``, or a text LLM on ``hf`` / ``vllm``).
- balanced existence pairs (optional): yes/no questions about objects present and absent, from the training
  images' object annotations (``negatives/existence.py``);
- existing pairs (``negatives.extra_pairs``, optional): TRL / RLAIF-V / scored-completions data read and
  validated (``data/preferences.py``), beside the bootstrapped pairs or alone.
Output: ``negatives/pairs``, ``negatives/errors`` and the manifest, whose counts satisfy, per branch,
``samples_in − chosen_too_long == pairs + errors`` (existence: pairs + the ones dropped for balance, answered
right or whose answer failed == the questions planned; existing pairs: rows in == rows that made pairs + rows rejected).
"""

from __future__ import annotations

import time
from collections import Counter

from bpo_ray.config import RunConfig, SamplingConfig, bootstraps
from bpo_ray.data.dataset import pairs_image_root, read_pairs_raw, synthetic_dir
from bpo_ray.data.images import store_images, with_images
from bpo_ray.data.preferences import EXTERNAL, preference_rows
from bpo_ray.data.records import ImageLimits
from bpo_ray.data.synthetic import COLORS, SHAPES
from bpo_ray.eval.evaluate import POPE_MAX_TOKENS
from bpo_ray.eval.probes import coco_images, synthetic_images
from bpo_ray.models.loader import load_processor, resolve_model_path
from bpo_ray.models.vision import model_input_size
from bpo_ray.negatives import distort, existence, vocabulary
from bpo_ray.negatives.batches import (
    ERROR_COLUMNS,
    PAIR_COLUMNS,
    chosen_too_long_errors,
    drop_for_balance,
    existence_batch,
    existence_prompts,
    external_pair_layouts,
    finish_generated,
    injection_prompts,
    judge_policy_answers,
    policy_judgements,
    rules_batch,
    rules_edit_kinds,
    split_on_chosen_length,
    weaken_batch,
    yes_no_sides,
)
from bpo_ray.negatives.existence import EXISTENCE, balancing_drops, existence_questions, steering_share
from bpo_ray.negatives.generation import GenerationSpec, generate_column
from bpo_ray.negatives.pairs import ERROR_INJECTION, IMAGE_WEAKENING, Drop
from bpo_ray.pipeline.rundir import RunDir, policy_path
from bpo_ray.raydata import count_by, count_rows, quietly, read_parquet, write_by_kind


def run(cfg: RunConfig, run_dir: RunDir, key: str) -> dict:
    import ray.data
    from ray.data.expressions import col

    ray.data.DataContext.get_current().execution_options.preserve_order = True  # reproducible batches
    neg = cfg.negatives
    started = time.time()
    outputs, generators, samples_in, words = [], {}, 0, None
    if bootstraps(cfg):
        samples = read_parquet(run_dir.samples)
        samples_in = count_rows(samples)
        marked = samples.map_batches(split_on_chosen_length, fn_kwargs={"max_words": neg.max_words})
        ok = marked.filter(expr=col("too_long") == False).drop_columns(["too_long"])  # noqa: E712
        too_long = marked.filter(expr=col("too_long") == True).drop_columns(["too_long"])  # noqa: E712
        outputs.append(too_long.map_batches(chosen_too_long_errors, fn_kwargs={"max_words": neg.max_words}))

    if neg.weakening.enabled:
        policy = policy_path(cfg, run_dir)
        distortions = [d.model_dump() for d in neg.weakening.distortions]
        described = distort.describe(distortions)
        generators[IMAGE_WEAKENING] = policy
        size = model_input_size(load_processor(policy, cfg.model).image_processor)
        prepared = with_images(ok, run_dir.root).map_batches(
            weaken_batch, fn_kwargs={"distortions": distortions, "seed": neg.seed, "size": size})
        spec = _policy_on_images(cfg, policy, neg.weakening.sampling)
        outputs.append(generate_column(prepared, spec).map_batches(
            finish_generated, fn_kwargs={"negative_type": IMAGE_WEAKENING, "generator": policy,
                                         "max_words": neg.max_words, "distortion": described,
                                         "truncated": neg.truncated}))

    if neg.injection.enabled:
        inj = neg.injection
        if inj.engine == "rules":
            generators[ERROR_INJECTION] = "rules"
            words = vocabulary.for_data(inj.vocabulary, cfg.data.format)
            outputs.append(ok.map_batches(rules_batch, fn_kwargs={"seed": neg.seed, "max_words": neg.max_words,
                                                                  "vocabulary": words}))
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

    planned = None
    answered = neg.existence.balance in ("errors", "steer")  # the policy answers each existence question
    if neg.existence.enabled:
        questions, planned = _existence_plan(cfg, samples)
        asked = samples.map_batches(existence_batch, fn_kwargs={"questions": questions})
        outputs.append(_ask_the_policy(cfg, run_dir, asked) if answered else asked)

    external_in = None
    if neg.extra_pairs is not None:
        raw, fmt = read_pairs_raw(neg.extra_pairs)
        external_in = count_rows(raw)
        limits = ImageLimits(neg.extra_pairs.max_image_pixels, neg.extra_pairs.max_image_bytes)
        outputs.append(raw.flat_map(preference_rows, fn_kwargs={
            "layout": neg.extra_pairs.layout, "image_root": pairs_image_root(neg.extra_pairs, fmt), "limits": limits,
            "source": neg.extra_pairs.path}).map_batches(
            store_images, batch_format="numpy", fn_kwargs={"store": run_dir.image_store("negatives")}))

    rows = (outputs[0].union(*outputs[1:]) if len(outputs) > 1 else outputs[0]).materialize()
    with quietly():
        sides = rows.map_batches(yes_no_sides).materialize()  # what the run's yes/no pairs argue for
    totals = count_by(sides, ["side"])
    yes_no = {"yes_chosen": totals.get(("yes",), 0), "no_chosen": totals.get(("no",), 0)}
    # mix, steer: balanced over every yes/no pair of the run, to one half or to the steered share
    rebalance, side = planned is not None and neg.existence.balance in ("mix", "steer"), None
    steer = _steer(rows, neg.existence.steer_gain) if rebalance and neg.existence.balance == "steer" else None
    if rebalance:
        rows, side = _balance_the_mix(rows, sides, yes_no, neg.seed, neg.existence.balance, steer)
    write_by_kind(rows, run_dir.stage_dir("negatives"), {"pairs": ("pair", PAIR_COLUMNS), "errors": ("error", ERROR_COLUMNS)})
    counts = count_by(rows, ["kind", "negative_type", "reason"])
    manifest = _manifest(counts, samples_in, generators, neg, time.time() - started)
    if words is not None:  # the rules' edit mix
        edits = count_by(rows.map_batches(rules_edit_kinds), ["edit"])
        manifest["by_type"][ERROR_INJECTION].update(vocabulary=words.name,
                                                    edits={k: n for (k,), n in sorted(edits.items())})
    if planned is not None:
        made = counts.get(("pair", EXISTENCE, ""), 0)
        dropped_by = {reason: n for (kind, t, reason), n in counts.items() if kind == "error" and t == EXISTENCE}
        dropped = sum(dropped_by.values())
        if made + dropped != planned["pairs"]:
            raise RuntimeError(f"negatives/{EXISTENCE}: {planned['pairs']} questions planned but {made} pairs "
                               f"+ {dropped} dropped out ({dropped_by})")
        planned_total, planned_yes, planned_no = planned["pairs"], planned["yes_chosen"], planned["no_chosen"]
        if answered or rebalance:  # the pairs per side as made (before balancing), without failed generations
            kept = count_by(sides.filter(expr=col("negative_type") == EXISTENCE), ["side"])
            planned = {**planned, "pairs": made, "errors": dropped,
                       "yes_chosen": kept.get(("yes",), 0), "no_chosen": kept.get(("no",), 0)}
        if answered:
            planned.update(questions=planned_total, questions_yes_chosen=planned_yes, questions_no_chosen=planned_no,
                           generation_failed=dropped_by.get(Drop.GENERATION_FAILED, 0))
            if neg.existence.balance == "errors":  # steer keeps them: its policy_accuracy says how many
                planned["answered_right"] = dropped_by.get(Drop.ANSWERED_RIGHT, 0)
        if rebalance:
            balanced = dropped_by.get(Drop.BALANCE, 0)
            planned["dropped_for_balance"] = balanced
            if steer:
                planned.update({k: v for k, v in steer.items() if k != "right"})
            before = dict(yes_no)
            if side is not None:  # the side the dropped pairs argued for
                planned[f"{side}_chosen"] -= balanced
                yes_no[f"{side}_chosen"] -= balanced
            yes_no["before_balance"] = before
        manifest["by_type"][EXISTENCE] = planned
        manifest["pairs"] += made
    manifest["yes_no"] = yes_no
    if external_in is not None:
        manifest["by_type"][EXTERNAL] = _external_counts(rows, counts, external_in, neg.extra_pairs, fmt)
        manifest["pairs"] += manifest["by_type"][EXTERNAL]["pairs"]
    return manifest


def _ask_the_policy(cfg: RunConfig, run_dir: RunDir, pairs):
    """``balance: errors`` and ``steer``: the policy (weakening's: the model being aligned) answers each
    existence question on its clean image, greedy and as long as the eval lets it, on weakening's engine and
    pool. ``errors``: only the questions it gets wrong stay pairs, so their yes/no balance is the policy's own
    bias reversed; ``steer``: all stay, its answers set the share ``_steer`` balances to."""
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=POPE_MAX_TOKENS)
    prompts = with_images(pairs, run_dir.root).map_batches(existence_prompts, fn_kwargs={"seed": cfg.negatives.seed})
    return generate_column(prompts, _policy_on_images(cfg, policy_path(cfg, run_dir), greedy)).map_batches(
        judge_policy_answers, fn_kwargs={"keep_right": cfg.negatives.existence.balance == "steer"})


def _steer(rows, gain: float) -> dict:
    """How the policy answered the existence questions, and the yes-chosen share that leans against its bias
    (``existence.steering_share``); ``right``: the pairs it answered right, the first to drop for balance."""
    with quietly():
        judged = rows.map_batches(policy_judgements).materialize()
    questions = present = said_yes = 0
    right = []
    for row in judged.iter_rows():
        questions, present, said_yes = questions + 1, present + row["present"], said_yes + row["said_yes"]
        if row["right"]:
            right.append(row["sample_id"])
    return {"policy_answered": questions, "policy_yes_rate": said_yes / questions,
            "truth_yes_rate": present / questions, "policy_accuracy": len(right) / questions,
            "steer_gain": gain, "target_yes_share": steering_share(questions, present, said_yes, gain),
            "right": frozenset(right)}


def _policy_on_images(cfg: RunConfig, policy: str, sampling: SamplingConfig) -> GenerationSpec:
    """The policy answering questions on images, loaded as the run loads it, on weakening's engine and pool."""
    weakening = cfg.negatives.weakening
    return GenerationSpec(weakening.engine, policy, True, sampling, weakening.pool, cfg.model.max_length,
                          model=cfg.model)


def _balance_the_mix(rows, sides, yes_no: dict, seed: int, balance: str, steer: dict | None):
    """Drop existence pairs from the side the run's yes/no pairs (``sides``) lean to until yes-chosen ones are
    their share (``mix``: one half; ``steer``: ``steer["target_yes_share"]``, the ones the policy answered right
    first) or the side has no existence pairs left; the dropped ones become errors. Returns (rows, that side)."""
    from ray.data.expressions import col

    candidates: dict[str, list[str]] = {}
    for row in sides.filter(expr=col("negative_type") == EXISTENCE).iter_rows():
        candidates.setdefault(row["side"], []).append(row["sample_id"])
    share, first = (steer["target_yes_share"], steer["right"]) if steer else (0.5, frozenset())
    side, drop = balancing_drops(yes_no["yes_chosen"], yes_no["no_chosen"], candidates, seed, share, first)
    if drop:
        rows = rows.map_batches(drop_for_balance, fn_kwargs={"ids": frozenset(drop), "side": side,
                                                             "balance": balance}).materialize()
    return rows, side


def _external_counts(rows, counts, rows_in: int, pairs_cfg, fmt: str) -> dict:
    """Existing pairs read in: rows in = rows that made pairs + rows rejected (conservation), by layout."""
    layouts = count_by(rows.map_batches(external_pair_layouts), ["layout"])
    rows_ok = sum(layouts.values())
    rejected = sum(n for (k, t, _), n in counts.items() if k == "error" and t == EXTERNAL)
    if rows_in != rows_ok + rejected:
        raise RuntimeError(f"negatives/{EXTERNAL}: {rows_in} rows in but {rows_ok} made pairs + {rejected} rejected")
    return {"pairs": counts.get(("pair", EXTERNAL, ""), 0), "errors": rejected, "rows_in": rows_in,
            "rows_ok": rows_ok, "by_layout": {k: n for (k,), n in sorted(layouts.items())},
            "generator": pairs_cfg.path, "format": fmt}


def _annotated_images(cfg: RunConfig):
    """(annotated images, object vocabulary, the folder their paths are under) for the training data."""
    annotations = cfg.negatives.existence.annotations
    if annotations is None:  # the bundled shapes: their truth file (validated: data is synthetic)
        root = synthetic_dir(cfg.data.synthetic, cfg.cache_dir)
        return synthetic_images(root), [f"{c} {s}" for c in COLORS for s in SHAPES], str(root)
    root = cfg.data.image_root or ""
    images, vocabulary = coco_images(annotations, root, num_images=1 << 62, seed=0)  # all of them
    return images, vocabulary, root


def _existence_plan(cfg: RunConfig, samples) -> tuple[dict[str, list], dict]:
    """The questions per annotated image under the sample that lends it, and what they add up to (for the
    manifest, and to check the output against)."""
    images, vocabulary, root = _annotated_images(cfg)
    questions = existence_questions(images, vocabulary, list(cfg.negatives.existence.strategies), cfg.negatives.seed)
    shown = ((r["sample_id"], r["image_ref"]) for r in samples.select_columns(["sample_id", "image_ref"]).iter_rows())
    by_sample, annotated, unannotated = existence.by_representative(shown, existence.plan(images, questions, root))
    made = [q for qs in by_sample.values() for q in qs]
    planned = {"pairs": len(made), "errors": 0, "generator": "annotations",
               "yes_chosen": sum(q.present for q in made), "no_chosen": sum(not q.present for q in made),
               "by_strategy": dict(Counter(q.strategy for q in made)),
               "images": annotated, "images_without_annotations": unannotated}
    return by_sample, planned


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
