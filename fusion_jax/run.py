"""A workdir restored for analysis: `run = fusion_jax.load_run("runs/dyn_fusion")`.

A training workdir (configs/baseline.py, configs/dyn_fusion.py) gives a `Run`: its saved config
(config.json, the truth about the workdir, DESIGN.md §5), tasks, seeds, logs and final_info, and
per (task, seed) the restored parameters, logits, fusion gate weights and data splits:

    run = fusion_jax.load_run("runs/dyn_fusion")
    logits = run.apply("x_plus_y", 0, run.splits("x_plus_y", 0).val.inputs)  # [N, classes]

A merging comparison workdir (configs/compare.py) gives a `MergeRun`: its saved stages per seed
(base, experts, DAM coefficients, ...), the DAM-merged model and evaluation on each task's splits.

Seeds are the seed values the logs carry (`config.seed + r` for run r), not run indices. Reading
never writes into the workdir and takes no lock, so a workdir can be read while it trains.
"""

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fusion_jax import files
from fusion_jax import workdir as workdir_lib
from fusion_jax.data import pipeline
from fusion_jax.data import tasks as tasks_lib
from fusion_jax.errors import UserError
from fusion_jax.specs import grokking, merge_compare
from fusion_jax.train import logs as logs_lib

# The kinds of workdir (config.experiment) that load_run reads, with their specs; None is a
# training workdir.
_READABLE = {None: grokking.SPEC, "merge_compare": merge_compare.SPEC}


