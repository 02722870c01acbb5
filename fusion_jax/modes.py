"""One entry function per `--mode` of main.py, each `(config, workdir, **flags)`."""

import os

from fusion_jax.data import tasks as tasks_lib
from fusion_jax.evaluate import compare as compare_lib
from fusion_jax.evaluate import eval_loop, results
from fusion_jax.experiments import lm_fuse, lm_merge, lm_study
from fusion_jax.experiments import merge_compare as merge_compare_lib
from fusion_jax.train import loop

# Configs with `config.experiment` set run that experiment's entry point as their main job.
EXPERIMENTS = {
    "lm_merge": lm_merge.run,
    "lm_fuse": lm_fuse.train,
    "lm_study": lm_study.run,
}


def train(config, workdir: str, **_):
    """Trains (resuming if possible) every task, then writes final_info.json, logs and plots.

    A config naming an `experiment` (configs/lm_merge.py, ...) runs that experiment instead.
    """
    if "experiment" in config:
        loop.write_config(config, workdir)
        return EXPERIMENTS[config.experiment](config, workdir)
    task_records = loop.train(config, workdir)
    info = results.write_report(config, workdir, task_records)
    eval_loop.analyze(config, workdir)
    return info


def evaluate(config, workdir: str, step: int | None = None, **_):
    """Restores checkpoints and recomputes train/validation metrics on the full splits."""
    return eval_loop.evaluate(config, workdir, step)


def analyze(config, workdir: str, step: int | None = None, **_):
    """Compute accounting (params, FLOPs/example, examples/s) and, for fusion, gate analysis."""
    return eval_loop.analyze(config, workdir, step)


def report(config, workdir: str, **_):
    """Rewrites final_info.json and the plots from the logs in the workdir (no computation)."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"No workdir {workdir}.")
    task_records = results.read_task_records(workdir, tasks_lib.parse_task_names(config.tasks))
    return results.write_report(config, workdir, task_records)


def compare(config, workdir: str, workdirs: str = "", **_):
    """Overlays the curves of finished workdirs and tabulates them beside the seed's numbers."""
    del config  # Each workdir carries its own config.json.
    return compare_lib.compare([w for w in workdirs.split(",") if w], workdir)


def merge_compare(config, workdir: str, **_):
    """The merging experiment: base -> experts -> every method -> comparison.md/json."""
    loop.write_config(config, workdir)
    return merge_compare_lib.run(config, workdir)


def generate(config, workdir: str, **_):
    """Continues `config.generate.prompt` with a trained LM fusion workdir (configs/lm_fuse.py)."""
    if config.get("experiment") != "lm_fuse":
        raise ValueError("--mode=generate needs an LM fusion config (configs/lm_fuse.py)")
    return lm_fuse.generate(config, workdir)


MODES = {
    "train": train,
    "eval": evaluate,
    "analyze": analyze,
    "report": report,
    "compare": compare,
    "merge_compare": merge_compare,
    "generate": generate,
}
