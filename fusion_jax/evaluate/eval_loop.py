"""Evaluation from checkpoints: restore every task's runs and recompute metrics, no training."""

import functools
import os

import jax
import numpy as np
from absl import logging

from fusion_jax import files, runtime
from fusion_jax.data import tasks as tasks_lib
from fusion_jax.errors import UserError
from fusion_jax.evaluate import analysis
from fusion_jax.train import checkpoint, loop, steps


def split_metrics(apply_fn, params, split) -> dict:
    """Exact loss/accuracy of each run on a whole host split `[R, N, ...]` (one device)."""
    mask = np.ones(split.labels.shape[1], np.float32)
    fn = functools.partial(steps.evaluate_exact, apply_fn=apply_fn, axis_name=None)
    out = jax.jit(jax.vmap(fn, in_axes=(0, 0, None)))(params, split, mask)
    return {k: np.asarray(v).tolist() for k, v in out.items()}


def _checkpoint_dir(workdir: str, task_name: str) -> str:
    return os.path.join(loop.task_dir(workdir, task_name), "checkpoints")


def _has_checkpoints(workdir: str, task_name: str) -> bool:
    directory = _checkpoint_dir(workdir, task_name)
    return os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))


def restore_task(config, workdir: str, task_name: str, step: int | None = None):
    """`(setup, run-stacked state, step)` from a task's checkpoint `step`, or the newest one that
    restores (damaged newer ones are named in a warning and skipped)."""
    setup = loop.setup_task(config, task_name)
    directory = _checkpoint_dir(workdir, task_name)
    no_checkpoint = UserError(
        f"No checkpoints for task {task_name!r} under {directory}; train first."
    )
    if not os.path.isdir(directory):
        raise no_checkpoint
    mngr = checkpoint.manager(directory, config.train.max_to_keep)
    try:
        found = loop.restore_runs(config, setup, mngr, step)
    finally:
        mngr.close()
    if found is None:
        raise no_checkpoint
    step, state = found
    return setup, state, step


def evaluate_task(config, workdir: str, task_name: str, step: int | None = None) -> dict:
    setup, state, step = restore_task(config, workdir, task_name, step)
    train = split_metrics(setup.apply_fn, state.params, setup.data.train)
    val = split_metrics(setup.apply_fn, state.params, setup.data.val)
    return {
        "step": int(step),
        "seeds": setup.seeds,
        "train_loss": train["loss"],
        "train_acc": train["acc"],
        "val_loss": val["loss"],
        "val_acc": val["acc"],
    }


def analyze(config, workdir: str, step: int | None = None) -> dict:
    """Compute accounting for every model, gate analysis for fusion models; writes JSON + plots.

    Writes `compute.json` ({task: params, FLOPs/example, examples/s}) and, for models with a
    gate, `gate_analysis.json` ({task: checkpoint step, per-seed and mean statistics}) and
    `gate_heatmap_<task>.png` into the workdir, and returns what it wrote. Without `step`, tasks
    that have no checkpoint are skipped with a warning, and keep the entries an earlier analysis
    wrote for them: a study carried to a fresh machine by its logs and analyses (results/) keeps
    its finished tasks' gates while the next task trains.
    """
    order = tasks_lib.parse_task_names(config.tasks)
    skipped = [t for t in order if step is None and not _has_checkpoints(workdir, t)]
    # Analysed tasks overwrite their earlier entries; the skipped keep theirs.
    compute = files.read_json(os.path.join(workdir, "compute.json"), {})
    gates = files.read_json(os.path.join(workdir, "gate_analysis.json"), {})
    # Every process of a multi-process run restores (collectively); process 0 writes.
    out_dir = workdir if runtime.is_primary() else None
    for task_name in order:
        if task_name in skipped:
            kept = "; its earlier analysis is kept" if task_name in {*compute, *gates} else ""
            logging.warning("[%s] no checkpoints: not analysed%s", task_name, kept)
            continue
        setup, state, restored_step = restore_task(config, workdir, task_name, step)
        first_run = jax.tree.map(lambda x: x[0], state.params)
        tokens = jax.numpy.asarray(setup.data.val.inputs[0, : config.train.batch_size])
        compute[task_name] = analysis.compute_stats(setup.apply_fn, first_run, tokens)
        logging.info("[%s] compute: %s", task_name, compute[task_name])
        if hasattr(setup.model, "fused_features"):
            gates[task_name] = {
                "step": int(restored_step),
                **analysis.analyze_gates(setup, state.params, out_dir),
            }
            logging.info("[%s] gate (mean over seeds): %s", task_name, gates[task_name]["mean"])
    # In the config's task order, entries of tasks no longer in the config dropped.
    compute = {t: compute[t] for t in order if t in compute}
    gates = {t: gates[t] for t in order if t in gates}
    if out_dir is None:
        return {"compute": compute, "gates": gates}
    files.write_json(os.path.join(workdir, "compute.json"), compute)
    if gates:
        files.write_json(os.path.join(workdir, "gate_analysis.json"), gates)
    return {"compute": compute, "gates": gates}


def evaluate(config, workdir: str, step: int | None = None) -> dict:
    """Evaluates the checkpoints of every task (latest, or `step`) on the full splits.

    Writes `eval_step<N>.json` (or `eval_latest.json`) into the workdir and returns its content.
    """
    out = {}
    for task_name in tasks_lib.parse_task_names(config.tasks):
        r = evaluate_task(config, workdir, task_name, step)
        out[task_name] = r
        logging.info(
      "[%s] step %d  val_loss %s  val_acc %s  (per seed %s)", task_name, r["step"],
      np.round(r["val_loss"], 4), np.round(r["val_acc"], 4), r["seeds"],
    )  # fmt: skip
    name = "eval_latest.json" if step is None else f"eval_step{step}.json"
    files.write_json(os.path.join(workdir, name), out)
    return out
