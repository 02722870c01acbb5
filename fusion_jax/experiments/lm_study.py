"""Language-model study: domain experts fused per token against every merge, DAM and ensembles.

    python main.py --config=configs/lm_fusion.py:quick --workdir=runs/lm_quick

Stages (Orbax, `<workdir>/stages/<name>`; a rerun restores finished ones), every one training all
seeds as one vmapped program (the experts: all domains x seeds at once):
  base (byte-level Llama on the mixture of domains) -> experts (one per domain, fine-tuned from
  the base) -> fusion_frozen (gated fusion over the frozen experts) -> control (the base trained
  on for the FLOPs the experts and the frozen fusion cost) -> dam (coefficients) -> fusion_e2e
  (gated fusion, experts trained too).
Training inside a stage (DAM's included) is saved every `train.checkpoint_every_secs` and on
Ctrl-C (SIGTERM), and a rerun resumes it to the same bits. Then every method is scored on each
domain's validation windows in bits per byte; static-merge hyper-parameters are chosen per seed
on a holdout slice of the training documents. Writes `comparison.{md,json}`, `frontier.png`,
`routing.png` (mean gate weight per expert on each domain) and `gate_tokens.png` (the gate over a
paragraph that switches domain half way).
"""

import dataclasses
import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from absl import logging

from fusion_jax import merging
from fusion_jax import workdir as workdir_lib
from fusion_jax.data import domains as domains_lib
from fusion_jax.data import text, text_tfds
from fusion_jax.evaluate import results
from fusion_jax.evaluate.comparisons import study_markdown
from fusion_jax.experiments.stages import Stages, flops_of, stack, take, train_in_chunks
from fusion_jax.merging import dam
from fusion_jax.models import lm, lm_fusion

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fusion_jax.errors import UserError

BYTES = text.ByteTokenizer()


def model_config(c) -> lm.LMConfig:
    """The study's byte-level Llama-style model from `config.model`."""
    return lm.LMConfig(
        model_type="llama",
        family="llama",
        vocab_size=BYTES.vocab_size,
        dim=c.dim,
        num_layers=c.num_layers,
        num_heads=c.num_heads,
        num_kv_heads=c.num_kv_heads,
        head_dim=c.dim // c.num_heads,
        mlp_dim=c.mlp_dim,
        max_len=c.seq_len,
        norm_eps=1e-6,
        tie_embeddings=False,
        sliding_windows=(None,) * c.num_layers,
        dtype=c.compute_dtype,
        matmul_precision=c.matmul_precision,
    )


@dataclasses.dataclass
class Data:
    """Per domain, windows `[N, L+1]` and target masks `[N, L]` of each split."""

    names: list[str]
    splits: dict  # split -> list over domains of (tokens, mask)

    def padded(self, split: str):
        """(tokens [D, N, L+1], mask [D, N, L], sizes [D]): every domain padded to the largest."""
        parts = self.splits[split]
        n = max(len(t) for t, _ in parts)

        def pad(x):
            return np.concatenate([x, np.zeros((n - len(x), *x.shape[1:]), x.dtype)])

        tokens = jnp.asarray(np.stack([pad(t) for t, _ in parts]))
        mask = jnp.asarray(np.stack([pad(m) for _, m in parts]))
        return tokens, mask, jnp.asarray([len(t) for t, _ in parts], jnp.int32)


def _capped(n: int, cap: int, how: str, seed: list[int]) -> np.ndarray:
    """Indices of the windows a split keeps under `cap` (0 = all): the first ones, or a seeded
    sample spread over the whole split (documents are in file order, so the first windows come
    from the alphabetically first files only), kept in stream order."""
    if not cap or cap >= n:
        return np.arange(n)
    if how == "first":
        return np.arange(cap)
    return np.sort(np.random.default_rng(seed).permutation(n)[:cap])


