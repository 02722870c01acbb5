"""Static merging and DAM against dynamic fusion on multi-task experts from a shared base.

    python main.py --config=configs/compare.py:quick --workdir=runs/compare_quick

Seeds: run r uses seed `config.seed + r`, which sets its split, held-out slice, inits and batches
(as in the training loop). Every training stage trains all seeds as one vmapped program of the
training loop's pure step (`steps.train_steps`); DAM's coefficients are vmapped over seeds too.

Stages, each saved per seed at `<workdir>/stages/<name>/seed_<s>` (experiments/stages.py): a
rerun restores the seeds that finished and trains only the others, so raising `num_seeds` trains
only the new seeds:
  base (the mixture of tasks) -> experts (one per task, fine-tuned from base) -> random_experts
  (same tasks, own random inits: the control row) -> dam (coefficients) -> fusion_frozen,
  fusion_e2e.
Then the output ensembles and static merges are built per seed (merge hyper-parameters chosen
per seed on the held-out slice), every method is evaluated on each task's validation split, and
`comparison.{md,json}` (mean ± standard error over seeds; per-seed values and choices in the
JSON), `frontier.png` (with error bars) and `dam_coefficients.png` are written. One device.
"""

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from fusion_jax import merging, models
from fusion_jax import workdir as workdir_lib
from fusion_jax.data import multitask, pipeline
from fusion_jax.data import tasks as tasks_lib
from fusion_jax.evaluate import analysis, plots, results
from fusion_jax.evaluate.comparisons import mean_se, merge_markdown
from fusion_jax.experiments import engine
from fusion_jax.experiments.stages import Stages, flops_of, stack, take, train_stage
from fusion_jax.models import fusion
from fusion_jax.models.numerics import Numerics
from fusion_jax.models.transformer import Transformer
from fusion_jax.specs.merge_compare import SPEC
from fusion_jax.train import steps
from fusion_jax.train.optimizer import make_optimizer

# Streams folded into a seed's key `jax.random.key(seed)`: each stage's batches (expert i: EXPERTS
# + i), the fusion model's init and DARE's drops. Inits use the training loop's INIT_STREAM.
BASE, EXPERTS, DAM, FUSION_INIT, FUSION, DARE = 100, 200, 300, 400, 500, 600
METRICS = ("acc", "loss")


def strip_head(params):
    return {k: v for k, v in params.items() if k != "head"}


def sample_per_task(tables: pipeline.Split, sizes, key, batch_size: int) -> pipeline.Split:
    """One batch per task from padded tables `[K, N_max, ...]` with true sizes `[K]`."""
    u = jax.random.uniform(key, (sizes.shape[0], batch_size))
    idx = jnp.floor(u * sizes[:, None]).astype(jnp.int32)
    take_rows = jax.vmap(lambda x, i: x[i])
    return pipeline.Split(take_rows(tables.inputs, idx), take_rows(tables.labels, idx))


def _stack_splits(splits: list[pipeline.Split]) -> pipeline.Split:
    """Host splits of equal size, one per seed -> leaves `[R, N, ...]`."""
    inputs, labels = (np.stack([getattr(s, f) for s in splits]) for f in ("inputs", "labels"))
    return pipeline.Split(inputs, labels)


def _pad_rows(x, n: int):
    """`x [R, N, ...]` padded with zeros to `[R, n, ...]`."""
    return np.concatenate([x, np.zeros((x.shape[0], n - x.shape[1]) + x.shape[2:], x.dtype)], 1)