def load_run(workdir: str) -> "Run | MergeRun":
    """The workdir's saved config, logs and checkpoints, ready to restore and apply."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"{workdir} is a file, not a workdir")
    if not os.path.isdir(workdir):
        raise UserError(f"{workdir} does not exist; train into it first")
    stored = workdir_lib.stored_config(
        workdir, lambda c: _READABLE.get(c.get("experiment"), grokking.SPEC)
    )
    if stored is None:
        raise UserError(
            f"{workdir} has no {workdir_lib.CONFIG_FILE}: it is not a fusion_jax workdir, or its "
            "training never started"
        )
    config = ml_collections.ConfigDict(stored)
    experiment = config.get("experiment")
    if experiment not in _READABLE:
        raise UserError(
            f"load_run reads training workdirs and merging comparisons; {workdir} is a "
            f"{experiment!r} workdir"
        )
    return MergeRun(workdir, config) if experiment == "merge_compare" else Run(workdir, config)


class _Workdir:
    """What both kinds share: the config, tasks, seeds and the checks of a (task, seed)."""

    def __init__(self, workdir: str, config: ml_collections.ConfigDict):
        self.workdir = workdir
        self.config = config
        self.tasks: list[str] = tasks_lib.parse_task_names(config.tasks)
        self.seeds: list[int] = [config.seed + r for r in range(config.num_seeds)]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.workdir!r}: {self.config.get('name')!r}, "
            f"tasks={self.tasks}, seeds={self.seeds})"
        )

    def _check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise UserError(
                f"unknown task {task!r} for {self.workdir}; its tasks: {', '.join(self.tasks)}"
            )

    def _run_index(self, seed: int) -> int:
        """The position of `seed` on the run axis of the stacked checkpoints."""
        if seed not in self.seeds:
            raise UserError(
                f"seed {seed} is not a seed of {self.workdir}; its seeds: "
                f"{', '.join(map(str, self.seeds))} (config.seed={self.config.seed}, "
                f"config.num_seeds={self.config.num_seeds})"
            )
        return self.seeds.index(seed)

    @property
    def final_info(self) -> dict | None:
        """final_info.json (the reference's per-task summary), or None before it is written."""
        return files.read_json(os.path.join(self.workdir, "final_info.json"), None)


class Run(_Workdir):
    """A training workdir: `<task>/metrics.jsonl` and `<task>/checkpoints/<step>/` per task."""

    def __init__(self, workdir: str, config: ml_collections.ConfigDict):
        super().__init__(workdir, config)
        self._setups: dict = {}
        self._fns: dict = {}  # (what, task) -> jitted function
        self._restored: dict = {}  # (task, step asked for) -> (step, run-stacked params)

    @property
    def logs(self) -> dict[str, list[dict]]:
        """Per task, the log records `{"step", "seed", train_loss, ...}` (read anew each time,
        so a run still training shows its latest)."""
        from fusion_jax.evaluate import results

        return results.read_task_records(self.workdir, self.tasks)

    def curves(self, task: str) -> dict[str, np.ndarray]:
        """`{"step": [T], "seed": [R], metric: [R, T]}` of a task's log."""
        self._check_task(task)
        return logs_lib.to_arrays(self.logs[task])

    def setup(self, task: str):
        """The task's `loop.TaskSetup` (model, apply_fn, seeds, splits) from the saved config."""
        self._check_task(task)
        if task not in self._setups:
            from fusion_jax.train import loop

            self._setups[task] = loop.setup_task(self.config, task)
        return self._setups[task]

    def checkpoint_dir(self, task: str) -> str:
        self._check_task(task)
        return os.path.join(self.workdir, task, "checkpoints")

    def steps(self, task: str) -> list[int]:
        """The saved checkpoint steps of a task, oldest first."""
        directory = self.checkpoint_dir(task)
        if not os.path.isdir(directory):
            return []
        return sorted(int(d) for d in os.listdir(directory) if d.isdigit())

    def _stacked_params(self, task: str, step: int | None):
        """`(step, params [R, ...])` of checkpoint `step` (None: the newest that restores)."""
        saved = self.steps(task)
        if not saved:
            raise UserError(
                f"no checkpoints for task {task!r} in {self.checkpoint_dir(task)}; train first"
            )
        if step is not None and step not in saved:
            raise UserError(
                f"no checkpoint of step {step} for task {task!r} in {self.workdir}; saved "
                f"steps: {', '.join(map(str, saved))}"
            )
        cached = self._restored.get((task, step))
        # The newest step moves while a run trains: restore again when a newer one is saved.
        if cached is None or (step is None and cached[0] != saved[-1]):
            from fusion_jax.train import checkpoint, loop

            # Opened only when the directory exists: the manager creates a missing one.
            mngr = checkpoint.manager(self.checkpoint_dir(task), self.config.train.max_to_keep)
            try:
                found = loop.restore_runs(self.config, self.setup(task), mngr, step)
            finally:
                mngr.close()
            if found is None:  # Only step directories that Orbax does not list as steps.
                raise UserError(
                    f"no checkpoints for task {task!r} in {self.checkpoint_dir(task)}; train first"
                )
            restored_step, state = found
            # Keep one restored checkpoint: a run holds every seed's parameters.
            self._restored = {(task, step): (int(restored_step), state.params)}
        return self._restored[(task, step)]

    def params(self, task: str, seed: int, step: int | None = None):
        """One seed's parameters at checkpoint `step` (None: the newest that restores)."""
        r = self._run_index(seed)
        _, stacked = self._stacked_params(task, step)
        return jax.tree.map(lambda x: x[r], stacked)

    def restored_step(self, task: str, step: int | None = None) -> int:
        """The step `params(task, seed, step)` restores (the newest good one for None)."""
        return self._stacked_params(task, step)[0]

    def apply(self, task: str, seed: int, tokens, step: int | None = None) -> jax.Array:
        """Logits `[B, classes]` of one seed's model on `tokens [B, 4]` (int token ids)."""
        params = self.params(task, seed, step)
        if ("logits", task) not in self._fns:
            apply_fn = self.setup(task).apply_fn
            self._fns["logits", task] = jax.jit(lambda p, x: apply_fn(p, x)[0])
        return self._fns["logits", task](params, jnp.asarray(tokens))

    def gate_weights(self, task: str, seed: int, tokens, step: int | None = None) -> jax.Array:
        """Fusion models: the gate's weights `[B, L', K]` over the K experts (they sum to 1 over
        K) on `tokens [B, 4]`; L' is 1 with config.model.last_position_only."""
        setup = self.setup(task)
        if not hasattr(setup.model, "fused_features"):
            raise UserError(
                f"{self.workdir} trains {self.config.model.name!r} models, which have no gate; "
                "gate weights exist for fusion models (configs/dyn_fusion.py)"
            )
        params = self.params(task, seed, step)
        if ("gate", task) not in self._fns:
            from fusion_jax.evaluate import analysis

            self._fns["gate", task] = jax.jit(
                lambda p, x: analysis.gate_weights(setup.model, p, x, setup.numerics)
            )
        return self._fns["gate", task](params, jnp.asarray(tokens))

    def splits(self, task: str, seed: int) -> pipeline.TaskData:
        """The seed's `train` and `val` splits (host numpy: `inputs [N, 4]`, `labels [N]`)."""
        r = self._run_index(seed)
        data = self.setup(task).data
        return jax.tree.map(lambda x: x[r], data)


class MergeRun(_Workdir):
    """A merging comparison (configs/compare.py): stages saved per seed under
    `<workdir>/stages/<stage>/seed_<s>` and `comparison.{md,json}`."""

    def __init__(self, workdir: str, config: ml_collections.ConfigDict):
        super().__init__(workdir, config)
        from fusion_jax.data import multitask

        self.multitask = multitask.MultiTask(tuple(self.tasks), config.data.p)

    @property
    def comparison(self) -> dict | None:
        """comparison.json (a row per method), or None before the comparison finished."""
        return files.read_json(os.path.join(self.workdir, "comparison.json"), None)

    def stage_dir(self, stage: str, seed: int) -> str:
        return os.path.join(self.workdir, "stages", stage, f"seed_{seed}")

    def saved_stages(self, seed: int) -> list[str]:
        """The stages saved for `seed`."""
        root = os.path.join(self.workdir, "stages")
        if not os.path.isdir(root):
            return []
        return sorted(s for s in os.listdir(root) if os.path.isdir(self.stage_dir(s, seed)))

    def stage(self, stage: str, seed: int):
        """A saved stage tree of one seed: "base" and "random_experts"/"experts" (leaves
        `[K, ...]`, one expert per task), "dam" (coefficients), "fusion_frozen", "fusion_e2e"."""
        self._run_index(seed)
        path = self.stage_dir(stage, seed)
        if not os.path.isdir(path):
            saved = self.saved_stages(seed)
            raise UserError(
                f"no stage {stage!r} saved for seed {seed} in {self.workdir}; saved stages: "
                f"{', '.join(saved) if saved else 'none (train it first)'}"
            )
        return _restore_tree(os.path.abspath(path))

    @functools.cached_property
    def model(self):
        """The plain Transformer every expert and every merged model is an instance of."""
        from fusion_jax import models
        from fusion_jax.models.transformer import Transformer

        return Transformer(models.transformer_config(self.config.model, self.multitask))

    def dam_params(self, seed: int):
        """The DAM-merged model of one seed: `sum_k f(c_k) * W_k` over the seed's experts, a
        plain model of one expert's size (what the comparison's "DAM" row scores)."""
        from fusion_jax import merging

        coeffs, experts = self.stage("dam", seed), self.stage("experts", seed)
        return merging.dam_merge(coeffs, experts, self.config.dam.nonlinearity)

    @functools.cached_property
    def _logits_fn(self):
        from fusion_jax.models.numerics import Numerics

        numerics, model = Numerics.of(self.config.model), self.model
        return jax.jit(lambda params, tokens: numerics.apply(model, params, tokens))

    def apply(self, params, tokens) -> jax.Array:
        """Logits `[B, classes]` of a plain model (an expert, a merge) on `tokens [B, 4]`."""
        return self._logits_fn(params, jnp.asarray(tokens))

    def splits(self, task: str, seed: int):
        """The seed's `train`, `holdout` and `val` splits of a task, in the shared vocabulary."""
        from fusion_jax.data import multitask

        self._check_task(task)
        self._run_index(seed)
        d = self.config.data
        parts = multitask.splits(self.multitask, seed, d.frac_train, d.holdout_frac)
        return parts[self.tasks.index(task)]

    def evaluate(
        self, params, seed: int, split: str = "val", tasks: list[str] | None = None
    ) -> dict[str, dict[str, float]]:
        """`{task: {"loss", "acc"}}` of a plain model on `split` ("train", "holdout", "val") of
        `seed`, for every task or those in `tasks`."""
        import optax

        out = {}
        for task in self.tasks if tasks is None else tasks:
            part = getattr(self.splits(task, seed), split)
            logits = self.apply(params, part.inputs)
            labels = jnp.asarray(part.labels)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            out[task] = {
                "loss": float(jnp.mean(loss)),
                "acc": float(jnp.mean(jnp.argmax(logits, -1) == labels)),
            }
        return out


def _restore_tree(path: str):
    """An Orbax tree as saved (experiments/stages.py writes them with StandardCheckpointer)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(path)