def load_data(config, workdir: str) -> Data:
    d = config.data
    data_dir = os.path.expanduser(d.tfds_dir) if d.tfds_dir else os.path.join(workdir, "tfds")
    names, splits = [], {s: [] for s in text_tfds.SPLITS}
    caps = {"train": d.max_train_windows, "holdout": d.max_eval_windows,
            "validation": d.max_eval_windows}  # fmt: skip
    for i, (name, files, sep) in enumerate(domains_lib.parse_domains(d.domains)):
        cfg = text_tfds.windows_config(
            name, files, sep, "bytes", config.model.seq_len, d.split_seed, d.val_fraction,
            d.holdout_fraction,
        )  # fmt: skip
        windows = text_tfds.load_windows(cfg, data_dir)
        for split, (tokens, mask) in windows.items():
            if len(tokens) == 0:
                raise UserError(f"domain {name!r} has no {split} windows: add text or documents")
            seed = [d.split_seed, i, text_tfds.SPLITS.index(split)]
            keep = _capped(len(tokens), caps[split], d.capped_windows, seed)
            splits[split].append((tokens[keep], mask[keep]))
        names.append(name)
        logging.info("[lm_study] domain %s: %s windows", name,
                     {s: len(w[0]) for s, w in windows.items()})  # fmt: skip
    return Data(names, splits)