def _one_seed(abstract):
    """Shapes `[1, ...]` -> `[...]`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), abstract)


def _streams(keys, stream: int):
    return jax.vmap(lambda k: jax.random.fold_in(k, stream))(keys)


@dataclasses.dataclass
class Kit:
    """The models, apply functions, optimisers and compiled programs of one config, its seeds
    aside. `kit_for` keeps them per process, so a rerun in the same process (a test, a notebook,
    more seeds) reuses every compiled program instead of compiling it again."""

    model: Any
    apply: Callable  # (params, tokens) -> logits
    apply_aux: steps.ApplyFn  # the training loop's (params, tokens) -> (logits, aux loss)
    fusion_model: Any
    fusion_apply: Callable
    fusion_apply_aux: steps.ApplyFn
    mean_logits: Callable  # output ensembles: (stacked experts, tokens) -> logits
    mean_probs: Callable
    tx: optax.GradientTransformation
    tx_frozen: optax.GradientTransformation  # no updates for the fusion model's experts
    programs: dict = dataclasses.field(default_factory=dict)
    step_flops: dict = dataclasses.field(default_factory=dict)
    stats: dict = dataclasses.field(default_factory=dict)


_KITS: dict[str, Kit] = {}


def kit_for(config, mt: multitask.MultiTask) -> Kit:
    key = {k: v for k, v in config.to_dict().items() if k not in ("seed", "num_seeds", "name")}
    key["train"] = {k: v for k, v in key["train"].items() if k != "checkpoint_every_secs"}
    key = json.dumps(key, sort_keys=True, default=str)
    if key in _KITS:
        return _KITS[key]
    numerics = Numerics.of(config.model)
    expert_cfg = models.transformer_config(config.model, mt)  # MultiTask has the sizes
    model = Transformer(expert_cfg)
    apply = functools.partial(numerics.apply, model)
    f = config.fusion
    fusion_model = fusion.FusionTransformer(
        fusion.FusionConfig(expert=expert_cfg, num_experts=len(mt.names), gate_dim=f.gate_dim,
                            balance_weight=f.balance_weight)
    )  # fmt: skip

    _KITS[key] = Kit(
        model=model, apply=apply, apply_aux=steps.model_apply_fn(model, numerics),
        fusion_model=fusion_model, fusion_apply=functools.partial(numerics.apply, fusion_model),
        fusion_apply_aux=steps.model_apply_fn(fusion_model, numerics),
        mean_logits=engine.output_ensemble(apply, "logits"),
        mean_probs=engine.output_ensemble(apply, "probs"), tx=make_optimizer(config.opt),
        tx_frozen=make_optimizer(config.opt, ("ensemble",)),
    )  # fmt: skip
    return _KITS[key]


class Pipeline:
    """Data, stages and (through its `kit`) models and compiled programs of one workdir.

    Host data carry a leading seed axis: per task, `train` (minus the held-out slice), `holdout`
    and `val` splits with leaves `[R, N, ...]` (split sizes do not depend on the seed).
    """

    def __init__(self, config, workdir: str):
        self.config = config
        self.names = tuple(tasks_lib.parse_task_names(config.tasks))
        self.k = len(self.names)
        mt = multitask.MultiTask(self.names, config.data.p)
        self.seeds = [config.seed + r for r in range(config.num_seeds)]
        self.keys = jax.vmap(jax.random.key)(jnp.asarray(self.seeds))
        d = config.data
        per_seed = [multitask.splits(mt, s, d.frac_train, d.holdout_frac) for s in self.seeds]
        self.splits = {
            name: [_stack_splits([getattr(p[i], name) for p in per_seed]) for i in range(self.k)]
            for name in ("train", "holdout", "val")
        }
        self.mixture = _stack_splits([multitask.mixture([p.train for p in ps]) for ps in per_seed])
        self.example = jnp.asarray(self.splits["val"][0].inputs[0, :2])
        self.stages = Stages(workdir)
        self.kit = kit_for(config, mt)

    # -- building blocks -----------------------------------------------------------------------

    def init_params(self, keys, index: int = 0):
        """Fresh models `[M, ...]` of seeds with `keys [M]`: index 0 the base (initialised as the
        training loop does), 1 + i task i's random expert."""
        keys = _streams(keys, steps.INIT_STREAM)
        keys = keys if index == 0 else _streams(keys, index)
        if "init" not in self.kit.programs:
            model = self.kit.model
            init = lambda key, x: model.init(key, x)["params"]  # noqa: E731
            self.kit.programs["init"] = jax.jit(jax.vmap(init, in_axes=(0, None)))
        return self.kit.programs["init"](keys, self.example)

    def train(self, stage: str, part, todo, apply_aux, tx, params, data: pipeline.Split,
              keys, num_steps: int):  # fmt: skip
        """Trains the seeds at positions `todo` (params, host data `[M, N, ...]`, keys `[M]`)
        for `part` of `stage` with the training loop's pure step, all M as one vmapped program,
        one compiled chunk of `config.train.log_every` steps at a time. Returns (params
        `[M, ...]`, FLOPs of one run).

        Progress is saved after a chunk once `config.train.checkpoint_every_secs` have passed
        (0: never), when the part ends and when the run is interrupted (Ctrl-C, or SIGTERM
        through main.py), and a rerun resumes from it: batches are drawn with
        fold_in(key, step) and chunks end at the same steps, so it trains to the same bits.
        """
        tag = f"{stage} {part}" if part else stage
        bs = self.config.train.batch_size
        cfg = steps.StepConfig(bs, 1, "exact", 1, bs, 1)
        if (apply_aux, tx) not in self.kit.programs:

            def chunk(state, data, keys, n):
                one = functools.partial(steps.train_steps, num_steps=n, apply_fn=apply_aux, tx=tx,
                                        cfg=cfg, axis_name=None)  # fmt: skip
                return jax.vmap(one)(state, data, keys)

            self.kit.programs[apply_aux, tx] = jax.jit(chunk, static_argnums=3)
        program = self.kit.programs[apply_aux, tx]
        data = jax.tree.map(jnp.asarray, data)
        zero = jnp.zeros((), jnp.int32)
        state = jax.vmap(lambda p: steps.TrainState(zero, p, tx.init(p)))(params)
        if (apply_aux, tx) not in self.kit.step_flops:  # the same for every stage of this program
            one_state, one_data = take(state, 0), take(data, 0)
            self.kit.step_flops[apply_aux, tx] = flops_of(
                lambda s: steps.train_step(s, one_data, keys[0], apply_fn=apply_aux, tx=tx, cfg=cfg,
                                           axis_name=None), one_state, optimized=False,
            )  # fmt: skip
        state = train_stage(
            f"[compare] {tag}", lambda s, n: program(s, data, keys, n), state, num_steps,
            chunk=self.config.train.log_every,
            progress=functools.partial(self.stages.progress, stage, part,
                                       [self.seeds[i] for i in todo]),
            every_secs=self.config.train.checkpoint_every_secs,
            step_of=lambda s: int(np.asarray(s.step)[0]),
            report=lambda metrics, done, rate, _: self._log(tag, metrics, done, num_steps, rate),
        )  # fmt: skip
        return state.params, self.kit.step_flops[apply_aux, tx] * num_steps

    @staticmethod
    def _log(tag, metrics, done: int, num_steps: int, rate: float) -> None:
        loss = np.asarray(metrics["loss"])
        logging.info(
            "[compare] %s step %d/%d  train_loss %.4f  train_acc %.4f  (mean of %d seeds)  "
            "%.1f steps/s  ETA %.0fs", tag, done, num_steps,
            float(loss[:, -1].mean()), float(np.mean(metrics["acc"])), loss.shape[0], rate,
            (num_steps - done) / rate,
        )  # fmt: skip

    @functools.cached_property
    def _chunks(self) -> dict:
        """Per split and task, (inputs `[R, C, B, 4]`, labels `[R, C, B]`, mask `[C, B]`): the
        split in chunks of `config.eval.batch_size`, padded (mask 1 = a real example)."""
        b = self.config.eval.batch_size
        out = {}
        for split, parts in self.splits.items():
            out[split] = []
            for part in parts:
                n, r = len(part), part.labels.shape[0]
                c = -(-n // b)
                out[split].append((
                    jnp.asarray(_pad_rows(part.inputs, c * b).reshape(r, c, b, -1)),
                    jnp.asarray(_pad_rows(part.labels, c * b).reshape(r, c, b)),
                    jnp.asarray((np.arange(c * b) < n).astype(np.float32).reshape(c, b)),
                ))  # fmt: skip
        return out

    def evaluate(self, logits_fn, params, split: str, per_task: bool = False) -> dict:
        """Exact loss and accuracy `[R, K]` of every seed's model on each task's `split`.

        One compiled program per `logits_fn` evaluates a chunk of every seed (vmapped), so
        splits of any size and the oracle's per-task experts share it.
        """
        if ("eval", logits_fn) not in self.kit.programs:

            def chunk_sums(p, x, y, m):
                logits = logits_fn(p, x)
                correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
                ce = steps.cross_entropy(logits, y)
                return jnp.stack([jnp.sum(m * correct), jnp.sum(m * ce)])

            self.kit.programs["eval", logits_fn] = jax.jit(
                jax.vmap(chunk_sums, in_axes=(0, 0, 0, None))
            )
        fn = self.kit.programs["eval", logits_fn]
        sums = []
        for i, (inputs, labels, mask) in enumerate(self._chunks[split]):
            p = take(params, (slice(None), i)) if per_task else params
            total = sum(fn(p, inputs[:, c], labels[:, c], mask[c]) for c in range(mask.shape[0]))
            sums.append(np.asarray(total) / float(mask.sum()))  # [R, 2]
        sums = np.stack(sums, 1)  # [R, K, 2]
        return {m: sums[..., j] for j, m in enumerate(METRICS)}

    def compute_stats(self, logits_fn, params) -> dict:
        """Parameters, forward FLOPs per example and examples/s of seed 0's model (measured once
        per kind of model: methods of one kind have the same shapes)."""
        if logits_fn not in self.kit.stats:
            tokens = jnp.asarray(self.mixture.inputs[0, : self.config.train.batch_size])
            self.kit.stats[logits_fn] = analysis.compute_stats(
                lambda p, x: (logits_fn(p, x), 0.0), take(params, 0), tokens
            )
        return self.kit.stats[logits_fn]


# -- stages ------------------------------------------------------------------------------------


def train_base(p: Pipeline):
    """The shared base model on the mixture of every task's training data: `[R, ...]`."""

    def run(todo):
        keys = p.keys[np.asarray(todo)]
        params = p.init_params(keys)
        return p.train("base", None, todo, p.kit.apply_aux, p.kit.tx, params,
                       take(p.mixture, todo), _streams(keys, BASE),
                       p.config.base.num_steps)  # fmt: skip

    abstract = _one_seed(jax.eval_shape(p.init_params, p.keys[:1]))
    return p.stages.run_seeds("base", p.seeds, run, abstract)


def train_experts(p: Pipeline, base=None):
    """One expert per task `[R, K, ...]`: fine-tuned from `base`, or (None) from its own random
    init (the control). Both see the same batches."""
    name = "experts" if base is not None else "random_experts"

    def run(todo):
        keys = p.keys[np.asarray(todo)]
        trained, flops = [], 0.0
        for i, task in enumerate(p.names):
            if base is not None:
                start = take(base, todo)
            else:
                start = p.init_params(keys, 1 + i)
            params, f = p.train(name, task, todo, p.kit.apply_aux, p.kit.tx, start,
                                take(p.splits["train"][i], todo), _streams(keys, EXPERTS + i),
                                p.config.experts.num_steps)  # fmt: skip
            trained.append(params)
            flops += f
        return jax.tree.map(lambda *xs: jnp.stack(xs, 1), *trained), flops

    one = _one_seed(jax.eval_shape(p.init_params, p.keys[:1]))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct((p.k,) + x.shape, x.dtype), one)
    return p.stages.run_seeds(name, p.seeds, run, abstract)


