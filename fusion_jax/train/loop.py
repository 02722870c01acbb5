"""Training loop: every seed of a task in one vmapped program, pmap over devices, Orbax resume.

Resume order (on every start): for each task, restore the newest checkpoint of
`<workdir>/<task>/checkpoints` that restores (damaged newer ones are named in a warning and
skipped), drop log records written after it, and continue from its step; a task whose checkpoint
is at `num_steps`, or that has no checkpoint but a log with every seed at `num_steps`, is done and
skipped.
"""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from fusion_jax import models, runtime
from fusion_jax import workdir as workdir_lib
from fusion_jax.data import pipeline
from fusion_jax.data import tasks as tasks_lib
from fusion_jax.errors import UserError
from fusion_jax.models.numerics import NUMERICS_FIELDS, Numerics
from fusion_jax.specs import grokking
from fusion_jax.train import checkpoint, chunks, logs, steps
from fusion_jax.train.optimizer import make_optimizer


@dataclasses.dataclass
class TaskSetup:
    """Everything needed to train or evaluate the runs of one task."""

    task: tasks_lib.Task
    model: nn.Module
    numerics: Numerics
    apply_fn: steps.ApplyFn
    tx: optax.GradientTransformation
    seeds: list[int]
    run_keys: jax.Array  # [R] one PRNG key per run
    data: pipeline.TaskData  # host numpy, leaves [R, ...]

    def init_runs(self) -> steps.TrainState:
        """Fresh states stacked over runs: leaves `[R, ...]`."""
        example = jnp.asarray(self.data.train.inputs[0, :1])

        def one(key):
            key = jax.random.fold_in(key, steps.INIT_STREAM)
            return steps.init_state(self.model, self.tx, key, example)

        return jax.jit(jax.vmap(one))(self.run_keys)

    def abstract_runs(self):
        return jax.eval_shape(self.init_runs)


def task_dir(workdir: str, task_name: str) -> str:
    return os.path.join(workdir, task_name)


def task_size(config, task_name: str) -> int | None:
    return tasks_lib.size_for(task_name, config.data.p)


def setup_task(config: ml_collections.ConfigDict, task_name: str) -> TaskSetup:
    task = tasks_lib.get_task(task_name, task_size(config, task_name))
    inputs, labels = pipeline.load_table(
        task_name, config.data.source, config.data.tfds_dir, task_size(config, task_name)
    )
    seeds = [config.seed + r for r in range(config.num_seeds)]
    model = models.build_model(config.model, task)
    numerics = Numerics.of(config.model)
    return TaskSetup(
        task=task,
        model=model,
        numerics=numerics,
        apply_fn=steps.model_apply_fn(model, numerics),
        tx=make_optimizer(config.opt, frozen_collections(config)),
        seeds=seeds,
        run_keys=jax.vmap(jax.random.key)(jnp.array(seeds)),
        data=pipeline.make_task_data(inputs, labels, config.data.frac_train, seeds),
    )


def frozen_collections(config) -> tuple[str, ...]:
    # specs/grokking.py allows freeze_experts only for models with experts.
    return ("ensemble",) if config.model.get("freeze_experts", False) else ()


def resolve_num_devices(config) -> int:
    """Devices this process feeds (in a multi-process run, each process feeds as many)."""
    return config.train.num_devices or jax.local_device_count()


def step_config(config, num_devices: int) -> steps.StepConfig:
    return steps.StepConfig(
        batch_size=config.train.batch_size,
        eval_every=config.train.eval_every,
        eval_mode=config.eval.mode,
        eval_batches=config.eval.num_batches,
        eval_batch_size=config.eval.batch_size,
        # The pmap axis spans the devices of every process.
        num_devices=num_devices * jax.process_count(),
    )


def device_data(setup: TaskSetup, num_devices: int) -> dict:
    """Train/val splits replicated on every device, plus each device's share of the val split
    (this process's devices' shares of the split over all processes' devices)."""
    first = jax.process_index() * num_devices
    val_shard, val_mask = pipeline.shard_for_eval(setup.data.val, num_devices * jax.process_count())
    mine = slice(first, first + num_devices)
    return {
        "train": pipeline.replicate(setup.data.train, num_devices),
        "val": pipeline.replicate(setup.data.val, num_devices),
        "val_shard": pipeline.to_devices(jax.tree.map(lambda x: x[mine], val_shard)),
        "val_mask": pipeline.to_devices(val_mask[mine]),
    }


def _records(metrics: dict, first_step: int, eval_every: int, seeds: list[int]) -> list[dict]:
    """Chunk metrics `[R, n]` -> one log record per (step, seed)."""
    out = []
    for i in range(metrics["val_acc"].shape[1]):
        for r, seed in enumerate(seeds):
            rec = {"step": first_step + (i + 1) * eval_every, "seed": seed}
            rec.update({k: float(metrics[k][r, i]) for k in logs.METRICS})
            out.append(rec)
    return out


def _progress(task, step, num_steps, metrics, rate, compile_secs):
    eta = (num_steps - step) / rate if rate > 0 else float("nan")
    mean = {k: float(np.mean(metrics[k][:, -1])) for k in logs.METRICS}
    compiled = "" if compile_secs is None else f" (compiled in {compile_secs:.0f} s)"
    logging.info(
    "[%s] step %d/%d  train_loss %.4f  train_acc %.4f  val_loss %.4f  val_acc %.4f  "
    "(mean of %d runs)  %.1f steps/s  ETA %ds%s",
    task, step, num_steps, mean["train_loss"], mean["train_acc"], mean["val_loss"],
    mean["val_acc"], metrics["val_acc"].shape[0], rate, eta, compiled,
  )  # fmt: skip


