"""One formatter for what a run's manifests say: the lines a job prints at the end and the pipeline table
of ``report.md`` are the same rows."""

from __future__ import annotations

import math

from bpo_ray.pipeline.rundir import RunDir, split_stage_name


def _loss(metrics: dict | None, key: str = "loss") -> float:
    value = (metrics or {}).get(key, math.nan)
    return value if isinstance(value, (int, float)) else math.nan


def _sft(m: dict) -> str | None:
    if m.get("skipped"):
        return None
    return (f"{m.get('steps')} steps on {m.get('samples')} samples, final loss {_loss(m.get('final_metrics')):.4f}; "
            f"base: {m.get('model_dir')}")


def _data(m: dict) -> str:
    if m.get("skipped"):
        return f"skipped: {m['skipped']}"
    return (f"{m.get('records_in')} records -> {m.get('samples')} samples, "
            f"{m.get('records_rejected')} rejected {m.get('errors_by_reason') or ''}").rstrip()


def _negatives(m: dict) -> str:
    by_type = ", ".join(f"{t}: {v['pairs']}" for t, v in m.get("by_type", {}).items())
    return (f"{m.get('pairs')} pairs ({by_type}) from {m.get('samples_in')} samples at "
            f"{m.get('samples_per_second')} samples/s; dropped {m.get('errors_by_reason') or '{}'}")


def _reference(m: dict) -> str:
    return (f"{m.get('scored')} of {m.get('pairs_in')} pairs scored ({m.get('mode')}); "
            f"dropped {m.get('errors_by_reason') or '{}'}")


def _train(m: dict) -> str:
    final = m.get("final_metrics", {})
    return (f"{m.get('steps')} steps on {m.get('workers')} workers, final loss {_loss(final):.4f}, reward margin "
            f"{_loss(final, 'reward_margin'):.4f}, accuracy {_loss(final, 'reward_accuracy'):.2f}; "
            f"model: {m.get('model_dir')}")


def _eval(m: dict) -> str:
    served = " and ".join(m.get("models", {})) or "the models"
    made = m.get("skipped") or f"{m.get('requests')} requests to {served}"
    return f"{made}; failed {m.get('errors_by_reason') or '{}'}"


# Each stage's line, in the order the stages run; a bootstrapping round's stages (round-<k>/negatives, …) come
# after round 1's training, and eval after the last round.
FORMATS = {"sft": _sft, "data": _data, "negatives": _negatives, "reference": _reference, "train": _train,
           "eval": _eval}


def _order(name: str) -> tuple[int, int]:
    k, kind = split_stage_name(name)
    return (1 << 30 if kind == "eval" else k), list(FORMATS).index(kind)


def stage_rows(manifests: dict[str, dict], run: RunDir | None = None) -> list[tuple[str, str, object]]:
    """(stage, what it made and what it dropped, seconds) for every stage with a manifest. With ``run``, the
    models are named where that run directory has them now: a manifest keeps the path it was written at, which
    a copied (or synced and resumed) run directory no longer is."""
    rows = []
    for name in sorted((n for n, m in manifests.items() if m and split_stage_name(n)[1] in FORMATS), key=_order):
        k, kind = split_stage_name(name)
        m = manifests[name]
        if run is not None and m.get("model_dir"):
            m = {**m, "model_dir": run.sft_model if kind == "sft" else run.at_round(k).model}
        if text := FORMATS[kind](m):
            rows.append((name, text, m.get("seconds")))
    return rows


def summary(manifests: dict[str, dict], run: RunDir | None = None) -> str:
    """The closing lines a job prints: what each stage made and what it dropped, and why."""
    return "\n".join(f"{stage}: {text}" for stage, text, _ in stage_rows(manifests, run))


def stage_table(manifests: dict[str, dict], run: RunDir | None = None) -> str:
    """The same rows as a markdown table (report.md)."""
    lines = ["| stage | result | seconds |", "|---|---|---:|"]
    lines += [f"| {stage} | {text} | {'' if seconds is None else seconds} |"
              for stage, text, seconds in stage_rows(manifests, run)]
    return "\n".join(lines)