def train_dam(p: Pipeline, experts):
    """DAM coefficients `[R, ...]`: trained per seed to match each expert on its task's data,
    through the one DAM trainer (resumable mid-stage)."""
    d = p.config.dam
    sizes = [len(s) for s in p.splits["train"]]
    tables = pipeline.Split(
        np.stack([_pad_rows(s.inputs, max(sizes)) for s in p.splits["train"]], 1),
        np.stack([_pad_rows(s.labels, max(sizes)) for s in p.splits["train"]], 1),
    )  # [R, K, N_max, ...]

    def sample(tables, sizes, key):  # `[K, B, 4]`: task k's inputs for expert k
        return (sample_per_task(tables, sizes, key, d.batch_size).inputs,)

    def run(todo):
        runs = len(todo)
        sizes_r = jnp.broadcast_to(jnp.asarray(sizes, jnp.float32), (runs, len(sizes)))
        coeffs, flops, _ = engine.train_dam(
            "[compare] dam", take(experts, todo), d, p.kit.apply, sample,
            (jax.tree.map(jnp.asarray, take(tables, todo)), sizes_r),
            _streams(p.keys[np.asarray(todo)], DAM), data_axes=(0,),
            chunk=p.config.train.log_every, every_secs=p.config.train.checkpoint_every_secs,
            progress=functools.partial(p.stages.progress, "dam", None,
                                       [p.seeds[i] for i in todo]),
            compiled_flops=False,
        )  # fmt: skip
        return coeffs, flops

    abstract = jax.eval_shape(merging.init_coefficients, take(experts, 0))
    return p.stages.run_seeds("dam", p.seeds, run, abstract)


