"""Orbax checkpointing of the (unreplicated) run-stacked train state."""

import os

import jax
import orbax.checkpoint as ocp


def manager(directory: str, max_to_keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
    """Saves asynchronously; call `mngr.wait_until_finished()` before the process exits."""
    mngr.save(step, args=ocp.args.StandardSave(state))


def restore(mngr: ocp.CheckpointManager, abstract_state, step: int | None = None):
    """Restores `step` (the latest when None) into the structure of `abstract_state`."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"No checkpoint in {mngr.directory}.")
    if step not in mngr.all_steps():
        raise FileNotFoundError(
            f"No checkpoint for step {step} in {mngr.directory}; "
            f"saved steps: {sorted(mngr.all_steps())}."
        )
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    return mngr.restore(step, args=ocp.args.StandardRestore(target))
