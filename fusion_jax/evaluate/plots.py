"""The reference's plots: `{train,val}_{loss,acc}_{task}.png`, one line per run (experiment).

Each line is the mean over seeds with a shaded band of one standard error.
"""

import os

import matplotlib

matplotlib.use("Agg")  # Files only: no display on servers, CI or Colab backends needed.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fusion_jax.train import logs  # noqa: E402

LABELS = {"loss": "Loss", "acc": "Accuracy"}


def plot_curves(runs: dict[str, dict[str, list[dict]]], out_dir: str) -> list[str]:
    """`runs` maps a run label to its per-task log records; returns the written paths."""
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


def plot_frontier(points, path: str, xlabel: str, ylabel: str, title: str) -> None:
    """One marker per method at (cost, mean over seeds) with a standard-error bar.

    `points`: `(label, x, per-seed values)`; one seed gives no bar.
    """
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for label, x, values in points:
        v = np.asarray(values, float)
        err = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
        ax.errorbar(x, v.mean(), yerr=err, fmt="o", capsize=3)
        ax.annotate(label, (x, v.mean()), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set(xscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
