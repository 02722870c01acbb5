"""Stages of multi-stage experiments: each result saved once with Orbax, restored on a rerun.

* `Stages(workdir).run(name, fn, abstract)`: one tree for the whole stage (all seeds inside),
  saved at `<workdir>/stages/<name>`; `fn() -> (tree, training FLOPs)` runs only if it is absent.
* `Stages(workdir).run_seeds(name, seeds, fn, abstract_one)`: one checkpoint per seed at
  `<workdir>/stages/<name>/seed_<s>`. The seeds saved before are restored and `fn(todo)` computes
  the others in one call (one vmapped program), so raising `num_seeds` trains only the new seeds.

A stage's cost is recorded in `stages/costs.json` after its tree is saved, so a stage (or a seed
of it) counts as finished only once both exist. Training inside a stage can save its progress in
`stages/in_progress/<name>/...` (`Stages.progress`: a training-loop checkpoint manager; the
merging comparison's and the LM study's training stages do, through `train_stage`), so an
interrupted stage resumes where it was saved; that folder is removed once the stage is saved.
A saved stage that fails to restore (damaged or partial files) is named in a warning, moved aside
to `<path>.damaged` (nothing is deleted) and computed again. Also here: small tree helpers the
experiments share.
"""

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from fusion_jax import files
from fusion_jax.errors import UserError
from fusion_jax.train import checkpoint, chunks

IN_PROGRESS = "in_progress"


class Stages:
    """Orbax-saved results of finished stages, plus their training cost in FLOPs."""

    def __init__(self, workdir: str):
        self.dir = os.path.abspath(os.path.join(workdir, "stages"))
        self.ckpt = checkpoint.checkpointer()
        self.cost_path = os.path.join(self.dir, "costs.json")
        os.makedirs(self.dir, exist_ok=True)
        self.costs = json.load(open(self.cost_path)) if os.path.exists(self.cost_path) else {}

    def _restore(self, key: str, abstract):
        """The saved tree of `key` (a path under stages/), or None if it is not finished or fails
        to restore (then it is moved aside, so that it is computed and saved again)."""
        path = os.path.join(self.dir, key)
        if not (os.path.exists(path) and key in self.costs):
            return None
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract)
        try:
            tree = self.ckpt.restore(path, target)
        except Exception as e:  # Damaged, partial or foreign files: compute the stage again.
            first = (str(e).strip().splitlines() or [""])[0][:200]
            moved = _set_aside(path)
            logging.warning(
                "[stages] %s cannot be restored (%s: %s); moved it aside to %s and computing "
                "it again",
                path, type(e).__name__, first, moved,
            )  # fmt: skip
            return None
        logging.info("[stages] %s: restored", key)
        return _uncommitted(tree)

    def once(self, key: str, compute) -> float:
        """`compute()` on the first run, kept in costs.json for every rerun: a number that must
        not change when the run resumes elsewhere (XLA's FLOP counts differ between backends)."""
        if key not in self.costs:
            self.costs[key] = compute()
            self._write_costs()
        return self.costs[key]

    def _write_costs(self) -> None:
        files.write_json(self.cost_path, self.costs)

    def progress(self, name: str, part: str | None, seeds, state):
        """`(manager, (step, state) or None)`: the checkpoint manager (newest step only) of
        stage `name`'s unfinished training of `part` (e.g. one task's expert; None: the whole
        stage) for `seeds` stacked in this order, and what it holds, restored like `state`.
        Progress that cannot be restored is moved aside (training then starts over)."""
        parts = [name] + ([part] if part else []) + ["seeds_" + "_".join(map(str, seeds))]
        path = os.path.join(self.dir, IN_PROGRESS, *parts)
        mngr = checkpoint.manager(path, max_to_keep=1)
        try:
            found = checkpoint.restore_newest(mngr, state)
        except UserError as e:  # its one step is damaged
            mngr.close()
            moved = _set_aside(path)
            logging.warning("[stages] %s; moved it aside to %s and training from the start", e,
                            moved)  # fmt: skip
            return checkpoint.manager(path, max_to_keep=1), None
        return mngr, None if found is None else (found[0], _uncommitted(found[1]))

    def _done_with(self, name: str) -> None:
        shutil.rmtree(os.path.join(self.dir, IN_PROGRESS, name), ignore_errors=True)

    def run(self, name: str, fn, abstract):
        """Restores stage `name` if saved, else runs `fn() -> (tree, train_flops)` and saves."""
        tree = self._restore(name, abstract)
        if tree is not None:
            self._done_with(name)  # left if a run stopped between saving and removing it
            return tree
        tic = time.perf_counter()
        tree, flops = fn()
        self.ckpt.save(os.path.join(self.dir, name), tree, force=True)
        self.ckpt.wait_until_finished()
        self.costs[name] = flops
        self._write_costs()
        self._done_with(name)
        logging.info("[stages] %s: done in %.0fs", name, time.perf_counter() - tic)
        return tree

    def run_seeds(self, name: str, seeds, fn, abstract_one):
        """Stage `name` of every seed in `seeds`, stacked: leaves `[R, ...]`.

        Seeds saved before are restored; `fn(todo) -> (tree [len(todo), ...], training FLOPs of
        one seed)` computes the rest in one call, `todo` being their positions in `seeds`.
        `costs[name]` is the FLOPs of one seed.
        """
        trees = [self._restore(f"{name}/seed_{s}", abstract_one) for s in seeds]
        todo = [i for i, tree in enumerate(trees) if tree is None]
        if todo:
            tic = time.perf_counter()
            new, flops = fn(todo)
            for j, i in enumerate(todo):
                trees[i] = take(new, j)
                self.ckpt.save(os.path.join(self.dir, name, f"seed_{seeds[i]}"), trees[i],
                               force=True)  # fmt: skip
                self.ckpt.wait_until_finished()
                self.costs[f"{name}/seed_{seeds[i]}"] = flops
            self.costs[name] = flops
            self._write_costs()
            logging.info("[stages] %s: seeds %s done in %.0fs", name,
                         [seeds[i] for i in todo], time.perf_counter() - tic)  # fmt: skip
        self._done_with(name)  # also when a run stopped between saving and removing it
        return stack(trees)


