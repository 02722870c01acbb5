"""Per-seed train/validation splits and device-side batch sampling.

The tables are small (at most 14,400 examples), so every split lives on the device and batches
are drawn there with `jax.random` inside the compiled training loop: no host input pipeline.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fusion_jax.data import tasks as tasks_lib
from fusion_jax.errors import UserError

# Name of the pmap (device) axis used by every data-parallel program.
AXIS = "data"


@struct.dataclass
class Split:
    """One split of a task table: `inputs` int32 `[N, 4]`, `labels` int32 `[N]`."""

    inputs: jax.Array
    labels: jax.Array

    def __len__(self) -> int:
        return self.labels.shape[-1]


@struct.dataclass
class TaskData:
    train: Split
    val: Split


@functools.cache
def load_table(task_name: str, source: str, data_dir: str, size: int | None = None):
    """The task's full table in canonical pair order, from TFDS or computed directly."""
    if source == "tfds":
        from fusion_jax.data import tfds_builder  # TFDS is only imported when asked for.

        return tfds_builder.load_table(task_name, os.path.expanduser(data_dir), size)
    if source == "algebra":
        return tasks_lib.get_task(task_name, size).table()
    raise UserError(f"config.data.source must be 'tfds' or 'algebra', got {source!r}.")


def split_indices(num_pairs: int, frac_train: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffles all pair indices with `seed`; the first `int(frac_train * N)` are train."""
    if not 0.0 < frac_train < 1.0:
        raise UserError(f"config.data.frac_train must be in (0, 1), got {frac_train}.")
    perm = np.random.default_rng(seed).permutation(num_pairs)
    num_train = int(num_pairs * frac_train)
    return perm[:num_train], perm[num_train:]


def make_task_data(inputs: np.ndarray, labels: np.ndarray, frac_train: float, seeds) -> TaskData:
    """Stacks one split per run seed: leaves get a leading run axis `[R, ...]` (host numpy)."""
    splits = [split_indices(len(labels), frac_train, s) for s in seeds]
    train = Split(
        np.stack([inputs[t] for t, _ in splits]), np.stack([labels[t] for t, _ in splits])
    )
    val = Split(np.stack([inputs[v] for _, v in splits]), np.stack([labels[v] for _, v in splits]))
    return TaskData(train=train, val=val)


def sample_batch(split: Split, key: jax.Array, batch_size: int) -> Split:
    """Draws `batch_size` examples uniformly with replacement (the reference's sampler)."""
    idx = jax.random.randint(key, (batch_size,), 0, len(split))
    return Split(split.inputs[idx], split.labels[idx])


def device_slice(batch: Split, axis_name: str | None, num_devices: int) -> Split:
    """This device's contiguous share of a batch drawn identically on every device.

    Drawing the full batch everywhere and slicing it makes a run on D devices see exactly the
    batches of a one-device run, so the two agree up to float rounding.
    """
    if axis_name is None or num_devices == 1:
        return batch
    per_device = len(batch) // num_devices
    start = jax.lax.axis_index(axis_name) * per_device
    return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, per_device), batch)


def shard_for_eval(split: Split, num_devices: int) -> tuple[Split, np.ndarray]:
    """Pads a host split `[R, N, ...]` to a multiple of the device count and shards it.

    Returns leaves `[D, R, ceil(N/D), ...]` and a float mask `[D, ceil(N/D)]` (1 = real
    example), so an exact validation pass can be spread over devices and `psum`-ed.
    """
    n = len(split)
    per_device = -(-n // num_devices)
    pad = per_device * num_devices - n

    def shard(x):
        x = np.concatenate([x, np.zeros(x.shape[:1] + (pad,) + x.shape[2:], x.dtype)], axis=1)
        x = x.reshape(x.shape[:1] + (num_devices, per_device) + x.shape[2:])
        return np.moveaxis(x, 1, 0)

    mask = (np.arange(per_device * num_devices) < n).astype(np.float32)
    return jax.tree.map(shard, split), mask.reshape(num_devices, per_device)


def replicate(tree, num_devices: int):
    """Host arrays -> device-resident copies with a leading device axis `[D, ...]`."""
    return to_devices(jax.tree.map(lambda x: jnp.broadcast_to(x, (num_devices,) + x.shape), tree))


def to_devices(tree):
    """Places host leaves `[D, ...]` on the devices in the layout `jax.pmap` expects.

    Passing host arrays to a pmapped function copies them on every call; arrays produced by a
    pmapped identity stay resident. (jax.device_put_sharded is deprecated since JAX 0.8.1, and a
    NamedSharding over a user mesh is rejected by the shard_map-based pmap of JAX 0.10.)
    """
    return _identity(tree)


# Same axis name as the training program, so its outputs and these inputs share one layout
# (otherwise the second call of a program recompiles for the new input sharding).
_identity = jax.pmap(lambda tree: tree, axis_name=AXIS)
