"""The run report: ``report.json`` (everything, machine-readable), ``report.md`` (a person's view) and
``plots/*.png`` (training curves, base vs aligned), written into the run directory from what the stages
left there."""

from __future__ import annotations

import io
import json
import math

from bpo_ray import storage
from bpo_ray.config import RunConfig
from bpo_ray.stages import RunDir

STAGES = ("sft", "data", "negatives", "reference", "train", "eval")
# (label, path into one model's eval metrics, lower is better)
HEADLINE = [
    ("CHAIR_s (captions with a hallucination)", ("chair", "chair_s"), True),
    ("CHAIR_i (hallucinated mentions)", ("chair", "chair_i"), True),
    ("companion hallucination (prior)", ("chair", "companion_hallucination", "rate"), True),
    ("attribute errors", ("chair", "attribute_error_rate"), True),
    ("object recall", ("chair", "object_recall"), False),
    ("exact captions", ("chair", "exact_caption"), False),
]
POPE_FIELDS = ("f1", "accuracy", "precision", "recall", "yes_ratio")


def _get(tree: dict, path: tuple) -> float | None:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree if isinstance(tree, (int, float)) else None


def _metric_rows(scored: dict) -> list[tuple[str, tuple, bool | None]]:
    """(label, path into one model's metrics, lower is better) for the headline and every POPE split scored."""
    rows = list(HEADLINE)
    for task in ("pope", "coco_pope"):
        for split in scored.get(task, {}):
            for field in POPE_FIELDS:
                rows.append((f"{task} {split} {field}", (task, split, field), None if field == "yes_ratio" else False))
    return rows


def aligned_only(eval_metrics: dict) -> list[tuple[str, float]]:
    """(metric, value) for the aligned model, when the base was not scored in this run (``eval.base: false``)."""
    aligned = eval_metrics.get("aligned", {})
    return [(label, v) for label, path, _ in _metric_rows(aligned) if (v := _get(aligned, path)) is not None]


def comparison(eval_metrics: dict) -> list[dict]:
    """Rows of (metric, base, aligned, delta, better) over everything both models were scored on."""
    base, aligned = eval_metrics.get("base", {}), eval_metrics.get("aligned", {})
    out = []
    for label, path, lower in _metric_rows(aligned):
        b, a = _get(base, path), _get(aligned, path)
        if b is None or a is None:
            continue
        better = None if lower is None or a == b or math.isnan(a - b) else (a < b) == lower
        out.append({"metric": label, "base": b, "aligned": a, "delta": a - b, "better": better})
    return out


def headline(rows: list[dict]) -> list[dict]:
    """The rows a person reads first: caption hallucination and POPE F1 per split."""
    labels = {label for label, _, _ in HEADLINE}
    return [r for r in rows if r["metric"] in labels or r["metric"].endswith(" f1")]


def format_table(rows: list[dict]) -> str:
    lines = ["| metric | base | aligned | Δ |", "|---|---:|---:|---:|"]
    for r in rows:
        mark = {True: " ✓", False: " ✗", None: ""}[r["better"]]
        lines.append(f"| {r['metric']} | {r['base']:.3f} | {r['aligned']:.3f} | {r['delta']:+.3f}{mark} |")
    return "\n".join(lines)


def _plot_png(draw) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw(plt)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def training_plot(metrics: list[dict]) -> bytes:
    def draw(plt):
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
        steps = [m["step"] for m in metrics]
        for ax, key, title in zip(axes, ("loss", "reward_margin", "reward_accuracy"),
                                  ("DPO loss", "reward margin", "reward accuracy"), strict=True):
            ax.plot(steps, [m[key] for m in metrics], lw=1.5)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        return fig
    return _plot_png(draw)


def eval_plot(rows: list[dict]) -> bytes:
    def draw(plt):
        shown = [r for r in rows if "yes_ratio" not in r["metric"] and "precision" not in r["metric"]
                 and "recall" not in r["metric"] or r["metric"] == "object recall"]
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(shown) + 1))
        y = range(len(shown))
        ax.barh([i + 0.2 for i in y], [r["base"] for r in shown], height=0.4, label="base")
        ax.barh([i - 0.2 for i in y], [r["aligned"] for r in shown], height=0.4, label="aligned")
        ax.set_yticks(list(y), [r["metric"] for r in shown], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.legend()
        ax.set_title("base vs aligned")
        return fig
    return _plot_png(draw)


def run_report(cfg: RunConfig, run: RunDir) -> dict:
    from bpo_ray.train.stage import read_metrics

    manifests = {name: run.read_manifest(name) or {} for name in STAGES}
    train_metrics = read_metrics(run)
    eval_metrics = manifests["eval"].get("metrics", {})
    rows = comparison(eval_metrics)
    report = {
        "run_name": cfg.run_name, "run_dir": run.root,
        "stages": {name: {k: v for k, v in m.items() if k != "metrics"} for name, m in manifests.items()},
        "training": {"steps": len(train_metrics), "first": train_metrics[0] if train_metrics else None,
                     "final": train_metrics[-1] if train_metrics else None},
        "eval": eval_metrics, "comparison": rows,
    }
    storage.write_text(run.path("report.json"), json.dumps(report, indent=2, default=str))
    plots = []
    if train_metrics:
        storage.write_bytes(run.path("plots", "training.png"), training_plot(train_metrics))
        plots.append("plots/training.png")
    if rows:
        storage.write_bytes(run.path("plots", "eval.png"), eval_plot(rows))
        plots.append("plots/eval.png")
    storage.write_text(run.path("report.md"), render_markdown(cfg, report, plots))
    return {"report": run.path("report.md"), "plots": plots, "comparison": rows}


def render_markdown(cfg: RunConfig, report: dict, plots: list[str]) -> str:
    stages = report["stages"]
    data, neg, ref, train = (stages.get(k, {}) for k in ("data", "negatives", "reference", "train"))
    final = (report["training"]["final"] or {})
    first = (report["training"]["first"] or {})
    images = stages.get("eval", {}).get("dataset", "")
    sft = stages.get("sft", {})
    trained_base = bool(sft) and not sft.get("skipped")
    policy = f"`{cfg.model.name_or_path}` fine-tuned by the sft stage" if trained_base else f"`{cfg.model.name_or_path}`"
    lines = [
        f"# BPO run report: {cfg.run_name}", "",
        f"Policy {policy}; run directory `{report['run_dir']}`.", "",
        "## Pipeline", "",
        "| stage | result | seconds |", "|---|---|---:|",
    ]
    if trained_base:
        lines.append(f"| sft | {sft.get('steps')} steps on {sft.get('samples')} samples, final loss "
                     f"{sft.get('final_metrics', {}).get('loss', math.nan):.3f} (the base) | {sft.get('seconds', '')} |")
    lines += [
        f"| data | {data.get('records_in')} records → {data.get('samples')} samples "
        f"({data.get('records_rejected')} rejected) | {data.get('seconds', '')} |",
        f"| negatives | {neg.get('pairs')} pairs from {neg.get('samples_in')} samples; dropped "
        f"{neg.get('errors_by_reason') or '{}'} | {neg.get('seconds', '')} |",
        f"| reference | {ref.get('scored')} of {ref.get('pairs_in')} pairs scored ({ref.get('mode')}) | "
        f"{ref.get('seconds', '')} |",
        f"| train | {train.get('steps')} DPO steps on {train.get('workers')} workers | {train.get('seconds', '')} |",
        f"| eval | {stages.get('eval', {}).get('requests')} requests over HTTP | "
        f"{stages.get('eval', {}).get('seconds', '')} |", "",
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
                  format_table(report["comparison"]), ""]
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
