"""Orbax checkpointing of the (unreplicated) run-stacked train state, robust to damaged steps.

A damaged, partial or empty step directory is found when it fails to restore: `restore` then
warns, naming it, and falls back to the newest step that restores. Nothing is deleted. What Orbax
0.12.8 does with such directories (read from its source and checked by experiment):
* it lists any all-digit directory as a finished step, even an empty one; restoring an empty one
  raises KeyError (no "default" item), a truncated array file raises on the TensorStore read;
* a manager left to infer single- or multi-item mode from the first step it reads (no
  `item_handlers`) switches to multi-item mode on an empty directory and then refuses every step,
  so `manager` fixes the single-item mode;
* `save` silently skips a step at or below the latest listed one (`should_save`), so a damaged
  step left in place would swallow the saves that redo it: `save` first renames the damaged steps
  this manager skipped to `<step>.damaged` (not a step name to Orbax) and says so.
"""

import os
import weakref

import jax
import orbax.checkpoint as ocp
from absl import logging

from fusion_jax.errors import UserError

# Every Orbax manager and checkpointer of this process, for `wait_for_saves`.
_OPEN = weakref.WeakSet()


class Manager(ocp.CheckpointManager):
    """An Orbax manager of one item that remembers the steps it could not restore."""

    def __init__(self, directory: str, max_to_keep: int):
        super().__init__(
            directory,
            item_handlers=ocp.StandardCheckpointHandler(),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )
        self.damaged_steps: set[int] = set()
        _OPEN.add(self)


def checkpointer() -> ocp.StandardCheckpointer:
    """A plain Orbax checkpointer (one tree per directory) that `wait_for_saves` knows."""
    ckpt = ocp.StandardCheckpointer()
    _OPEN.add(ckpt)
    return ckpt


def wait_for_saves() -> None:
    """Waits for the async saves still in flight. Called before a process leaves without
    interpreter shutdown (`runtime.exit_on_interrupt`), which would otherwise wait for Orbax's
    save threads, e.g. when an interrupt ended a `wait_until_finished`."""
    for obj in list(_OPEN):
        obj.wait_until_finished()


class ShapeMismatch(UserError):
    """A checkpoint whose arrays do not fit the state the config builds (a config problem)."""


class _Damaged(Exception):
    """A step that fails to restore although its shapes fit (or cannot be read at all)."""

    def __init__(self, cause: Exception):
        # The first sentence: TensorStore appends its whole spec to the message.
        first = (str(cause).strip().splitlines() or [""])[0].split(". ")[0]
        super().__init__(f"{type(cause).__name__}: {first[:200]}")


def manager(directory: str, max_to_keep: int) -> Manager:
    return Manager(os.path.abspath(directory), max_to_keep)


def step_dir(mngr: Manager, step: int) -> str:
    return os.path.join(str(mngr.directory), str(step))


def _set_aside(mngr: Manager, step: int) -> str:
    """Renames a damaged step directory to `<step>.damaged` (`.damaged.2`, ... if taken)."""
    src = step_dir(mngr, step)
    dst, n = f"{src}.damaged", 2
    while os.path.exists(dst):
        dst, n = f"{src}.damaged.{n}", n + 1
    os.rename(src, dst)
    return dst


def save(mngr: Manager, step: int, state) -> None:
    """Saves asynchronously; call `mngr.wait_until_finished()` before the process exits."""
    if mngr.damaged_steps:
        for bad in sorted(mngr.damaged_steps):
            moved = _set_aside(mngr, bad)
            logging.warning(
                "moved the damaged checkpoint %s aside to %s so that new checkpoints are saved",
                step_dir(mngr, bad),
                moved,
            )
        mngr.damaged_steps.clear()
        mngr.reload()
    mngr.save(step, args=ocp.args.StandardSave(state))


def _array_shapes(tree) -> dict[tuple, tuple]:
    flat = ocp.tree.to_flat_dict(tree)
    return {k: tuple(v.shape) for k, v in flat.items() if hasattr(v, "shape")}


def _check_fits(mngr: Manager, step: int, target) -> None:
    """Raises ShapeMismatch when the saved arrays differ from `target`'s, naming one leaf."""
    saved = _array_shapes(mngr.item_metadata(step).tree)
    wanted = _array_shapes(ocp.tree.serialize_tree(target, keep_empty_nodes=True))
    where = step_dir(mngr, step)
    # Parameters first: they name the layer whose size differs.
    for key in sorted(saved.keys() | wanted.keys(), key=lambda k: (k[0] != "params", k)):
        name = "/".join(map(str, key))
        if key not in saved:
            problem = f"{name} is in the config's state but not in the checkpoint"
        elif key not in wanted:
            problem = f"the checkpoint has {name}, which the config's state lacks"
        elif saved[key] != wanted[key]:
            problem = f"{name} has shape {saved[key]} there but {wanted[key]} from the config"
        else:
            continue
        raise ShapeMismatch(f"checkpoint {where} does not fit the config: {problem}")


def _restore_step(mngr: Manager, step: int, abstract_state):
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    try:
        _check_fits(mngr, step, target)
    except ShapeMismatch:
        raise
    except Exception as e:  # Unreadable metadata: the step is damaged.
        raise _Damaged(e) from e
    try:
        return mngr.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as e:  # Any failure to read arrays that fit is damage too.
        raise _Damaged(e) from e


def restore_newest(mngr: Manager, abstract_state) -> tuple[int, object] | None:
    """`(step, state)` of the newest checkpoint that restores, or None if there is none.

    Newer steps that fail to restore are named in a warning, remembered in `mngr.damaged_steps`
    (the next `save` moves them aside) and skipped. A checkpoint that does not fit the config
    raises ShapeMismatch instead: older ones would not fit either.
    """
    failures = []
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            state = _restore_step(mngr, step, abstract_state)
        except _Damaged as e:
            logging.warning(
                "checkpoint %s cannot be restored, it is damaged or incomplete (%s); "
                "falling back to an older one",
                step_dir(mngr, step),
                e,
            )
            mngr.damaged_steps.add(step)
            failures.append(f"{step}: {e}")
            continue
        if failures:
            logging.warning("restored step %d instead of the damaged newer step(s)", step)
        return step, state
    if failures:
        raise UserError(
            f"no checkpoint in {mngr.directory} can be restored ({'; '.join(failures)}); "
            "move the step directories aside to start over"
        )
    return None


def restore(mngr: Manager, abstract_state, step: int | None = None):
    """Restores `step`, or the newest checkpoint that restores when `step` is None."""
    if step is None:
        found = restore_newest(mngr, abstract_state)
        if found is None:
            raise UserError(f"No checkpoint in {mngr.directory}.")
        return found[1]
    if step not in mngr.all_steps():
        raise UserError(
            f"No checkpoint for step {step} in {mngr.directory}; "
            f"saved steps: {sorted(mngr.all_steps())}."
        )
    try:
        return _restore_step(mngr, step, abstract_state)
    except _Damaged as e:
        raise UserError(f"checkpoint {step_dir(mngr, step)} is damaged ({e})") from e
