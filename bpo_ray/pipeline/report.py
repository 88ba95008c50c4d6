"""report: ``report.json`` (everything, machine-readable), ``report.md`` (a person's view) and
``plots/*.png`` (training curves, base vs aligned), from what the stages left in the run directory."""

from __future__ import annotations

import json
import math

from bpo_ray import storage
from bpo_ray.config import RunConfig
from bpo_ray.eval.compare import aligned_only, comparison, format_table
from bpo_ray.eval.plots import eval_plot, training_plot
from bpo_ray.pipeline.rundir import RunDir
from bpo_ray.pipeline.summary import stage_table
from bpo_ray.train.publish import model_card, push_to_hub


def run(cfg: RunConfig, run_dir: RunDir, key: str) -> dict:
    manifests = {name: m for name, m in run_dir.read_manifests().items() if name != "report"}
    train_metrics = training_log(run_dir)
    eval_metrics = manifests.get("eval", {}).get("metrics", {})
    rows = comparison(eval_metrics)
    report = {
        "run_name": cfg.run_name, "run_dir": run_dir.root,
        "stages": {name: {k: v for k, v in m.items() if k != "metrics"} for name, m in manifests.items()},
        "training": {"steps": len(train_metrics), "first": train_metrics[0] if train_metrics else None,
                     "final": train_metrics[-1] if train_metrics else None},
        "eval": eval_metrics, "comparison": rows,
    }
    storage.write_text(run_dir.report_json, json.dumps(report, indent=2, default=str))
    plots = []
    if train_metrics:
        storage.write_bytes(run_dir.plot("training.png"), training_plot(train_metrics))
        plots.append("plots/training.png")
    if rows:
        storage.write_bytes(run_dir.plot("eval.png"), eval_plot(rows))
        plots.append("plots/eval.png")
    storage.write_text(run_dir.report_md, render_markdown(cfg, report, plots))
    out = {"report": run_dir.report_md, "plots": plots, "comparison": rows}
    if storage.exists(storage.join(run_dir.model, "config.json")):  # after eval: the card carries its table
        card = storage.join(run_dir.model, "README.md")
        base = f"{cfg.model.name_or_path} (+ sft stage)" if _sft_trained(manifests) else cfg.model.name_or_path
        storage.write_text(card, model_card(cfg, manifests, rows, base))
        out["model_card"] = card
        if cfg.export.push_to_hub:
            out["pushed_to"] = push_to_hub(run_dir.model, cfg.export.push_to_hub, cfg.export.private)
    return out


def _sft_trained(stages: dict) -> bool:
    """Whether the sft stage fine-tuned the base that BPO aligned (rather than being off)."""
    sft = stages.get("sft", {})
    return bool(sft) and not sft.get("skipped")


def training_log(run_dir: RunDir) -> list[dict]:
    """The training steps of every bootstrapping round up to ``run_dir``'s, as one run: round k's steps are
    numbered on from round k − 1's, and each step says its ``round`` (one round: its log as written)."""
    if run_dir.round == 1:
        return run_dir.read_training_log("train")
    rows: list[dict] = []
    for k in range(1, run_dir.round + 1):
        offset = max((m["step"] for m in rows), default=0)
        rows += [{**m, "step": m["step"] + offset, "round": k} for m in run_dir.at_round(k).read_training_log("train")]
    return rows


def render_markdown(cfg: RunConfig, report: dict, plots: list[str]) -> str:
    stages = report["stages"]
    final = (report["training"]["final"] or {})
    first = (report["training"]["first"] or {})
    images = stages.get("eval", {}).get("dataset", "")
    policy = f"`{cfg.model.name_or_path}`" + (" fine-tuned by the sft stage" if _sft_trained(stages) else "")
    lines = [
        f"# BPO run report: {cfg.run_name}", "",
        f"Policy {policy}; run directory `{report['run_dir']}`.", "",
        "## Pipeline", "", stage_table(stages, RunDir(report["run_dir"])), "",
        "## Training", "",
        f"Loss {first.get('loss', math.nan):.3f} → {final.get('loss', math.nan):.3f}, reward margin "
        f"{final.get('reward_margin', math.nan):.3f}, reward accuracy {final.get('reward_accuracy', math.nan):.2f} "
        f"(beta {cfg.train.beta}, loss `{cfg.train.loss}`).", "",
    ]
    if "plots/training.png" in plots:
        lines += ["![training curves](plots/training.png)", ""]
    lines += ["## Base vs aligned", ""]
    if report["comparison"]:
        n = report["eval"].get("aligned", {}).get("images")
        lines += [f"Held-out synthetic images: {n} (`{images}`); greedy decoding; ✓ = aligned better.", "",
                  format_table(report["comparison"]), "", *_pope_noise(report["eval"])]
        if "plots/eval.png" in plots:
            lines += ["![base vs aligned](plots/eval.png)", ""]
    elif scores := aligned_only(report["eval"]):
        n = report["eval"]["aligned"].get("images")
        lines += [f"Only the aligned model was evaluated here (`eval.base: false`). Held-out synthetic images: {n} "
                  f"(`{images}`); greedy decoding.", "", "| metric | aligned |", "|---|---:|",
                  *[f"| {label} | {value:.3f} |" for label, value in scores], ""]
    else:
        lines += ["Evaluation was not run (eval.enabled is false).", ""]
    return "\n".join(lines)


def _pope_noise(evaluated: dict) -> list[str]:
    """One line on how large a POPE accuracy change must be to be more than noise, per split."""
    pope = evaluated.get("aligned", {}).get("pope", {})
    parts = [f"{split} ±{100 * m['accuracy_ci95']:.1f} points on {m['n']} probes (truth yes-rate "
             f"{m['truth_yes_rate']:.2f})" for split, m in pope.items() if "accuracy_ci95" in m]
    return [f"POPE accuracy, 95% half-width (normal approximation): {'; '.join(parts)}.", ""] if parts else []
