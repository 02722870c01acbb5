"""Static merging and DAM against dynamic fusion on multi-task experts from a shared base.

Stages (each saved under `<workdir>/stages/<name>`; a rerun restores finished stages):
  base -> experts (one per task, fine-tuned from base) -> random_experts (same tasks, own random
  inits: the control row) -> dam (coefficients) -> fusion_frozen, fusion_e2e.
Then every method is evaluated on each task's validation split and `comparison.{md,json}`,
`frontier.png` and `dam_coefficients.png` are written. Runs on one device (jit, no pmap).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from fusion_jax import merging, models
from fusion_jax.data import multitask, pipeline
from fusion_jax.data import tasks as tasks_lib
from fusion_jax.evaluate import analysis, results
from fusion_jax.experiments.stages import Stages, flops_of
from fusion_jax.models import fusion
from fusion_jax.models.transformer import Transformer
from fusion_jax.train import steps
from fusion_jax.train.optimizer import make_optimizer


def apply_plain(model):
    """`(params, tokens) -> logits` of a plain Transformer."""
    return lambda params, tokens: model.apply({"params": params}, tokens)


def sample_per_task(tables: pipeline.Split, sizes, key, batch_size: int) -> pipeline.Split:
    """One batch per task from padded tables `[K, N_max, ...]` with true sizes `[K]`."""
    u = jax.random.uniform(key, (sizes.shape[0], batch_size))
    idx = jnp.floor(u * sizes[:, None]).astype(jnp.int32)
    take = jax.vmap(lambda x, i: x[i])
    return pipeline.Split(take(tables.inputs, idx), take(tables.labels, idx))


def pad_tables(parts: list[pipeline.Split]):
    n = max(len(p) for p in parts)

    def pad(x):
        return np.concatenate([x, np.zeros((n - len(x),) + x.shape[1:], x.dtype)])

    tables = pipeline.Split(
        np.stack([pad(p.inputs) for p in parts]), np.stack([pad(p.labels) for p in parts])
    )
    return jax.tree.map(jnp.asarray, tables), jnp.array([len(p) for p in parts], jnp.float32)


def train_params(apply_fn, params, data: pipeline.Split, num_steps, batch_size, key, tx, tag):
    """Trains `params` on `data` (host split) with `tx`; returns (params, training FLOPs)."""
    cfg = steps.StepConfig(batch_size, 1, "exact", 1, batch_size, 1)
    data = jax.tree.map(jnp.asarray, data)
    apply_aux = lambda p, x: (apply_fn(p, x), jnp.zeros(()))  # noqa: E731
    state = steps.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    one = functools.partial(steps.train_step, apply_fn=apply_aux, tx=tx, cfg=cfg, axis_name=None)
    step_flops = flops_of(lambda s: one(s, data, key), state)
    chunk = min(num_steps, 250)
    run = jax.jit(
        lambda s, n: steps.train_steps(
            s, data, key, n, apply_fn=apply_aux, tx=tx, cfg=cfg, axis_name=None
        ),
        static_argnums=1,
    )
    done = 0
    while done < num_steps:
        n = min(chunk, num_steps - done)
        state, metrics = run(state, n)
        done += n
        logging.info(
            "[compare] %s step %d/%d  train_loss %.4f  train_acc %.4f",
            tag,
            done,
            num_steps,
            float(metrics["loss"][-1]),
            float(metrics["acc"].mean()),
        )
    return state.params, step_flops * num_steps


def evaluate_on(logits_fn, params, parts: list[pipeline.Split]) -> dict:
    """Exact loss/accuracy per task of `logits_fn(params, tokens)` on host splits."""
    fn = jax.jit(logits_fn)
    out = {"loss": [], "acc": []}
    for part in parts:
        logits = fn(params, jnp.asarray(part.inputs))
        labels = jnp.asarray(part.labels)
        out["loss"].append(float(jnp.mean(steps.cross_entropy(logits, labels))))
        out["acc"].append(float(jnp.mean(jnp.argmax(logits, -1) == labels)))
    return out


def grid_search(make, grid: list[dict], holdout, logits_fn):
    """Best hyper-parameters by mean held-out accuracy (then loss); validation is not used."""
    scored = []
    for hp in grid:
        m = evaluate_on(logits_fn, make(**hp), holdout)
        scored.append((-np.mean(m["acc"]), np.mean(m["loss"]), hp))
    best = min(scored, key=lambda s: (s[0], s[1]))
    return best[2], [{"hparams": s[2], "holdout_acc": -s[0], "holdout_loss": s[1]} for s in scored]


def strip_head(params):
    return {k: v for k, v in params.items() if k != "head"}


def run(config, workdir: str) -> dict:
    names = tuple(tasks_lib.parse_task_names(config.tasks))
    mt = multitask.MultiTask(names, config.data.p)
    parts = multitask.splits(mt, config.seed, config.data.frac_train, config.data.holdout_frac)
    train_parts = [p.train for p in parts]
    holdout = [p.holdout for p in parts]
    val = [p.val for p in parts]
    k = len(names)
    expert_cfg = models.transformer_config(config.model, mt)  # MultiTask has a Task's sizes
    model = Transformer(expert_cfg)
    apply = apply_plain(model)
    example = jnp.asarray(val[0].inputs[:2])
    key = jax.random.key(config.seed)
    init = lambda r: model.init(jax.random.fold_in(key, r), example)["params"]  # noqa: E731
    abstract_one = jax.eval_shape(lambda: init(0))
    abstract_k = jax.tree.map(lambda x: jax.ShapeDtypeStruct((k,) + x.shape, x.dtype), abstract_one)
    stages = Stages(workdir)
    tx = make_optimizer(config.opt)
    bs = config.train.batch_size

    base = stages.run(
        "base",
        lambda: train_params(
            apply,
            init(0),
            multitask.mixture(train_parts),
            config.base.num_steps,
            bs,
            jax.random.fold_in(key, 100),
            tx,
            "base",
        ),
        abstract_one,
    )

    def train_experts(from_base: bool):
        trained, flops = [], 0.0
        for i, name in enumerate(names):
            start = base if from_base else init(1 + i)
            p, f = train_params(
                apply,
                start,
                train_parts[i],
                config.experts.num_steps,
                bs,
                jax.random.fold_in(key, 200 + i),
                tx,
                f"expert {name}",
            )
            trained.append(p)
            flops += f
        return jax.tree.map(lambda *xs: jnp.stack(xs), *trained), flops

    experts = stages.run("experts", lambda: train_experts(True), abstract_k)
    random_experts = stages.run("random_experts", lambda: train_experts(False), abstract_k)

    # DAM: coefficients trained to match each expert on its own task's data.
    tables, sizes = pad_tables(train_parts)
    d = config.dam
    loss_fn = functools.partial(
        merging.dam_loss,
        stacked=experts,
        apply_fn=apply,
        temperature=d.temperature,
        similarity_weight=d.similarity_weight,
        l1_weight=d.l1_weight,
        l2_weight=d.l2_weight,
        nonlinearity=d.nonlinearity,
    )
    dam_tx = optax.adam(d.learning_rate)

    def dam_step(carry, step):
        coeffs, opt = carry
        batch = sample_per_task(tables, sizes, jax.random.fold_in(key, 300 + step), d.batch_size)
        (_, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(
            coeffs, inputs_per_expert=batch.inputs
        )
        updates, opt = dam_tx.update(g, opt, coeffs)
        return (optax.apply_updates(coeffs, updates), opt), aux["kl"]

    def train_dam():
        coeffs = merging.init_coefficients(experts)
        carry = (coeffs, dam_tx.init(coeffs))
        step_flops = flops_of(lambda c: dam_step(c, 0), carry)
        (coeffs, _), kl = jax.jit(lambda c: jax.lax.scan(dam_step, c, jnp.arange(d.num_steps)))(
            carry
        )
        logging.info("[compare] DAM KL %.4f -> %.4f", float(kl[0]), float(kl[-1]))
        return coeffs, step_flops * d.num_steps

    coeffs = stages.run("dam", train_dam, jax.eval_shape(merging.init_coefficients, experts))

    # Dynamic fusion over the experts (their heads dropped; the fusion model has its own head).
    f = config.fusion
    fcfg = fusion.FusionConfig(
        expert=expert_cfg, num_experts=k, gate_dim=f.gate_dim, balance_weight=f.balance_weight
    )
    fmodel = fusion.FusionTransformer(fcfg)
    fapply = apply_plain(fmodel)

    def fusion_init():
        p = fmodel.init(jax.random.fold_in(key, 400), example)["params"]
        p["ensemble"]["experts"] = strip_head(experts)
        p["head"] = jax.tree.map(lambda x: jnp.mean(x, 0), experts["head"])
        return p

    abstract_f = jax.eval_shape(fusion_init)
    fusions = {}
    for tag, frozen in (("fusion_frozen", ("ensemble",)), ("fusion_e2e", ())):
        fusions[tag] = stages.run(
            tag,
            lambda frozen=frozen, tag=tag: train_params(
                fapply,
                fusion_init(),
                multitask.mixture(train_parts),
                f.num_steps,
                bs,
                jax.random.fold_in(key, 500),
                make_optimizer(config.opt, frozen),
                tag,
            ),
            abstract_f,
        )

    # Every method as (label, logits_fn, params, training FLOPs of the method itself).
    def ensemble_logits(probs: bool):
        def fn(stacked, x):
            logits = jax.vmap(apply, in_axes=(0, None))(stacked, x)
            if probs:
                return jnp.log(jnp.mean(jax.nn.softmax(logits, -1), 0))
            return jnp.mean(logits, 0)

        return fn

    g = config.grid
    searches = {}

    def searched(label, make, grid):
        hp, scores = grid_search(make, grid, holdout, apply)
        searches[label] = {"chosen": hp, "grid": scores}
        return make(**hp)

    base_cost = stages.costs["base"]
    expert_cost = stages.costs["experts"]
    methods = [
        ("base model", apply, base, base_cost),
        ("own expert per task (oracle routing)", None, experts, expert_cost),
        ("output ensemble (mean logits)", ensemble_logits(False), experts, 0.0),
        ("output ensemble (mean probs)", ensemble_logits(True), experts, 0.0),
        ("weight average", apply, merging.weight_average(experts), 0.0),
        (
            "weight average, unrelated random inits",
            apply,
            merging.weight_average(random_experts),
            0.0,
        ),
        (
            "task arithmetic",
            apply,
            searched(
                "task arithmetic",
                lambda lam: merging.task_arithmetic(experts, base, lam),
                [{"lam": x} for x in g.lams],
            ),
            0.0,
        ),
        (
            "TIES",
            apply,
            searched(
                "TIES",
                lambda density, lam: merging.ties(experts, base, density, lam),
                [{"density": dn, "lam": x} for dn in g.densities for x in g.lams],
            ),
            0.0,
        ),
        (
            "DARE (linear)",
            apply,
            searched(
                "DARE (linear)",
                lambda drop_rate, lam: merging.dare(
                    experts, base, jax.random.fold_in(key, 600), drop_rate, lam
                ),
                [{"drop_rate": p, "lam": x} for p in g.drop_rates for x in g.lams],
            ),
            0.0,
        ),
        (
            "DARE (TIES)",
            apply,
            searched(
                "DARE (TIES)",
                lambda drop_rate, lam, density: merging.dare(
                    experts, base, jax.random.fold_in(key, 600), drop_rate, lam, "ties", density
                ),
                [
                    {"drop_rate": p, "lam": x, "density": dn}
                    for p in g.drop_rates
                    for x in g.lams
                    for dn in g.densities
                ],
            ),
            0.0,
        ),
        (
            f"SLERP ({names[0]}, {names[1 % k]})",
            apply,
            searched(
                "SLERP",
                lambda t: merging.slerp(
                    jax.tree.map(lambda x: x[jnp.array([0, 1 % k])], experts), t
                ),
                [{"t": t} for t in g.slerp_ts],
            ),
            0.0,
        ),
        ("DAM", apply, merging.dam_merge(coeffs, experts, d.nonlinearity), stages.costs["dam"]),
        (
            "dynamic fusion, frozen experts",
            fapply,
            fusions["fusion_frozen"],
            stages.costs["fusion_frozen"],
        ),
        (
            "dynamic fusion, end to end",
            fapply,
            fusions["fusion_e2e"],
            expert_cost + stages.costs["fusion_e2e"],
        ),
    ]

    rows = []
    tokens = jnp.asarray(multitask.mixture(val).inputs[:bs])
    for label, logits_fn, params, train_flops in methods:
        if logits_fn is None:  # each task read by its own expert
            own = [jax.tree.map(lambda x, i=i: x[i], params) for i in range(k)]
            per = [evaluate_on(apply, own[i], [val[i]]) for i in range(k)]
            metrics = {key_: [p[key_][0] for p in per] for key_ in ("loss", "acc")}
            fit = [evaluate_on(apply, own[i], [train_parts[i]])["acc"][0] for i in range(k)]
            compute = analysis.compute_stats(
                lambda p, x: (apply(p, x), 0.0), jax.tree.map(lambda x: x[0], params), tokens
            )
        else:
            metrics = evaluate_on(logits_fn, params, val)
            fit = evaluate_on(logits_fn, params, train_parts)["acc"]
            compute = analysis.compute_stats(
                lambda p, x, fn=logits_fn: (fn(p, x), 0.0), params, tokens
            )
        row = {"method": label}
        for i, name in enumerate(names):
            row[f"{name}_acc"], row[f"{name}_loss"] = metrics["acc"][i], metrics["loss"][i]
        row["mean_acc"], row["mean_loss"] = (
            float(np.mean(metrics["acc"])),
            float(np.mean(metrics["loss"])),
        )
        # Grokking tasks reach high validation accuracy late: the training-split accuracy shows
        # what a method keeps of what the experts memorised even before that.
        row["mean_train_acc"] = float(np.mean(fit))
        row.update(
            {
                "params": compute["params"],
                "flops_per_example": compute["flops_per_example"],
                "examples_per_s": compute["examples_per_s"],
                "train_flops": train_flops,
            }
        )
        rows.append(row)
        logging.info("[compare] %-45s mean val acc %.4f", label, row["mean_acc"])

    out = {
        "tasks": list(names),
        "device": jax.devices()[0].device_kind,
        "rows": rows,
        "grid_search": searches,
    }
    results.write_json(os.path.join(workdir, "comparison.json"), out)
    with open(os.path.join(workdir, "comparison.md"), "w") as fh:
        fh.write(to_markdown(out))
    plot_frontier(rows, os.path.join(workdir, "frontier.png"))
    plot_dam(coeffs, experts, d.nonlinearity, names, os.path.join(workdir, "dam_coefficients.png"))
    return out


def to_markdown(out: dict) -> str:
    names = out["tasks"]
    header = (
        ["method"]
        + [f"{n} acc / loss" for n in names]
        + [
            "mean acc",
            "mean loss",
            "mean train acc",
            "params",
            "FLOPs/example",
            "examples/s",
            "training FLOPs",
        ]
    )
    lines = [
        "# Static merging and DAM against dynamic fusion",
        "",
        f"Validation split of each task (mean train acc: the training split without the "
        f"held-out slice); measured on {out['device']}. Merge hyper-parameters "
        "were chosen on a held-out slice of the training split (comparison.json lists the "
        "grids). Training FLOPs: the method's own training (for end-to-end fusion, the "
        "experts' fine-tuning too); 0 for merges computed in closed form.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in out["rows"]:
        cells = [r["method"]] + [f"{r[f'{n}_acc']:.4f} / {r[f'{n}_loss']:.3f}" for n in names]
        cells += [
            f"{r['mean_acc']:.4f}",
            f"{r['mean_loss']:.3f}",
            f"{r['mean_train_acc']:.4f}",
            str(r["params"]),
            f"{r['flops_per_example']:.3g}",
            f"{r['examples_per_s']:.3g}",
            f"{r['train_flops']:.3g}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_frontier(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in rows:
        ax.scatter(r["flops_per_example"], r["mean_acc"])
        ax.annotate(
            r["method"],
            (r["flops_per_example"], r["mean_acc"]),
            fontsize=7,
            xytext=(4, 2),
            textcoords="offset points",
        )
    ax.set(
        xscale="log",
        xlabel="forward FLOPs per example (XLA cost analysis)",
        ylabel="mean validation accuracy over tasks",
        title="Accuracy against inference cost",
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_dam(coeffs, experts, nonlinearity, names, path):
    """Mean f(c) per layer (parameter leaf) and expert."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = merging.NONLINEARITIES[nonlinearity]
    flat = jax.tree_util.tree_leaves_with_path(coeffs)
    labels = [jax.tree_util.keystr(p).replace("']['", "/").strip("[]'") for p, _ in flat]
    values = np.array([np.asarray(f(c)).reshape(c.shape[0], -1).mean(1) for _, c in flat])
    fig, ax = plt.subplots(figsize=(2 + 1.2 * len(names), 0.28 * len(labels) + 2))
    image = ax.imshow(values, aspect="auto", cmap="coolwarm")
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_title(f"DAM: mean {nonlinearity}(c) per layer and expert")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
