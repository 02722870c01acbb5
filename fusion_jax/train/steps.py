"""Pure, per-run training and evaluation steps, and the compiled multi-step program.

Every function here describes ONE run on ONE device. `make_chunk_fn` lifts it with `jax.vmap`
over runs (seeds) and `jax.pmap` over devices (axis `'data'`), and fuses many steps into one
`lax.scan`, so the host only syncs between chunks.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fusion_jax.data import pipeline
from fusion_jax.models.numerics import FLOAT32, Numerics

AXIS = pipeline.AXIS
# Stream ids folded into a run's key: per-step batch sampling, sampled evaluation, init.
TRAIN_STREAM, EVAL_STREAM, INIT_STREAM = 0, 1, 2


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: updates applied so far.
    params: Any
    opt_state: Any


@struct.dataclass
class StepConfig:
    """Static settings of the compiled program."""

    batch_size: int = struct.field(pytree_node=False)
    eval_every: int = struct.field(pytree_node=False)
    eval_mode: str = struct.field(pytree_node=False)  # "exact" or "sampled"
    eval_batches: int = struct.field(pytree_node=False)
    eval_batch_size: int = struct.field(pytree_node=False)
    num_devices: int = struct.field(pytree_node=False)


ApplyFn = Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]


def model_apply_fn(model, numerics: Numerics = FLOAT32) -> ApplyFn:
    """`(params, tokens [B, L]) -> (logits [B, C], aux_loss scalar)`, computed with `numerics`
    (matmul precision, compute dtype; float32 out).

    Models add regularisers (e.g. the fusion gate's balance loss) with
    `self.sow("aux_loss", name, value)`; plain models sow nothing.
    """

    def apply(params, tokens):
        logits, extra = numerics.apply(model, params, tokens, mutable=["aux_loss"])
        aux = sum((jnp.sum(x) for x in jax.tree.leaves(extra)), jnp.zeros((), jnp.float32))
        return logits, aux

    return apply


def init_state(model, tx, rng, example_tokens) -> TrainState:
    params = model.init(rng, example_tokens)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def cross_entropy(logits, labels):
    """Per-example cross-entropy `[B]`."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _pmean(tree, axis_name):
    return jax.lax.pmean(tree, axis_name) if axis_name else tree


def train_step(state: TrainState, data: pipeline.Split, run_key, *, apply_fn, tx, cfg, axis_name):
    """One AdamW update on a batch drawn on-device with key fold_in(run_key, step)."""
    key = jax.random.fold_in(jax.random.fold_in(run_key, TRAIN_STREAM), state.step)
    batch = pipeline.sample_batch(data, key, cfg.batch_size)
    batch = pipeline.device_slice(batch, axis_name, cfg.num_devices)

    def loss_fn(params):
        logits, aux = apply_fn(params, batch.inputs)
        ce = jnp.mean(cross_entropy(logits, batch.labels))
        acc = jnp.mean(jnp.argmax(logits, -1) == batch.labels)
        return ce + aux, {"loss": ce, "acc": acc}

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    # Equal per-device shares, so the mean of device means is the full-batch mean.
    grads, metrics = _pmean((grads, metrics), axis_name)
    metrics["grad_norm"] = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def train_steps(state, data, run_key, num_steps, *, apply_fn, tx, cfg, axis_name):
    """`num_steps` train steps fused in one `lax.scan`; metrics get a leading `[num_steps]` axis."""
    step_fn = functools.partial(train_step, apply_fn=apply_fn, tx=tx, cfg=cfg, axis_name=axis_name)
    return jax.lax.scan(lambda s, _: step_fn(s, data, run_key), state, None, length=num_steps)


def _sums(apply_fn, params, tokens, labels, weights):
    logits, _ = apply_fn(params, tokens)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.stack([jnp.sum(weights * cross_entropy(logits, labels)), jnp.sum(weights * correct)])


def evaluate_exact(params, val_shard: pipeline.Split, mask, *, apply_fn, axis_name):
    """Loss and accuracy over this device's share of the whole validation split (psum-ed)."""
    sums = _sums(apply_fn, params, val_shard.inputs, val_shard.labels, mask)
    count = jnp.sum(mask)
    if axis_name:
        sums, count = jax.lax.psum((sums, count), axis_name)
    return {"loss": sums[0] / count, "acc": sums[1] / count}


def evaluate_sampled(params, val: pipeline.Split, key, *, apply_fn, cfg, axis_name):
    """The reference's validation: `eval_batches` batches drawn with replacement."""

    def one(carry, k):
        batch = pipeline.sample_batch(val, k, cfg.eval_batch_size)
        batch = pipeline.device_slice(batch, axis_name, cfg.num_devices)
        ones = jnp.ones(batch.labels.shape, jnp.float32)
        return carry + _sums(apply_fn, params, batch.inputs, batch.labels, ones), None

    sums, _ = jax.lax.scan(one, jnp.zeros(2), jax.random.split(key, cfg.eval_batches))
    if axis_name:
        sums = jax.lax.psum(sums, axis_name)
    total = cfg.eval_batches * cfg.eval_batch_size
    return {"loss": sums[0] / total, "acc": sums[1] / total}


def run_chunk(state, data, run_key, *, apply_fn, tx, cfg, axis_name, num_intervals):
    """`num_intervals` x (`eval_every` train steps, then one validation pass), for one run.

    `data` holds `train`, `val` (the split, for sampled evaluation), `val_shard` and `val_mask`
    (this device's share of the padded split, for the exact pass).

    Returns the final state and metrics `[num_intervals]` per key: train loss/acc averaged over the
    interval's batches (measured before each update, as the reference logs them), validation
    loss/acc after the interval, and the last step's gradient norm.
    """

    def interval(state, _):
        state, m = train_steps(
            state,
            data["train"],
            run_key,
            cfg.eval_every,
            apply_fn=apply_fn,
            tx=tx,
            cfg=cfg,
            axis_name=axis_name,
        )
        if cfg.eval_mode == "exact":
            val = evaluate_exact(
                state.params,
                data["val_shard"],
                data["val_mask"],
                apply_fn=apply_fn,
                axis_name=axis_name,
            )
        else:
            key = jax.random.fold_in(jax.random.fold_in(run_key, EVAL_STREAM), state.step)
            val = evaluate_sampled(
                state.params, data["val"], key, apply_fn=apply_fn, cfg=cfg, axis_name=axis_name
            )
        out = {
            "train_loss": jnp.mean(m["loss"]),
            "train_acc": jnp.mean(m["acc"]),
            "grad_norm": m["grad_norm"][-1],
            "val_loss": val["loss"],
            "val_acc": val["acc"],
        }
        return state, out

    return jax.lax.scan(interval, state, None, length=num_intervals)


def make_chunk_fn(apply_fn, tx, cfg: StepConfig, num_intervals: int):
    """The compiled program: vmap over runs inside pmap over devices.

    Inputs carry a leading device axis then a run axis: state `[D, R, ...]`, data `[D, R, ...]`
    (the exact-eval mask is `[D, N/D]`, shared by runs), run keys `[D, R]`.
    """
    fn = functools.partial(
        run_chunk, apply_fn=apply_fn, tx=tx, cfg=cfg, axis_name=AXIS, num_intervals=num_intervals
    )
    data_axes = {"train": 0, "val": 0, "val_shard": 0, "val_mask": None}
    return jax.pmap(jax.vmap(fn, in_axes=(0, data_axes, 0)), axis_name=AXIS, donate_argnums=(0,))
