"""The study engine: what the grokking comparison, the LM study and lm_merge share.

* `train_runs`: trains stacked runs (seeds, or seeds x experts) of any loss as one vmapped
  program, through the one training loop (`stages.train_stage` -> `chunks.train_in_chunks`):
  resumable mid-stage, batches drawn in the program with `fold_in(run key, step)`.
* `train_dam`: the one DAM trainer, `train_runs` with DAM's objective (`merging.dam.dam_loss`).
* `grid_search`: per run, the merge hyper-parameters that score best on held-out data, with the
  metric and its order as arguments; `searched_merges`, the grid search of every searched row.
* `output_ensemble`: the mean-logits and mean-probabilities ensembles of stacked experts.
* `methods` and `write_comparison`: the rows every study's table holds, in its order, and the
  files it writes; a study gives its models, metric and costs through a `Table`.
"""

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from fusion_jax import files, merging
from fusion_jax.evaluate import plots
from fusion_jax.experiments.stages import flops_of, stack, train_stage
from fusion_jax.merging import dam
from fusion_jax.train import chunks


def _shapes(tree, lead: int):
    """The leaves' shapes and dtypes without their `lead` leading axes (nothing allocated)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[lead:], x.dtype), tree)


def train_runs(tag, params, loss_fn, sample_fn, data, keys, num_steps, tx, *, chunk, progress,
               every_secs=0.0, every_steps=0, tokens_per_step=0, data_axes=(None,),
               save_at_end=False, select=None, frozen=None, hand_over=False, has_aux=False,
               constrain=None, shard=None, log=None, compiled_flops=True):  # fmt: skip
    """Trains `params` for `num_steps` steps of `tx`, one compiled chunk of `chunk` steps at a
    time. Returns (params, FLOPs of one run, curve).

    The leaves of `params` (and `keys`) have one leading run axis per entry of `data_axes`
    (outermost first; `()` for one run): None where every run reads the same `data`, 0 where
    the runs along that axis read their own rows of it (per-seed splits; each expert its own
    domain). `loss_fn(params, frozen, *batch) -> loss` (`(loss, aux)` with `has_aux`);
    `sample_fn(*data, key) -> batch`, with `fold_in(run key, step)`, so the result does not
    depend on the chunking. `constrain(batch)` (e.g. a
    sharding constraint over a mesh's data axis) is applied to every batch. `shard(tree) ->
    shardings` (e.g. `mesh.shardings` over a mesh) places the training state: it is put there
    before the first chunk and kept there by every chunk. `frozen` (leaves with
    the same run axes; None: nothing) is an argument of every step, never updated nor saved:
    models the training reads but does not change.

    `progress` is `Stages.progress` for this training (or any `state -> (manager, saved step
    and state or None)`): it resumes from there, and saves there every `every_secs` seconds or
    `every_steps` steps, when interrupted and, with `save_at_end`, once done. `log(metrics,
    done)` is called after every chunk with the chunk's last step's loss (and aux); the default
    progress line gives loss, tokens/s (`tokens_per_step` per run) and ETA.

    `select(params) -> [runs]` (held-out score, lower is better), when given, scores the runs
    before training and after every chunk; each run then returns its best parameters (its start
    included) and `curve` `[runs, chunks + 1]` holds the scores (None without `select`).

    The training state is donated to each chunk (new parameters and moments are written over
    the old); `params` is copied first unless `hand_over` (the caller no longer uses them).
    FLOPs are XLA's count of one step, compiled (`compiled_flops`) or as lowered.
    """
    frozen = {} if frozen is None else frozen
    grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)

    def one_step(params, opt_state, step, frozen, run_data, key):
        batch = sample_fn(*run_data, jax.random.fold_in(key, step))
        if constrain is not None:
            batch = constrain(batch)
        out, grads = grad_fn(params, frozen, *batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, out

    def one_run_chunk(state, frozen, run_data, key, n):
        def body(state, _):
            params, opt_state, step = state
            params, opt_state, out = one_step(params, opt_state, step, frozen, run_data, key)
            return (params, opt_state, step + 1), out

        return jax.lax.scan(body, state, None, length=n)

    fn, init = one_run_chunk, tx.init
    for axis in reversed(data_axes):  # the innermost run axis is vmapped first
        fn = jax.vmap(fn, in_axes=(0, 0, axis, 0, None))
        init = jax.vmap(init)
    lead_axes, data_lead = len(data_axes), sum(a is not None for a in data_axes)
    # The state is donated: each chunk writes the new parameters and moments over the old.
    if shard is not None:
        unsharded = fn

        def fn(state, frozen, run_data, key, n):  # the new state on the old one's shards
            state, out = unsharded(state, frozen, run_data, key, n)
            return jax.lax.with_sharding_constraint(state, shard(state)), out

    jitted, programs = jax.jit(fn, static_argnums=4, donate_argnums=0), {}

    def compiled(s, n):  # one program per chunk length, its memory plan logged
        if n not in programs:
            programs[n] = chunks.compile_reporting(tag, jitted, s, frozen, data, keys, static=(n,))
        return programs[n](s, frozen, data, keys)

    single = _shapes(params, lead_axes)
    step_flops = flops_of(
        lambda p, o, f, d: one_step(p, o, jnp.int32(0), f, d, jax.random.key(0)),
        single, jax.eval_shape(tx.init, single), _shapes(frozen, lead_axes),
        _shapes(data, data_lead), optimized=compiled_flops,
    )  # fmt: skip
    if not hand_over:  # donating the state must not invalidate the caller's arrays
        params = jax.tree.map(jnp.copy, params)
    state = (params, init(params), jnp.zeros(keys.shape, jnp.int32))
    if shard is not None:
        state = jax.device_put(state, shard(state))

    def step_of(s):
        return int(np.asarray((s["run"] if select is not None else s)[2]).flat[0])

    def selecting_chunk(s, n):
        run, out = compiled(s["run"], n)
        score = jnp.asarray(select(run[0]), jnp.float32)
        better = score < s["best_score"]

        def keep(best, new):
            return jnp.where(better.reshape(better.shape + (1,) * (new.ndim - better.ndim)), new,
                             best)  # fmt: skip

        point = -(-int(np.asarray(run[2]).flat[0]) // chunk)
        return {"run": run, "best": jax.tree.map(keep, s["best"], run[0]),
                "best_score": jnp.minimum(score, s["best_score"]),
                "curve": s["curve"].at[..., point].set(score)}, (out, score)  # fmt: skip

    if select is not None:
        first = jnp.asarray(select(params), jnp.float32)
        curve = jnp.full((*keys.shape, -(-num_steps // chunk) + 1), jnp.nan).at[..., 0].set(first)
        best = jax.tree.map(jnp.copy, params)  # the state's own params are donated
        state = {"run": state, "best": best, "best_score": first, "curve": curve}

    def report(metrics, done, rate, compile_secs):
        out, score = metrics if select is not None else (metrics, None)
        loss = out[0] if has_aux else out
        held_out = "" if score is None else f"  holdout bpb {float(jnp.mean(score)):.4f}"
        speed = (f"{rate * tokens_per_step * math.prod(keys.shape):.0f} tokens/s"
                 if tokens_per_step else f"{rate:.2f} steps/s")  # fmt: skip
        logging.info("%s step %d/%d  loss %.4f%s  %s  ETA %.0f s", tag, done, num_steps,
                     float(jnp.mean(loss[..., -1])), held_out, speed,
                     (num_steps - done) / rate)  # fmt: skip

    state = train_stage(
        tag, compiled if select is None else selecting_chunk, state,
        num_steps, chunk=chunk, progress=progress, every_secs=every_secs, every_steps=every_steps,
        step_of=step_of, report=report, save_at_end=save_at_end,
        **({} if log is None else {"log": lambda metrics, done: log(
            metrics[0] if select is not None else metrics, done)}),
    )  # fmt: skip
    if select is None:
        return state[0], step_flops * num_steps, None
    return state["best"], step_flops * num_steps, state["curve"]


def dam_objective(d, apply_fn, trainable=None, similarity="whole_model"):
    """DAM's loss `(coefficients, frozen, inputs [K, B, ...], mask [K, B, ...] or None) ->
    (loss, aux)` for `train_runs` (`has_aux=True`), the experts riding along as
    `frozen["experts"]`. The config section `d` may set temperature, similarity_weight,
    l1_weight, l2_weight, nonlinearity and `similarity` (the granularity, else the argument);
    the others take `dam.dam_loss`'s defaults, which are the DAM repository's."""
    fields = ("temperature", "similarity_weight", "l1_weight", "l2_weight", "nonlinearity")
    options = {f: d[f] for f in fields if f in d}
    options["similarity_granularity"] = d.similarity if "similarity" in d else similarity

    def loss_fn(coefficients, frozen, inputs, mask=None):
        return dam.dam_loss(coefficients, jax.lax.stop_gradient(frozen["experts"]), apply_fn,
                            inputs, mask_per_expert=mask, trainable=trainable,
                            **options)  # fmt: skip

    return loss_fn


def train_dam(tag, experts, d, apply_fn, sample_fn, data, keys, *, init=None, num_steps=None,
              data_axes=(None,), trainable=None, similarity="whole_model", **loop):  # fmt: skip
    """DAM coefficients for `experts` (leaves `[runs..., K, ...]`, a run axis per entry of
    `data_axes`, as in `train_runs`),
    trained with Adam at `d.learning_rate` for `num_steps` (default `d.num_steps`) on
    `sample_fn(*data, key) -> (inputs [K, B, ...], mask or nothing)`, expert k's batch first.
    `init`: the starting coefficient (`dam.initial_value`; None: 1/K). Returns `train_runs`'s
    (coefficients, FLOPs, curve); `trainable` and `similarity` go to `dam_objective`, `loop`
    to `train_runs` (chunk, progress, constrain, log, ...)."""

    def start(e):
        return dam.init_coefficients(e, init)

    for _ in data_axes:
        start = jax.vmap(start)
    return train_runs(
        tag, start(experts), dam_objective(d, apply_fn, trainable, similarity), sample_fn, data,
        keys, num_steps or d.num_steps, optax.adam(d.learning_rate), data_axes=data_axes,
        frozen={"experts": experts}, has_aux=True, hand_over=True, **loop,
    )  # fmt: skip


def sample_windows(tokens, mask, size, key, batch_size):
    """A batch of one table's windows (`tokens [N, L+1]`, `mask [N, L]`, true count `size`),
    drawn with replacement."""
    idx = jax.random.randint(key, (batch_size,), 0, size)
    return tokens[idx], mask[idx]


def sample_experts(tokens, mask, sizes, key, batch_size):
    """`[K, B, ...]`: expert k's batch from row k of padded tables `[K, N, ...]` (DAM's)."""
    one = functools.partial(sample_windows, batch_size=batch_size)
    return jax.vmap(one)(tokens, mask, sizes, jax.random.split(key, sizes.shape[0]))


def grid_search(points: list[dict], merge, evaluate, rank):
    """Per run, the grid point whose merge ranks first on held-out data (the first in grid order
    on a tie). `merge(hp) -> params [R, ...]` merges every run at `hp`; `evaluate(params) ->
    {metric: [R]}`; `rank(metrics) -> tuple of [R] arrays` compared in order, lower first.
    Returns (merged params `[R, ...]`, chosen point per run, the scores of every point)."""
    best, best_key, chosen, scored = None, None, None, []
    for hp in points:
        merged = merge(hp)
        metrics = evaluate(merged)
        key = [tuple(float(v[r]) for v in rank(metrics)) for r in range(len(next(iter(
            metrics.values()))))]  # fmt: skip
        scored.append({"hparams": hp, **{m: np.asarray(v).tolist() for m, v in metrics.items()}})
        if best is None:
            best, best_key, chosen = merged, key, [hp] * len(key)
            continue
        better = np.array([new < old for new, old in zip(key, best_key, strict=True)])
        for r in np.flatnonzero(better):
            best_key[r], chosen[r] = key[r], hp
        best = _where_runs(better, merged, best)
    return best, chosen, scored


def searched_merges(grid, names, merge_of, evaluate, rank):
    """Per row of `merging.ROWS` (both studies' searched merges): (label, merged params `[R,
    ...]`, chosen point per run, scores of every point), from `grid_search` over the row's grid
    from the config section `grid`. `merge_of(row, hp)` merges every run; a pairwise row's
    label names the first two experts of `names`, which it merges."""
    for row in merging.ROWS:
        label = row.label + (f" ({names[0]}, {names[1 % len(names)]})" if row.pairwise else "")
        merge = functools.partial(merge_of, row)
        yield (label, *grid_search(row.grid(grid), merge, evaluate, rank))


def _where_runs(pick, new, old):
    """Per run (`pick [R]` bools), `new`'s tree where true, else `old`'s."""
    return jax.tree.map(
        lambda a, b: jnp.where(pick.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old
    )


def merge_per_leaf(make, experts, base, runs: int):
    """`merge(hp)` for `grid_search` that merges each run a parameter at a time:
    `make(experts, base, hp, leaf)` merges trees holding one leaf (`leaf` its index), so the
    working memory is one tensor's K task vectors, not the whole model's."""
    leaves, treedef = jax.tree.flatten(experts)
    base_leaves = treedef.flatten_up_to(base)

    def merge(hp):
        return stack([
            treedef.unflatten([
                make({"w": e[r]}, {"w": b[r]}, hp, i)["w"]
                for i, (e, b) in enumerate(zip(leaves, base_leaves, strict=True))
            ])
            for r in range(runs)
        ])  # fmt: skip

    return merge


def output_ensemble(apply, mode: str):
    """`(stacked experts [K, ...], inputs) -> logits`: the mean of the experts' logits
    (`mode` "logits") or the log of the mean of their probabilities ("probs")."""

    def fn(stacked, inputs):
        logits = jax.vmap(apply, in_axes=(0, None))(stacked, inputs)
        if mode == "logits":
            return jnp.mean(logits, 0)
        return jnp.log(jnp.mean(jax.nn.softmax(logits, -1), 0))

    return fn


@dataclasses.dataclass
class Method:
    """One row: `logits_fn(params, inputs)` of every seed's `params` (leaves `[R, ...]`)."""

    label: str
    logits_fn: Callable
    params: Any
    train_flops: float
    # Params carry an expert axis `[R, K, ...]`: each task or domain is read by its own expert.
    per_task: bool = False
    # Per seed, the hyper-parameters chosen on the held-out data (searched methods only).
    hparams: list | None = None


@dataclasses.dataclass
class Table:
    """What a study gives `methods`: its trained stages (seeds first) and how to use them.

    `cost(kind) -> FLOPs` is the training cost a row reports, for kind "base", "ensemble",
    "merge", "fusion_frozen" and "fusion_e2e" (each study keeps its own convention).
    `holdout(merged [R, ...]) -> {metric: [R]}` and `rank(metrics)` drive the grid search (see
    `grid_search`); `merge(row, hp) -> [R, ...]` merges every seed's experts with `merging.ROWS`'
    `row`. `controls` and `averages` are the study's own rows, after the oracle and after the
    weight average; `dam` the DAM rows, `fusion` the fused models' logits function.
    """

    apply: Callable
    ensemble: Callable  # mode ("logits" or "probs") -> logits function of stacked experts
    base: Any
    experts: Any
    names: list  # the experts'
    base_label: str
    oracle: Method
    cost: Callable
    grid: Any
    merge: Callable
    holdout: Callable
    rank: Callable
    dam: list  # [Method]
    fusion: Callable
    fusion_frozen: Any
    fusion_e2e: Any
    controls: list = dataclasses.field(default_factory=list)
    averages: list = dataclasses.field(default_factory=list)


def methods(t: Table, searches: dict) -> Iterator[Method]:
    """The rows of a study's table, in order: the base, the oracle, the study's controls, the
    output ensembles, the weight average and the study's other averages, every searched merge of
    `merging.ROWS` (its grid search stored in `searches[label]`), DAM, dynamic fusion with frozen
    experts and end to end. A generator: a caller that scores a row and lets it go holds one
    merged model at a time."""
    yield Method(t.base_label, t.apply, t.base, t.cost("base"))
    yield t.oracle
    yield from t.controls
    for mode in ("logits", "probs"):
        yield Method(f"output ensemble (mean {mode})", t.ensemble(mode), t.experts,
                     t.cost("ensemble"))  # fmt: skip
    yield Method("weight average", t.apply, weight_average(t.experts), t.cost("merge"))
    yield from t.averages
    for label, merged, chosen, scored in searched_merges(t.grid, t.names, t.merge, t.holdout,
                                                         t.rank):  # fmt: skip
        searches[label] = {"chosen": chosen, "grid": scored}
        yield Method(label, t.apply, merged, t.cost("merge"), hparams=chosen)
    yield from t.dam
    yield Method("dynamic fusion, frozen experts", t.fusion, t.fusion_frozen,
                 t.cost("fusion_frozen"))  # fmt: skip
    yield Method("dynamic fusion, end to end", t.fusion, t.fusion_e2e, t.cost("fusion_e2e"))


weight_average = jax.jit(jax.vmap(merging.weight_average))


def write_comparison(workdir: str, out: dict, markdown: str, frontier: list, **labels) -> None:
    """A study's `comparison.json` (`out`), `comparison.md` and `frontier.png` (`frontier`:
    (method, inference FLOPs, per-seed metric) per row; `labels` the plot's xlabel, ylabel,
    title)."""
    files.write_json(os.path.join(workdir, "comparison.json"), out)
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
        f.write(markdown)
    plots.plot_frontier(frontier, os.path.join(workdir, "frontier.png"), **labels)