def train_stage(tag: str, run_chunk, state, num_steps: int, *, progress, step_of, **loop):
    """Trains a stage's runs to `num_steps` through the one training loop
    (`chunks.train_in_chunks`, which takes `run_chunk` and the keywords `loop`); returns the
    state.

    `progress(state)` is `Stages.progress` for this training (`functools.partial` of it): the
    training resumes from the state saved there (`step_of(state)` reads its step) and saves
    there. Saved progress past `num_steps` (a control stage whose step count came from another
    backend's FLOP count) is refused rather than taken as finished.
    """
    mngr, found = progress(state)
    try:
        if found is not None:
            step, state = found
            if step > num_steps:
                raise UserError(
                    f"{mngr.directory} holds step {step}, past the {num_steps} steps this stage "
                    "trains: move it aside to train the stage again"
                )
            logging.info("%s: resuming from step %d", tag, step)
        return chunks.train_in_chunks(
            tag, run_chunk, state, step_of(state), num_steps, mngr=mngr, **loop
        )
    finally:
        mngr.close()


def _uncommitted(tree):
    """Device arrays not committed to a device, like fresh ones: Orbax restores committed arrays,
    and every jitted program compiled for fresh arrays would be compiled again for them."""
    return jax.tree.map(jnp.asarray, jax.device_get(tree))


def _set_aside(path: str) -> str:
    """Renames `path` to `<path>.damaged` (`.damaged.2`, ... if taken); returns the new name."""
    dst, n = f"{path}.damaged", 2
    while os.path.exists(dst):
        dst, n = f"{path}.damaged.{n}", n + 1
    os.rename(path, dst)
    return dst


def flops_of(fn, *args, optimized: bool = True) -> float:
    """XLA's FLOP count of one call of `fn`: of the compiled program, or (`optimized=False`) of
    the lowered one before XLA's passes (within a few percent of it, without compiling)."""
    lowered = jax.jit(fn).lower(*args)
    cost = (lowered.compile() if optimized else lowered).cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", 0.0))


def stack(trees):
    """Trees of equal structure -> one tree whose leaves gain a leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def take(tree, i):
    """Every leaf indexed by `i` on its leading axis (an int, a slice or a list of positions)."""
    i = np.asarray(i) if isinstance(i, list) else i
    return jax.tree.map(lambda x: x[i], tree)