def train_fusion(p: Pipeline, experts, frozen: bool):
    """Gated fusion over each seed's experts (their heads dropped; the fusion model starts from
    their mean head), trained on the mixture: gate and head only (`frozen`) or end to end."""
    name = "fusion_frozen" if frozen else "fusion_e2e"
    if "fusion_init" not in p.kit.programs:
        fusion_model = p.kit.fusion_model

        def init(key, experts_r, example):
            key = jax.random.fold_in(key, FUSION_INIT)
            params = fusion_model.init(key, example)["params"]
            params["ensemble"]["experts"] = strip_head(experts_r)
            params["head"] = jax.tree.map(lambda x: jnp.mean(x, 0), experts_r["head"])
            return params

        p.kit.programs["fusion_init"] = jax.jit(jax.vmap(init, in_axes=(0, 0, None)))
    init = p.kit.programs["fusion_init"]

    def run(todo):
        keys = p.keys[np.asarray(todo)]
        params = init(keys, take(experts, todo), p.example)
        tx = p.kit.tx_frozen if frozen else p.kit.tx
        return p.train(name, None, todo, p.kit.fusion_apply_aux, tx, params,
                       take(p.mixture, todo), _streams(keys, FUSION),
                       p.config.fusion.num_steps)  # fmt: skip

    abstract = _one_seed(jax.eval_shape(init, p.keys[:1], take(experts, [0]), p.example))
    return p.stages.run_seeds(name, p.seeds, run, abstract)


