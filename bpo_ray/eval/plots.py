"""The report's figures as PNG bytes: training curves and base vs aligned."""

from __future__ import annotations

import io

CURVES = (("loss", "loss"), ("reward_margin", "reward margin"), ("reward_accuracy", "reward accuracy"))


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (shorter at the start), so the curve starts at step 1."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _plot_png(draw) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw(plt)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def training_plot(metrics: list[dict], title: str = "DPO") -> bytes:
    """One panel per curve: every step faint, a trailing mean (a twentieth of the run, at least 5 steps) on
    top. A step trained twice (before and after a restart) counts once, as the later attempt logged it."""
    by_step = {m["step"]: m for m in metrics}
    steps = sorted(by_step)
    window = max(5, len(steps) // 20)

    def draw(plt):
        fig, axes = plt.subplots(1, len(CURVES), figsize=(12, 3.2))
        for ax, (key, label) in zip(axes, CURVES, strict=True):
            points = [(s, by_step[s][key]) for s in steps if isinstance(by_step[s].get(key), (int, float))]
            xs, values = [s for s, _ in points], [v for _, v in points]
            if len(values) > window:
                ax.plot(xs, values, lw=0.8, alpha=0.3, color="C0", label="per step")
                ax.plot(xs, moving_average(values, window), lw=1.8, color="C0", label=f"mean of {window}")
                ax.legend(fontsize=8)
            else:  # too few steps to smooth
                ax.plot(xs, values, lw=1.5, color="C0", marker=".")
            ax.set_title(f"{title} {label}")
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