def train_task(config: ml_collections.ConfigDict, workdir: str, task_name: str) -> list[dict]:
    """Trains (or resumes) all runs of one task; returns its log records."""
    setup = setup_task(config, task_name)
    num_devices = resolve_num_devices(config)
    directory = task_dir(workdir, task_name)
    os.makedirs(directory, exist_ok=True)
    # Process 0 keeps the log; the others keep their records in memory only.
    log_path = os.path.join(directory, "metrics.jsonl") if runtime.is_primary() else None
    mngr = checkpoint.manager(os.path.join(directory, "checkpoints"), config.train.max_to_keep)
    try:
        found = restore_runs(config, setup, mngr)
        logged = logs.read(log_path) if log_path and found is None else []
        if found is None and _finished_by_log(config, setup, logged):
            # Its checkpoints are gone (a study carried to a fresh machine by its results/
            # logs): training it again would overwrite the log of a finished task.
            logging.warning(
                "[%s] no checkpoint, but its log reaches step %d for every seed: done",
                task_name, config.num_steps,
            )  # fmt: skip
            return logged
        if found is None:
            state, start = setup.init_runs(), 0
        else:
            start, state = found
            logging.info("[%s] resuming from the checkpoint at step %d", task_name, start)
        records = logs.truncate(log_path, start) if log_path else []
        if start >= config.num_steps:
            logging.info("[%s] already trained to step %d; skipping", task_name, start)
            return records
        _train_from(config, setup, mngr, state, start, num_devices, log_path, records)
    finally:
        mngr.wait_until_finished()
        mngr.close()
    return records


def _finished_by_log(config, setup: TaskSetup, logged: list[dict]) -> bool:
    """Whether the task's log records have every seed at `num_steps` (process 0's answer: only
    it keeps the log, and every process must take the same branch)."""
    seeds = {r["seed"] for r in logged if r["step"] == config.num_steps}
    (finished,), _ = runtime.agree(int(seeds >= set(setup.seeds)))
    return bool(finished)


def _train_from(config, setup, mngr, state, step, num_devices, log_path, records):
    cfg = step_config(config, num_devices)
    t = config.train
    data = device_data(setup, num_devices)
    run_keys = pipeline.replicate(setup.run_keys, num_devices)
    chunk_fns = {}

    def run_chunk(state, n):
        intervals = n // t.eval_every
        if intervals not in chunk_fns:
            chunk_fns[intervals] = steps.make_chunk_fn(setup.apply_fn, setup.tx, cfg, intervals)
        state, metrics = chunk_fns[intervals](state, data, run_keys)
        return state, jax.tree.map(lambda x: x[0], metrics)

    def log(metrics, done):
        new = _records(metrics, done - metrics["val_acc"].shape[1] * t.eval_every, t.eval_every,
                       setup.seeds)  # fmt: skip
        if log_path:
            logs.append(log_path, new)
        records.extend(new)

    def report(metrics, done, rate, compile_secs):
        _progress(setup.task.name, done, config.num_steps, metrics, rate, compile_secs)

    chunks.train_in_chunks(
        f"[{setup.task.name}]", run_chunk, pipeline.replicate(state, num_devices), step,
        config.num_steps, mngr=mngr, chunk=t.log_every,
        # Chunk ends stay multiples of `eval_every` (and checkpoint steps chunk ends).
        shrink=lambda rate: piece_steps(rate, t.checkpoint_every_secs, t.eval_every, t.log_every),
        log=log, report=report, every_steps=t.checkpoint_every,
        every_secs=t.checkpoint_every_secs,
        # On the host, after every chunk (the chunks donate the state; a grokking model is
        # small): Orbax saves host arrays collectively from several processes, not the
        # per-process device arrays pmap returns.
        snapshot=lambda s: jax.device_get(jax.tree.map(lambda x: x[0], s)),
    )  # fmt: skip


def piece_steps(steps_per_sec: float, every_secs: float, eval_every: int, log_every: int) -> int:
    """Updates per compiled chunk: `log_every`, unless a time-based checkpoint interval
    `every_secs` asks for shorter chunks (at most a quarter of it at the measured speed); then
    the largest multiple of `eval_every` that divides `log_every` and fits (at least
    `eval_every`). Few distinct lengths, so few programs to compile."""
    if every_secs <= 0 or log_every <= steps_per_sec * every_secs / 4:
        return log_every
    fitting = [
        p
        for p in range(eval_every, log_every, eval_every)
        if log_every % p == 0 and p <= steps_per_sec * every_secs / 4
    ]
    return max(fitting, default=eval_every)


def restore_runs(config, setup: TaskSetup, mngr, step: int | None = None):
    """`(step, run-stacked state)` of `step`, or of the newest checkpoint that restores (None if
    there is none); a checkpoint that does not fit the config names the fields that set shapes."""
    try:
        if step is None:
            return checkpoint.restore_newest(mngr, setup.abstract_runs())
        return step, checkpoint.restore(mngr, setup.abstract_runs(), step)
    except checkpoint.ShapeMismatch as e:
        raise UserError(
            f"{e}. Its shapes follow config.num_seeds, config.data.p, config.tasks and "
            f"config.model ({', '.join(sorted(set(config.model) - set(NUMERICS_FIELDS)))}): "
            "restore it with the config it was trained with"
        ) from e


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, list[dict]]:
    """Trains every task of the config in turn; returns log records per task.

    The config is validated and bound to the workdir first (fusion_jax/workdir.py).
    """
    with workdir_lib.claim(config, workdir, grokking.SPEC):
        records = {}
        for name in tasks_lib.parse_task_names(config.tasks):
            # A signal that reached a process of several after the last chunk of the task before
            # stops them all here, rather than after this task's set-up, compile and first chunk.
            runtime.wait_for_all(f"start of {name}")
            records[name] = train_task(config, workdir, name)
        return records