# -- methods ----------------------------------------------------------------------------------


def _holdout_scores(p: Pipeline, merged) -> dict:
    """Mean held-out accuracy and loss over tasks `[R]` of every seed's merged model; the grid
    search picks the best accuracy, then loss (validation is not used)."""
    m = p.evaluate(p.kit.apply, merged, "holdout")
    return {"holdout_acc": m["acc"].mean(1), "holdout_loss": m["loss"].mean(1)}


def score(p: Pipeline, method: engine.Method) -> dict:
    """The method's row: every metric as a mean over seeds with its standard error, the
    per-seed values (`per_seed`), and the model's size and cost."""
    val = p.evaluate(method.logits_fn, method.params, "val", method.per_task)
    fit = p.evaluate(method.logits_fn, method.params, "train", method.per_task)
    per_seed = {}
    for i, name in enumerate(p.names):
        for m in METRICS:
            per_seed[f"{name}_{m}"] = val[m][:, i]
    per_seed["mean_acc"], per_seed["mean_loss"] = val["acc"].mean(1), val["loss"].mean(1)
    # Grokking tasks reach high validation accuracy late: the training-split accuracy shows what
    # a method keeps of what the experts memorised even before that.
    per_seed["mean_train_acc"] = fit["acc"].mean(1)
    row = {"method": method.label}
    for key, values in per_seed.items():
        row[key], row[f"{key}_stderr"] = float(values.mean()), results.stderr(values)
    params = take(method.params, (slice(None), 0)) if method.per_task else method.params
    compute = p.compute_stats(method.logits_fn, params)
    row.update({key: compute[key] for key in ("params", "flops_per_example", "examples_per_s")})
    row["train_flops"] = method.train_flops
    row["per_seed"] = {key: values.tolist() for key, values in per_seed.items()}
    row["hparams"] = method.hparams
    logging.info("[compare] %-45s mean val acc %s", method.label, mean_se(per_seed["mean_acc"]))
    return row