def lm_loss(model, params, tokens, mask):
    """Mean next-token cross-entropy over the mask of `tokens [B, L+1]`."""
    logits = model.apply({"params": params}, tokens[:, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def sample_domain(tokens, mask, size, key, batch_size):
    """A batch of one domain's windows (`tokens [N, L+1]`, true count `size`)."""
    idx = jax.random.randint(key, (batch_size,), 0, size)
    return tokens[idx], mask[idx]


def sample_mixture(tokens, mask, sizes, key, batch_size):
    """A batch drawn from the domains in equal shares (domain first, then a window)."""
    kd, kw = jax.random.split(key)
    dom = jax.random.randint(kd, (batch_size,), 0, sizes.shape[0])
    idx = jnp.floor(jax.random.uniform(kw, (batch_size,)) * sizes[dom]).astype(jnp.int32)
    return tokens[dom, idx], mask[dom, idx]


def train(tag, params, loss_fn, sample_fn, data, keys, num_steps, tx, train_cfg, tokens_per_step,
          progress, lead_axes=1):  # fmt: skip
    """Trains `params` (leaves with `lead_axes` leading run axes, keys likewise) for `num_steps`
    Adam steps; one compiled chunk of `train_cfg.log_every` steps at a time. Returns (params,
    FLOPs per run).

    `loss_fn(params, batch...)`, `sample_fn(*data, key) -> batch`; batches use
    `fold_in(run key, step)`, so the result does not depend on the chunking. `progress` is
    `Stages.progress` for this training: it resumes from there, and saves there every
    `train_cfg.checkpoint_every_secs` and when interrupted (`stages.train_in_chunks`).
    """

    def one_run_chunk(state, run_data, key, n):
        def body(state, _):
            params, opt_state, step = state
            batch = sample_fn(*run_data, jax.random.fold_in(key, step))
            loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state, step + 1), loss

        return jax.lax.scan(body, state, None, length=n)

    data_axes = 0 if lead_axes == 2 else None  # experts: one domain's data per expert
    fn = one_run_chunk
    for axis in range(lead_axes):
        # The innermost vmap runs over domains when each expert has its own domain's data.
        fn = jax.vmap(fn, in_axes=(0, data_axes if axis == 0 else None, 0, None))
    compiled = jax.jit(fn, static_argnums=3)

    single = jax.tree.map(lambda x: x[(0,) * lead_axes], params)
    one_data = jax.tree.map(lambda x: x[0], data) if data_axes == 0 else data
    step_state = (single, tx.init(single), jnp.zeros((), jnp.int32))
    step_flops = flops_of(lambda s: one_run_chunk(s, one_data, jax.random.key(0), 1), step_state)
    init = jax.vmap(tx.init) if lead_axes == 1 else jax.vmap(jax.vmap(tx.init))
    state = (params, init(params), jnp.zeros(keys.shape, jnp.int32))

    def log(losses, done, rate):
        logging.info(
            "[lm_study] %s step %d/%d  loss %.4f  %.0f tokens/s  ETA %.0f s",
            tag, done, num_steps, float(jnp.mean(losses[..., -1])),
            rate * tokens_per_step * math.prod(keys.shape), (num_steps - done) / rate,
        )  # fmt: skip

    # Each stage is one training, saved by Stages.run as it ends: no progress save at the end.
    state = train_in_chunks(
        f"[lm_study] {tag}", lambda s, n: compiled(s, data, keys, n), state, num_steps,
        chunk=train_cfg.log_every, progress=progress,
        every_secs=train_cfg.checkpoint_every_secs, step_of=lambda s: int(np.asarray(s[2]).flat[0]),
        log=log, save_at_end=False,
    )  # fmt: skip
    return state[0], step_flops * num_steps


def frozen_part(tx, params, frozen_key: str):
    """`tx` for every entry of the dict `params` but `frozen_key`, which is never updated (and
    holds no optimizer state); its gradient is zero already (the loss stops it)."""
    labels = {k: ("frozen" if k == frozen_key else "train") for k in params}
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


class Study:
    """The stages and evaluation of one study workdir."""

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir
        self.data = load_data(config, workdir)
        self.names = self.data.names
        self.cfg = model_config(config.model)
        self.model = lm.LanguageModel(self.cfg)
        self.seeds = [config.seed + r for r in range(config.num_seeds)]
        self.keys = jax.vmap(jax.random.key)(jnp.asarray(self.seeds))
        self.stages = Stages(workdir)
        self.tokens_per_step = config.train.batch_size * config.model.seq_len
        self.loss = functools.partial(lm_loss, self.model)
        self.tx = optax.adam(config.train.learning_rate)
        self._scorers = {}

    # -- stages ------------------------------------------------------------------------------

    def _progress(self, stage: str):
        """Where stage `stage` (the name given to `Stages.run`, which clears it once the stage
        is saved) keeps its unfinished training."""
        return functools.partial(self.stages.progress, stage, None, self.seeds)

    def _init_params(self):
        def one(key):
            dummy = jnp.zeros((1, self.config.model.seq_len), jnp.int32)
            return self.model.init(jax.random.fold_in(key, 0), dummy)["params"]

        return jax.vmap(one)(self.keys)

    def _mixture(self, stage, params, num_steps, stream):
        t = self.config.train
        sample = functools.partial(sample_mixture, batch_size=t.batch_size)
        keys = jax.vmap(lambda k: jax.random.fold_in(k, stream))(self.keys)
        return train(stage, params, self.loss, sample, self.data.padded("train"), keys, num_steps,
                     self.tx, t, self.tokens_per_step, self._progress(stage))  # fmt: skip

    def base(self):
        abstract = jax.eval_shape(self._init_params)
        return self.stages.run(
            "base",
            lambda: self._mixture("base", self._init_params(), self.config.train.base_steps, 1),
            abstract,
        )

    def experts(self, base):
        """Stacked experts: leaves `[R, K, ...]` (seed, domain)."""
        k = len(self.names)
        t = self.config.train

        def run():
            params = jax.tree.map(
                lambda x: jnp.broadcast_to(x[:, None], (x.shape[0], k) + x.shape[1:]), base
            )
            keys = jax.vmap(
                lambda s: jax.vmap(lambda d: jax.random.fold_in(jax.random.fold_in(s, 2), d))(
                    jnp.arange(k)
                )
            )(self.keys)
            sample = functools.partial(sample_domain, batch_size=t.batch_size)
            return train("experts", params, self.loss, sample, self.data.padded("train"), keys,
                         t.expert_steps, optax.adam(t.expert_learning_rate), t,
                         self.tokens_per_step, self._progress("experts"), lead_axes=2)  # fmt: skip

        abstract = jax.eval_shape(lambda: jax.tree.map(
            lambda x: jnp.zeros((x.shape[0], k) + x.shape[1:], x.dtype), base))  # fmt: skip
        return self.stages.run("experts", run, abstract)

    def fusion(self, experts, end_to_end: bool):
        """Fusion params per seed `[R, ...]` trained on the mixture."""
        f = self.config.fusion
        fcfg = lm_fusion.fusion_config(self.cfg, len(self.names), gate_dim=f.gate_dim,
                                       balance_weight=f.balance_weight)  # fmt: skip
        model = lm_fusion.LMFusion(fcfg)
        name = "fusion_e2e" if end_to_end else "fusion_frozen"

        def init(r):
            experts_r = [take(take(experts, r), d) for d in range(len(self.names))]
            return lm_fusion.init_from_experts(model, jax.random.key(self.seeds[r]), experts_r)

        def run():
            params = stack([init(r) for r in range(len(self.seeds))])
            t = self.config.train

            def loss_fn(trainable, frozen, tokens, mask):
                p = {**trainable, **jax.lax.stop_gradient(frozen)}
                logits, extra = model.apply({"params": p}, tokens[:, :-1], mutable=["aux_loss"])
                nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
                aux = sum((jnp.sum(x) for x in jax.tree.leaves(extra)), jnp.zeros(()))
                return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0) + aux

            if end_to_end:
                trained, flops = self._train_fusion(name, params, lambda p, *b: loss_fn(p, {}, *b),
                                                    t.fusion_steps)  # fmt: skip
                return trained, flops
            frozen = {"experts": params["experts"]}
            trainable = {k: v for k, v in params.items() if k != "experts"}
            # The frozen experts ride along as data of each run (vmapped with their seed).
            trained, flops = self._train_fusion(
                name, {"t": trainable, "f": frozen},
                lambda p, *b: loss_fn(p["t"], p["f"], *b), t.fusion_steps, frozen_key="f",
            )  # fmt: skip
            return {**trained["t"], **frozen}, flops

        abstract = jax.eval_shape(lambda: stack([init(r) for r in range(len(self.seeds))]))
        return self.stages.run(name, run, abstract), model

    def _train_fusion(self, stage, params, loss_fn, num_steps, frozen_key=None):
        t = self.config.train
        tx = optax.adam(t.fusion_learning_rate)
        if frozen_key:
            tx = frozen_part(tx, params, frozen_key)
        sample = functools.partial(sample_mixture, batch_size=t.batch_size)
        keys = jax.vmap(lambda k: jax.random.fold_in(k, 3))(self.keys)
        return train(stage, params, loss_fn, sample, self.data.padded("train"), keys, num_steps, tx,
                     t, self.tokens_per_step, self._progress(stage))  # fmt: skip

    def dam(self, experts):
        """DAM coefficients per seed `[R, ...]`: each seed's merge of its own experts, trained on
        every domain's batch for that domain's expert (the experts ride along, frozen)."""
        d = self.config.dam
        k = len(self.names)
        one_coeffs = jax.eval_shape(dam.init_coefficients, take(experts, 0))
        trainable = jax.tree.map(lambda g: g == "linear", dam.coefficient_groups(one_coeffs))

        def apply_fn(params, tokens):
            return self.model.apply({"params": params}, tokens[:, :-1])

        def loss_fn(p, tokens, mask):
            loss, _ = dam.dam_loss(
                p["coefficients"], jax.lax.stop_gradient(p["experts"]), apply_fn, tokens,
                mask_per_expert=mask, similarity_granularity="per_layer", trainable=trainable,
            )  # fmt: skip
            return loss

        def sample(tables, masks, sizes, key):  # `[K, B, L+1]`: domain k's batch for expert k
            one = functools.partial(sample_domain, batch_size=d.batch_size)
            return jax.vmap(one)(tables, masks, sizes, jax.random.split(key, k))

        def run():
            params = {"coefficients": jax.vmap(dam.init_coefficients)(experts), "experts": experts}
            tx = frozen_part(optax.adam(d.learning_rate), params, "experts")
            keys = jax.vmap(lambda kk: jax.random.fold_in(kk, 4))(self.keys)
            trained, flops = train("dam", params, loss_fn, sample, self.data.padded("train"), keys,
                                   d.num_steps, tx, self.config.train,
                                   d.batch_size * k * self.config.model.seq_len,
                                   self._progress("dam"))  # fmt: skip
            return trained["coefficients"], flops

        abstract = jax.eval_shape(lambda: jax.vmap(dam.init_coefficients)(experts))
        return self.stages.run("dam", run, abstract)

    def control(self, base, extra_flops):
        """The base trained on the mixture for `extra_flops` more (per seed)."""
        t = self.config.train
        one = jax.tree.map(lambda x: x[0], base)
        state = (one, self.tx.init(one), jnp.zeros((), jnp.int32))
        batch = (jnp.zeros((t.batch_size, self.config.model.seq_len + 1), jnp.int32),
                 jnp.ones((t.batch_size, self.config.model.seq_len)))  # fmt: skip

        def one_step(s):
            loss, g = jax.value_and_grad(self.loss)(s[0], *batch)
            u, o = self.tx.update(g, s[1], s[0])
            return optax.apply_updates(s[0], u), o

        steps = self.stages.once(
            "control/steps", lambda: max(1, round(extra_flops / flops_of(one_step, state)))
        )
        logging.info("[lm_study] control: %d extra base steps for %.3g FLOPs", steps, extra_flops)
        params = self.stages.run(
            "control",
            lambda: self._mixture("control", base, steps, 5),
            jax.eval_shape(lambda: base),
        )
        return params, steps

    # -- evaluation ----------------------------------------------------------------------------

    def score(self, logits_fn, params, split="validation", per_domain_params=False):
        """Bits per byte `[R, D]` of `logits_fn(params_r, tokens) -> logits` on each domain, R
        being the params' leading axis (the seeds, or 1 for one candidate of the grid).

        With `per_domain_params`, params carry a domain axis after the seed axis (oracle).
        """
        if logits_fn not in self._scorers:  # one compiled scorer per model kind, not per call
            self._scorers[logits_fn] = jax.jit(lambda p, t, m: bpb_sums(logits_fn(p, t), t, m))
        fn = self._scorers[logits_fn]
        size = self.config.eval.batch_size
        runs = jax.tree.leaves(params)[0].shape[0]
        out = np.zeros((runs, len(self.names)))
        for r in range(runs):
            p_r = take(params, r)
            for d, (tokens, mask) in enumerate(self.data.splits[split]):
                p = take(p_r, d) if per_domain_params else p_r
                nll = count = 0.0
                for i in range(0, len(tokens), size):
                    a, b = fn(p, tokens[i : i + size], mask[i : i + size])
                    nll, count = nll + float(a), count + float(b)
                out[r, d] = text.bits_per_byte(nll, count)
        return out

    def plain_logits(self, params, tokens):
        return self.model.apply({"params": params}, tokens[:, :-1])

    def grid(self, make, points: list[dict], experts, base):
        """Per seed, the grid point with the lowest mean holdout bits per byte.

        Returns (merged params `[R, ...]`, chosen point per seed)."""
        merged, chosen = [], []
        for r in range(len(self.seeds)):
            e_r, b_r = take(experts, r), take(base, r)
            best = None
            for hp in points:
                m = make(e_r, b_r, hp)
                s = self.score(self.plain_logits, stack([m]), "holdout")[0].mean()
                if best is None or s < best[0]:
                    best = (s, m, hp)
            merged.append(best[1])
            chosen.append(best[2])
        return stack(merged), chosen

    def cost(self, params, logits_fn):
        """(parameters, forward FLOPs per token, measured tokens/s) of one seed's model."""
        p = take(params, 0)
        length = self.config.model.seq_len
        tokens = jnp.zeros((self.config.eval.batch_size, length + 1), jnp.int32)
        fn = jax.jit(logits_fn)
        flops = flops_of(logits_fn, p, tokens[:1]) / length
        jax.block_until_ready(fn(p, tokens))
        t0 = time.perf_counter()
        for _ in range(3):
            jax.block_until_ready(fn(p, tokens))
        rate = 3 * tokens.shape[0] * length / (time.perf_counter() - t0)
        return int(sum(x.size for x in jax.tree.leaves(p))), flops, rate

    def gate(self, model, params, tokens):
        """Gate weights `[B, L, K]` of seed 0 on `tokens [B, L+1]`."""
        fn = jax.jit(lambda p, t: model.apply({"params": p}, t[:, :-1], method="fused")[0])
        return np.asarray(fn(take(params, 0), tokens))

    def routing(self, model, params):
        """Mean gate weight per expert on each domain's validation text `[R, D, K]`, and the
        share of tokens whose top expert is that domain's own expert `[R]`."""
        fn = jax.jit(lambda p, t: model.apply({"params": p}, t[:, :-1], method="fused")[0])
        size = self.config.eval.batch_size
        k = len(self.names)
        weights = np.zeros((len(self.seeds), k, k))
        hits = np.zeros(len(self.seeds))
        total = 0.0
        for r in range(len(self.seeds)):
            total = 0.0
            for d, (tokens, mask) in enumerate(self.data.splits["validation"]):
                for i in range(0, len(tokens), size):
                    w = np.asarray(fn(take(params, r), tokens[i : i + size]))
                    m = mask[i : i + size][..., None]
                    weights[r, d] += (w * m).sum((0, 1))
                    hits[r] += float(((w.argmax(-1) == d) * m[..., 0]).sum())
                    total += float(m.sum())
                weights[r, d] /= max(float(self.data.splits["validation"][d][1].sum()), 1.0)
            hits[r] /= max(total, 1.0)
        return weights, hits


