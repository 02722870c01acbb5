"""Results in the reference's formats: final_info.json per experiment, per-run logs, plots.

Each task's entry also says the step it describes (`last_step`: the last one every seed logged),
so a report of an unfinished run cannot pass for a finished one.

The reference reports `np.std(x) / len(x)` as the "stderr"; we report the true standard error of
the mean, `std(x, ddof=1) / sqrt(n)` (0 for a single run).
"""

import os

import numpy as np
from absl import logging

from fusion_jax import files
from fusion_jax.train import logs

FINAL_KEYS = ("final_train_loss", "final_val_loss", "final_train_acc", "final_val_acc")


def stderr(values) -> float:
    values = np.asarray(values, np.float64)
    if values.size < 2:
        return 0.0
    return float(np.std(values, ddof=1) / np.sqrt(values.size))


def step_to_threshold(steps: np.ndarray, val_acc: np.ndarray, threshold: float, default: int):
    """First logged step whose validation accuracy exceeds `threshold`, else `default`."""
    hits = np.nonzero(val_acc > threshold)[0]
    return int(steps[hits[0]]) if hits.size else int(default)


def task_final_info(records: list[dict], num_steps: int, threshold: float) -> dict:
    """The reference's per-task entry: means, stderrs and per-seed values, at `last_step`, the
    last step every seed logged (`num_steps` when the run finished)."""
    ends = {}
    for r in records:
        ends[r["seed"]] = max(ends.get(r["seed"], 0), r["step"])
    last = min(ends.values())
    arrays = logs.to_arrays([r for r in records if r["step"] <= last])
    per_seed = {
        "final_train_loss": arrays["train_loss"][:, -1],
        "final_val_loss": arrays["val_loss"][:, -1],
        "final_train_acc": arrays["train_acc"][:, -1],
        "final_val_acc": arrays["val_acc"][:, -1],
        "step_val_acc_99": np.array(
            [
                step_to_threshold(arrays["step"], acc, threshold, num_steps)
                for acc in arrays["val_acc"]
            ]
        ),
    }
    return {
        "means": {f"{k}_mean": float(np.mean(v)) for k, v in per_seed.items()},
        "stderrs": {f"{k}_stderr": stderr(v) for k, v in per_seed.items()},
        "final_info_dict": {k: v.tolist() for k, v in per_seed.items()},
        "last_step": last,
    }


def final_info(task_records: dict[str, list[dict]], num_steps: int, threshold: float) -> dict:
    return {
        task: task_final_info(records, num_steps, threshold)
        for task, records in task_records.items()
        if records
    }


def read_task_records(workdir: str, tasks: list[str]) -> dict[str, list[dict]]:
    return {t: logs.read(os.path.join(workdir, t, "metrics.jsonl")) for t in tasks}


def write_report(config, workdir: str, task_records: dict[str, list[dict]]) -> dict:
    """Writes final_info.json, all_results.json (every run's per-step log) and the 16 plots."""
    from fusion_jax.evaluate import plots  # matplotlib is only needed when plots are written.

    info = final_info(task_records, config.num_steps, config.eval.acc_threshold)
    for task, entry in info.items():
        if entry["last_step"] < config.num_steps:
            logging.warning(
                "[%s] unfinished: final_info.json describes step %d of %d (last_step)",
                task, entry["last_step"], config.num_steps,
            )  # fmt: skip
    files.write_json(os.path.join(workdir, "final_info.json"), info)
    files.write_json(
    os.path.join(workdir, "all_results.json"),
    {task: {k: np.asarray(v).tolist() for k, v in logs.to_arrays(r).items()}
     for task, r in task_records.items() if r},
  )  # fmt: skip
    plots.plot_curves({config.name: task_records}, workdir)
    return info
