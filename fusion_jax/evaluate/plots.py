"""The reference's plots: `{train,val}_{loss,acc}_{task}.png`, one line per run (experiment).

Each line is the mean over seeds with a shaded band of one standard error.
"""

import os

import numpy as np

from fusion_jax.train import logs

LABELS = {"loss": "Loss", "acc": "Accuracy"}


def pyplot():
    """matplotlib.pyplot, imported when a plot is drawn (0.6 s that runs without plots, a merge
    from the CLI among them, do not spend), writing files only: no display on servers, CI or
    Colab backends needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: dict[str, dict[str, list[dict]]], out_dir: str) -> list[str]:
    """`runs` maps a run label to its per-task log records; returns the written paths."""
    plt = pyplot()
    os.makedirs(out_dir, exist_ok=True)
    tasks = sorted({t for per_task in runs.values() for t, r in per_task.items() if r})
    paths = []
    for task in tasks:
        for split in ("train", "val"):
            for metric in ("loss", "acc"):
                fig, ax = plt.subplots(figsize=(7, 4.5))
                for label, per_task in runs.items():
                    if not per_task.get(task):
                        continue
                    arrays = logs.to_arrays(per_task[task])
                    values = arrays[f"{split}_{metric}"]
                    mean = values.mean(axis=0)
                    n = values.shape[0]
                    err = values.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.zeros_like(mean)
                    ax.plot(arrays["step"], mean, label=label)
                    ax.fill_between(arrays["step"], mean - err, mean + err, alpha=0.2)
                name = "Validation" if split == "val" else "Training"
                ax.set(title=f"{name} {LABELS[metric]} Across Runs for {task} Dataset",
               xlabel="Update Steps", ylabel=f"{name} {LABELS[metric]}")  # fmt: skip
                ax.legend()
                ax.grid(alpha=0.3)
                fig.tight_layout()
                path = os.path.join(out_dir, f"{split}_{metric}_{task}.png")
                fig.savefig(path, dpi=100)
                plt.close(fig)
                paths.append(path)
    return paths


def spread_labels(ys, gap: float) -> list[float]:
    """Label heights for points at heights `ys` (one column of the plot): each label at its
    point's height, or pushed up just enough to sit `gap` above the label below it."""
    heights = [0.0] * len(ys)
    previous = -np.inf
    for i in sorted(range(len(ys)), key=lambda i: ys[i]):
        heights[i] = previous = max(ys[i], previous + gap)
    return heights


def _columns(xs, ratio: float = 1.1) -> list[list[int]]:
    """Indices of `xs` grouped into columns of costs within `ratio` of the column's smallest (on
    the plot's log axis they share one place)."""
    columns = []
    for i in sorted(range(len(xs)), key=lambda i: xs[i]):
        if columns and xs[i] <= ratio * xs[columns[-1][0]]:
            columns[-1].append(i)
        else:
            columns.append([i])
    return columns


def plot_frontier(points, path: str, xlabel: str, ylabel: str, title: str) -> None:
    """One marker per method at (cost, mean over seeds) with a standard-error bar.

    `points`: `(label, x, per-seed values)`; one seed gives no bar. Methods of (nearly) equal
    cost share a column, so their labels are spread apart (`spread_labels`), each with a line to
    its point when moved.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    means = []
    for _, x, values in points:
        v = np.asarray(values, float)
        err = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
        ax.errorbar(x, v.mean(), yerr=err, fmt="o", capsize=3)
        means.append(v.mean())
    low, high = ax.get_ylim()
    gap = 0.03 * (high - low)
    label_y = list(means)
    for column in _columns([x for _, x, _ in points]):
        spread = spread_labels([means[i] for i in column], gap)
        for i, y in zip(column, spread, strict=True):
            label_y[i] = y
    ax.set_ylim(low, max(high, max(label_y) + gap))
    for (label, x, _), y, y_label in zip(points, means, label_y, strict=True):
        arrow = {"arrowstyle": "-", "lw": 0.5, "color": "0.5"} if y_label != y else None
        ax.annotate(label, (x, y), xytext=(x * 1.03, y_label), fontsize=7, va="center",
                    arrowprops=arrow)  # fmt: skip
    ax.set(xscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
