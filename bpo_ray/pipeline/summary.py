"""One formatter for what a run's manifests say: the lines a job prints at the end and the pipeline table
of ``report.md`` are the same rows."""

from __future__ import annotations

import math


def _loss(metrics: dict | None, key: str = "loss") -> float:
    value = (metrics or {}).get(key, math.nan)
    return value if isinstance(value, (int, float)) else math.nan


def stage_rows(manifests: dict[str, dict]) -> list[tuple[str, str, object]]:
    """(stage, what it made and what it dropped, seconds) for every stage with a manifest."""
    rows = []
    if (sft := manifests.get("sft")) and not sft.get("skipped"):
        rows.append(("sft", f"{sft.get('steps')} steps on {sft.get('samples')} samples, final loss "
                            f"{_loss(sft.get('final_metrics')):.4f}; base: {sft.get('model_dir')}", sft.get("seconds")))
    if data := manifests.get("data"):
        rows.append(("data", f"{data.get('records_in')} records -> {data.get('samples')} samples, "
                             f"{data.get('records_rejected')} rejected {data.get('errors_by_reason') or ''}".rstrip(),
                     data.get("seconds")))
    if neg := manifests.get("negatives"):
        by_type = ", ".join(f"{t}: {v['pairs']}" for t, v in neg.get("by_type", {}).items())
        rows.append(("negatives", f"{neg.get('pairs')} pairs ({by_type}) from {neg.get('samples_in')} samples at "
                                  f"{neg.get('samples_per_second')} samples/s; dropped {neg.get('errors_by_reason') or '{}'}",
                     neg.get("seconds")))
    if ref := manifests.get("reference"):
        rows.append(("reference", f"{ref.get('scored')} of {ref.get('pairs_in')} pairs scored ({ref.get('mode')}); "
                                  f"dropped {ref.get('errors_by_reason') or '{}'}", ref.get("seconds")))
    if train := manifests.get("train"):
        final = train.get("final_metrics", {})
        rows.append(("train", f"{train.get('steps')} steps on {train.get('workers')} workers, final loss "
                              f"{_loss(final):.4f}, reward margin {_loss(final, 'reward_margin'):.4f}, accuracy "
                              f"{_loss(final, 'reward_accuracy'):.2f}; model: {train.get('model_dir')}",
                     train.get("seconds")))
    if ev := manifests.get("eval"):
        served = " and ".join(ev.get("models", {})) or "the models"
        made = ev.get("skipped") or f"{ev.get('requests')} requests to {served}"
        rows.append(("eval", f"{made}; failed {ev.get('errors_by_reason') or '{}'}", ev.get("seconds")))
    return rows


def summary(manifests: dict[str, dict]) -> str:
    """The closing lines a job prints: what each stage made and what it dropped, and why."""
    return "\n".join(f"{stage}: {text}" for stage, text, _ in stage_rows(manifests))


def stage_table(manifests: dict[str, dict]) -> str:
    """The same rows as a markdown table (report.md)."""
    lines = ["| stage | result | seconds |", "|---|---|---:|"]
    lines += [f"| {stage} | {text} | {'' if seconds is None else seconds} |"
              for stage, text, seconds in stage_rows(manifests)]
    return "\n".join(lines)