@workdir_lib.claims_workdir(SPEC)
def run(config, workdir: str) -> dict:
    """Runs (or restores) every stage, scores every method and writes the comparison."""
    p = Pipeline(config, workdir)
    base = train_base(p)
    experts = train_experts(p, base)
    random_experts = train_experts(p, None)
    coeffs = train_dam(p, experts)
    fusion_frozen = train_fusion(p, experts, frozen=True)
    fusion_e2e = train_fusion(p, experts, frozen=False)
    cost = p.stages.costs
    keys = _streams(p.keys, DARE)
    per_seed = [(take(experts, r), take(base, r), keys[r]) for r in range(len(p.seeds))]
    kit = p.kit
    # Each row's own training: merges and ensembles of trained experts add none.
    costs = {"base": cost["base"], "ensemble": 0.0, "merge": 0.0,
             "fusion_frozen": cost["fusion_frozen"],
             "fusion_e2e": cost["experts"] + cost["fusion_e2e"]}  # fmt: skip
    table = engine.Table(
        apply=kit.apply, ensemble={"logits": kit.mean_logits, "probs": kit.mean_probs}.get,
        base=base, experts=experts, names=p.names, base_label="base model",
        oracle=engine.Method("own expert per task (oracle routing)", kit.apply, experts,
                             cost["experts"], per_task=True),
        cost=costs.get, grid=config.grid,
        merge=lambda row, hp: stack([row.merge(*s, hp) for s in per_seed]),
        holdout=functools.partial(_holdout_scores, p),
        rank=lambda scores: (-scores["holdout_acc"], scores["holdout_loss"]),
        dam=[engine.Method("DAM", kit.apply, jax.vmap(
            lambda c, e: merging.dam_merge(c, e, config.dam.nonlinearity))(coeffs, experts),
            cost["dam"])],
        fusion=kit.fusion_apply, fusion_frozen=fusion_frozen, fusion_e2e=fusion_e2e,
        averages=[engine.Method("weight average, unrelated random inits", kit.apply,
                                engine.weight_average(random_experts), 0.0)],
    )  # fmt: skip
    searches = {}
    rows = [score(p, m) for m in engine.methods(table, searches)]
    out = {"tasks": list(p.names), "seeds": p.seeds, "device": jax.devices()[0].device_kind,
           "rows": rows, "grid_search": searches}  # fmt: skip
    engine.write_comparison(
        workdir, out, merge_markdown(out),
        [(r["method"], r["flops_per_example"], r["per_seed"]["mean_acc"]) for r in rows],
        xlabel="forward FLOPs per example (XLA cost analysis)",
        ylabel="mean validation accuracy over tasks",
        title=f"Accuracy against inference cost (mean ± s.e. over {len(p.seeds)} seeds)",
    )  # fmt: skip
    plot_dam(
        coeffs, config.dam.nonlinearity, p.names, os.path.join(workdir, "dam_coefficients.png")
    )
    return out


def plot_dam(coeffs, nonlinearity, names, path):
    """Mean f(c) per layer (parameter leaf) and expert over seeds (`coeffs [R, K, ...]`)."""
    plt = plots.pyplot()

    f = merging.NONLINEARITIES[nonlinearity]
    flat = jax.tree_util.tree_leaves_with_path(coeffs)
    labels = [jax.tree_util.keystr(p).replace("']['", "/").strip("[]'") for p, _ in flat]
    values = np.array(
        [np.asarray(f(c)).reshape(c.shape[0], c.shape[1], -1).mean((0, 2)) for _, c in flat]
    )
    fig, ax = plt.subplots(figsize=(2 + 1.2 * len(names), 0.28 * len(labels) + 2))
    image = ax.imshow(values, aspect="auto", cmap="coolwarm")
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    seeds = jax.tree.leaves(coeffs)[0].shape[0]
    ax.set_title(f"DAM: mean {nonlinearity}(c) per layer and expert, mean of {seeds} seeds")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