def bpb_sums(logits, tokens, mask):
    """(sum of next-token NLL in nats, number of byte targets) over the mask; EOS targets count
    in the NLL (the model must predict them) but cover no bytes."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    is_byte = (tokens[:, 1:] < 256).astype(mask.dtype)
    return jnp.sum(nll * mask), jnp.sum(mask * is_byte)


def _grid_points(config) -> dict[str, list[dict]]:
    g = config.grid
    return {
        "task_arithmetic": [{"lam": lam} for lam in g.lams],
        "ties": [{"density": d, "lam": lam} for d in g.densities for lam in g.lams],
        "dare": [{"drop_rate": p, "lam": lam} for p in g.drop_rates for lam in g.lams],
        "slerp": [{"t": t} for t in g.slerp_ts],
    }


@workdir_lib.claims_workdir
def run(config, workdir: str) -> dict:
    """Runs (or restores) every stage, scores every method and writes the comparison."""
    study = Study(config, workdir)
    k, seeds = len(study.names), study.seeds
    base = study.base()
    experts = study.experts(base)
    fusion_frozen, fusion_model = study.fusion(experts, end_to_end=False)
    costs = study.stages.costs
    control_extra = k * costs["experts"] + costs["fusion_frozen"]
    control, control_steps = study.control(base, control_extra)
    coeffs = study.dam(experts)
    fusion_e2e, _ = study.fusion(experts, end_to_end=True)
    costs = study.stages.costs

    plain = study.plain_logits

    def ensemble(mode):
        def fn(params, tokens):
            logits = jax.vmap(lambda p: plain(p, tokens))(params)
            if mode == "logits":
                return jnp.mean(logits, 0)
            return jnp.log(jnp.mean(jax.nn.softmax(logits, -1), 0))

        return fn

    def fusion_logits(params, tokens):
        return fusion_model.apply({"params": params}, tokens[:, :-1])

    grid = _grid_points(config)
    rng = jax.random.key(config.seed)
    makers = {
        "task arithmetic": (
            "task_arithmetic", lambda e, b, hp: merging.task_arithmetic(e, b, **hp)),
        "TIES": ("ties", lambda e, b, hp: merging.ties(e, b, **hp)),
        "DARE (linear)": ("dare", lambda e, b, hp: merging.dare(e, b, rng, **hp)),
        f"SLERP ({study.names[0]}, {study.names[1]})": (
            "slerp", lambda e, b, hp: merging.slerp(take(e, slice(0, 2)), **hp)),
    }  # fmt: skip
    base_flops, expert_flops = costs["base"], costs["base"] + k * costs["experts"]
    rows = []

    def add(method, params, logits_fn, flops, scores=None, hparams=None):
        scores = study.score(logits_fn, params) if scores is None else scores
        n, per_token, rate = study.cost(params, logits_fn)
        rows.append({
            "method": method,
            "bits_per_byte": {d: scores[:, i].tolist() for i, d in enumerate(study.names)},
            "mean_bits_per_byte": scores.mean(1).tolist(),
            "params": n, "flops_per_token": per_token, "tokens_per_s": rate,
            "training_flops": flops, "hparams": hparams,
        })  # fmt: skip
        logging.info("[lm_study] %s: mean bits per byte %.4f", method, scores.mean())

    add("base model (mixture)", base, plain, base_flops)
    oracle = study.score(plain, experts, per_domain_params=True)
    add("own expert per domain (oracle routing)", take(experts, (slice(None), 0)), plain,
        expert_flops, scores=oracle)  # fmt: skip
    add(f"control: base + {control_steps} steps (experts' + fusion's FLOPs)", control, plain,
        base_flops + costs["control"])  # fmt: skip
    add("output ensemble (mean logits)", experts, ensemble("logits"), expert_flops)
    add("output ensemble (mean probs)", experts, ensemble("probs"), expert_flops)
    add("weight average", jax.vmap(merging.weight_average)(experts), plain, expert_flops)
    for label, (key, make) in makers.items():
        merged, chosen = study.grid(make, grid[key], experts, base)
        add(label, merged, plain, expert_flops, hparams=chosen)
    dam_merged = jax.vmap(lambda c, e: dam.merge(c, e))(coeffs, experts)
    add("DAM", dam_merged, plain, expert_flops + costs["dam"])
    add("dynamic fusion, frozen experts", fusion_frozen, fusion_logits,
        expert_flops + costs["fusion_frozen"])  # fmt: skip
    add("dynamic fusion, end to end", fusion_e2e, fusion_logits,
        expert_flops + costs["fusion_e2e"])  # fmt: skip

    routing = {}
    for name, params in (("frozen", fusion_frozen), ("end_to_end", fusion_e2e)):
        weights, hits = study.routing(fusion_model, params)
        routing[name] = {"mean_gate_weight": weights.tolist(), "top_is_own_expert": hits.tolist()}
    out = {
        "domains": study.names,
        "seeds": seeds,
        "device": jax.devices()[0].platform,
        "control_steps": control_steps,
        "rows": rows,
        "routing": routing,
    }
    results.write_json(os.path.join(workdir, "comparison.json"), out)
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
        f.write(study_markdown(out))
    plot_frontier(out, os.path.join(workdir, "frontier.png"))
    plot_routing(out, os.path.join(workdir, "routing.png"))
    plot_gate_tokens(study, fusion_model, fusion_frozen, os.path.join(workdir, "gate_tokens.png"))
    return out


def plot_frontier(out: dict, path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 5))
    for row in out["rows"]:
        v = np.asarray(row["mean_bits_per_byte"])
        err = results.stderr(v) if len(v) > 1 else 0.0
        ax.errorbar(row["flops_per_token"], v.mean(), yerr=err, fmt="o", capsize=3)
        ax.annotate(row["method"], (row["flops_per_token"], v.mean()), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("forward FLOPs per token")
    ax.set_ylabel("mean validation bits per byte")
    ax.set_title("Bits per byte against inference cost")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_routing(out: dict, path: str) -> None:
    names = out["domains"]
    fig, axes = plt.subplots(1, len(out["routing"]), figsize=(5 * len(out["routing"]), 4))
    for ax, (name, r) in zip(np.atleast_1d(axes), out["routing"].items(), strict=True):
        w = np.mean(np.asarray(r["mean_gate_weight"]), 0)
        im = ax.imshow(w, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(names)), names)
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("expert")
        ax.set_ylabel("text domain")
        ax.set_title(f"mean gate weight ({name})")
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{w[i, j]:.2f}", ha="center", va="center", color="w", fontsize=7)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def switching_paragraph(study: Study) -> np.ndarray:
    """`[1, L+1]`: the first half from domain 0's validation text, the rest from domain 1's."""
    length = study.config.model.seq_len
    a = study.data.splits["validation"][0][0][0]
    b = study.data.splits["validation"][1][0][0]
    half = length // 2
    return np.concatenate([a[:half], b[: length + 1 - half]])[None].astype(np.int32)


def plot_gate_tokens(study: Study, model, params, path: str) -> None:
    tokens = switching_paragraph(study)
    w = study.gate(model, params, tokens)[0]  # [L, K]
    chars = [chr(t) if 32 <= t < 127 else "·" for t in tokens[0, :-1]]
    fig, ax = plt.subplots(figsize=(max(8, len(chars) / 10), 2.5))
    ax.imshow(w.T, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(study.names)), study.names)
    step = max(1, len(chars) // 64)
    ax.set_xticks(range(0, len(chars), step), chars[::step], fontsize=6)
    ax.axvline(study.config.model.seq_len // 2 - 0.5, color="r")
    ax.set_title(f"gate per token (seed {study.seeds[0]}): {study.names[0]} text, then "
                 f"{study.names[1]} from the red line")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
