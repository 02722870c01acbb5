"""Language-model study: domain experts fused per token against every merge, DAM and ensembles.

    python main.py --config=configs/lm_study.py:quick --workdir=runs/lm_quick
    python main.py --config=configs/lm_study.py:smollm2 --workdir=runs/lm_smollm2

The base is either trained here (a byte-level Llama on the mixture of domains, `model.base=""`)
or a pretrained checkpoint (`model.base`: a folder, a .gguf file or a name that
fusion_jax/pretrained.py fetches, e.g. "smollm2"), loaded and not trained, with its own
tokenizer. Stages (Orbax, `<workdir>/stages/<name>`; a rerun restores finished ones):
  base (trained, or loaded) -> experts (one per domain of `data.expert_domains`, fine-tuned from
  the base; all at once as one vmapped program, or one after another with
  `train.experts_in_sequence` when K models with Adam state do not fit) -> fusion_frozen (gated
  fusion over the frozen experts) -> control (the base trained on for the FLOPs the experts and
  the frozen fusion cost) -> dam_average / dam (DAM coefficients from the weight average, and
  from the DAM repository's start) -> fusion_e2e (gated fusion, experts trained too).
Training inside a stage (DAM's included) is saved every `train.checkpoint_every_secs` and on
Ctrl-C (SIGTERM), and a rerun resumes it to the same bits. Fusion keeps, per seed, the step whose
parameters score best on a slice of the holdout text (step 0, its start, included). Then every
method is scored on each domain's validation windows in bits per byte (summed NLL over the UTF-8
bytes the target tokens stand for, so BPE and byte models compare); static-merge
hyper-parameters are chosen per seed on the holdout slice of the training documents. Writes
`comparison.{md,json}` (with greedy samples per domain), `frontier.png`, `routing.png` (mean gate
weight per expert on each domain), `gate_tokens.png` (the gate over a paragraph that switches
domain half way) and `fusion_selection.png` (fusion's holdout curve).
"""

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from fusion_jax import gguf_checkpoint, pretrained
from fusion_jax import hf_checkpoint as hc
from fusion_jax import workdir as workdir_lib
from fusion_jax.data import domains as domains_lib
from fusion_jax.data import text, tokenize
from fusion_jax.errors import UserError
from fusion_jax.evaluate import plots
from fusion_jax.evaluate.comparisons import study_markdown
from fusion_jax.experiments import engine
from fusion_jax.experiments.stages import Stages, flops_of, stack, take
from fusion_jax.merging import dam
from fusion_jax.models import decoding, lm, lm_fusion
from fusion_jax.schema import split_list
from fusion_jax.specs.lm_study import SPEC

BYTES = tokenize.ByteTokenizer()


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


def load_data(config, workdir: str, tokenizer: str = "bytes") -> Data:
    """Every domain's windows, tokenized by `tokenizer` ("bytes" or a checkpoint's)."""
    # TFDS (0.3 s to import) only when a study reads its data, as data/pipeline.py does.
    from fusion_jax.data import text_tfds

    d = config.data
    data_dir = os.path.expanduser(d.tfds_dir) if d.tfds_dir else os.path.join(workdir, "tfds")
    names, splits = [], {s: [] for s in text_tfds.SPLITS}
    caps = {"train": d.max_train_windows, "holdout": d.max_eval_windows,
            "validation": d.max_eval_windows}  # fmt: skip
    for i, (name, sources, sep) in enumerate(domains_lib.parse_domains(d.domains)):
        cfg = text_tfds.windows_config(
            name, sources, sep, tokenizer, config.model.seq_len, d.split_seed, d.val_fraction,
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


def lm_loss(model, params, frozen, tokens, mask):
    """Mean next-token cross-entropy over the mask of `tokens [B, L+1]` (`frozen` unused)."""
    del frozen
    return lm.mean_nll(model.apply({"params": params}, tokens[:, :-1]), tokens, mask)


def sample_mixture(tokens, mask, sizes, key, batch_size):
    """A batch drawn from the domains in equal shares (domain first, then a window)."""
    kd, kw = jax.random.split(key)
    dom = jax.random.randint(kd, (batch_size,), 0, sizes.shape[0])
    idx = jnp.floor(jax.random.uniform(kw, (batch_size,)) * sizes[dom]).astype(jnp.int32)
    return tokens[dom, idx], mask[dom, idx]


class Study:
    """The stages and evaluation of one study workdir."""

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir
        m = config.model
        self.base_path = pretrained.resolve(m.base) if m.base else None
        if self.base_path:
            loaded = lm.LMConfig.from_hf(hc.read_config(self.base_path))
            self.cfg = dataclasses.replace(
                loaded, dtype=m.compute_dtype, matmul_precision=m.matmul_precision
            )
        else:
            self.cfg = model_config(m)
        spec = self.base_path or "bytes"
        self.tokenizer = tokenize.load_tokenizer(spec)
        self.data = load_data(config, workdir, spec)
        self.names = self.data.names
        # The domains that get an expert (all by default; specs/lm_study.py checks the names); the
        # others are scored only.
        self.expert_names = split_list(config.data.expert_domains) or self.names
        self.expert_domain = [self.names.index(n) for n in self.expert_names]
        largest = max(int(t.max()) for t, _ in self.data.splits["train"])
        if largest >= self.cfg.vocab_size:
            raise UserError(
                f"the tokenizer gives ids up to {largest}, past the model's vocab_size "
                f"{self.cfg.vocab_size}"
            )
        # Bytes of text each target token stands for: the denominator of bits per byte.
        table = np.zeros(self.cfg.vocab_size, np.float32)
        token_bytes = self.tokenizer.token_bytes()[: self.cfg.vocab_size]
        table[: len(token_bytes)] = token_bytes
        self.token_bytes = jnp.asarray(table)
        self.model = lm.LanguageModel(self.cfg)
        self.seeds = [config.seed + r for r in range(config.num_seeds)]
        self.keys = jax.vmap(jax.random.key)(jnp.asarray(self.seeds))
        self.stages = Stages(workdir)
        self.tokens_per_step = config.train.batch_size * config.model.seq_len
        self.loss = functools.partial(lm_loss, self.model)
        self.tx = optax.adam(config.train.learning_rate)
        self._scorers = {}

    # -- stages ------------------------------------------------------------------------------

    def _train(self, tag, params, loss_fn, sample, data, keys, num_steps, tx, tokens_per_step,
               progress, **options):  # fmt: skip
        """`engine.train_runs` chunked, saved and logged as `config.train` says."""
        t = self.config.train
        return engine.train_runs(
            f"[lm_study] {tag}", params, loss_fn, sample, data, keys, num_steps, tx,
            chunk=t.log_every, every_secs=t.checkpoint_every_secs,
            tokens_per_step=tokens_per_step, progress=progress, **options,
        )  # fmt: skip

    def _progress(self, stage: str, part: str | None = None, seeds=None):
        """Where stage `stage` (the name given to `Stages.run`, which clears it once the stage
        is saved) keeps its unfinished training (of `part` for `seeds`, when in parts)."""
        return functools.partial(self.stages.progress, stage, part, seeds or self.seeds)

    def _init_params(self):
        def one(key):
            dummy = jnp.zeros((1, self.config.model.seq_len), jnp.int32)
            return self.model.init(jax.random.fold_in(key, 0), dummy)["params"]

        return jax.vmap(one)(self.keys)

    def _mixture(self, stage, params, num_steps, stream):
        t = self.config.train
        sample = functools.partial(sample_mixture, batch_size=t.batch_size)
        keys = jax.vmap(lambda k: jax.random.fold_in(k, stream))(self.keys)
        trained, flops, _ = self._train(stage, params, self.loss, sample,
                                        self.data.padded("train"), keys, num_steps, self.tx,
                                        self.tokens_per_step, self._progress(stage))  # fmt: skip
        return trained, flops

    def base(self):
        """The base per seed `[R, ...]`: trained on the mixture, or the pretrained checkpoint
        (the same for every seed; its file's sha256 is bound to the workdir)."""
        if self.base_path:
            hc.check_inputs(os.path.join(self.workdir, "base.json"),
                            hc.input_records([self.base_path]))  # fmt: skip
            self.stages.once("base", lambda: 0.0)  # pretraining is not counted here
            _, params = hc.load(self.base_path, "float32")
            runs = len(self.seeds)
            return jax.tree.map(lambda x: jnp.broadcast_to(x, (runs, *x.shape)), params)
        abstract = jax.eval_shape(self._init_params)
        return self.stages.run(
            "base",
            lambda: self._mixture("base", self._init_params(), self.config.train.base_steps, 1),
            abstract,
        )

    def _expert_keys(self):
        """`[R, K]` keys: seed r's stream 2, folded with the expert's index."""
        experts = jnp.arange(len(self.expert_names))

        def of_seed(key):
            return jax.vmap(lambda d: jax.random.fold_in(jax.random.fold_in(key, 2), d))(experts)

        return jax.vmap(of_seed)(self.keys)

    def experts(self, base):
        """Stacked experts: leaves `[R, K, ...]` (seed, expert domain)."""
        k = len(self.expert_names)
        t = self.config.train
        tx = optax.adam(t.expert_learning_rate)
        sample = functools.partial(engine.sample_windows, batch_size=t.batch_size)

        def together():
            params = jax.tree.map(
                lambda x: jnp.broadcast_to(x[:, None], (x.shape[0], k) + x.shape[1:]), base
            )
            tokens, mask, sizes = self.data.padded("train")
            rows = jnp.asarray(self.expert_domain)
            trained, flops, _ = self._train(
                "experts", params, self.loss, sample, (tokens[rows], mask[rows], sizes[rows]),
                self._expert_keys(), t.expert_steps, tx, self.tokens_per_step,
                self._progress("experts"), data_axes=(None, 0),
            )  # fmt: skip
            return trained, flops

        def in_sequence():
            # One expert at a time (K models with Adam state need not fit), each one part of the
            # stage, saved when done: a rerun restores the finished ones.
            keys, runs, flops = self._expert_keys(), [], 0.0
            for r, seed in enumerate(self.seeds):
                row = []
                for i, d in enumerate(self.expert_domain):
                    tokens, mask = self.data.splits["train"][d]
                    data = (jnp.asarray(tokens), jnp.asarray(mask), jnp.int32(len(tokens)))
                    name = self.expert_names[i]
                    params, flops, _ = self._train(
                        f"experts/{name} (seed {seed})", take(base, r), self.loss, sample, data,
                        keys[r, i], t.expert_steps, tx, self.tokens_per_step,
                        self._progress("experts", name, [seed]), data_axes=(), save_at_end=True,
                    )  # fmt: skip
                    row.append(params)
                runs.append(stack(row))
            return stack(runs), flops

        abstract = jax.eval_shape(lambda: jax.tree.map(
            lambda x: jnp.zeros((x.shape[0], k) + x.shape[1:], x.dtype), base))  # fmt: skip
        return self.stages.run("experts", in_sequence if t.experts_in_sequence else together,
                               abstract)  # fmt: skip

    def fusion_model(self):
        f = self.config.fusion
        fcfg = lm_fusion.fusion_config(self.cfg, len(self.expert_names), gate_dim=f.gate_dim,
                                       balance_weight=f.balance_weight,
                                       force_gate=f.mix == "probs")  # fmt: skip
        return lm_fusion.LMFusion(fcfg, mix=f.mix)

    def fusion(self, experts, end_to_end: bool):
        """(fusion params per seed `[R, ...]` trained on the mixture, the model, and the holdout
        curve `[R, chunks + 1]` of the selection, or None without one).

        The stage saves what the fusion changes: its own params (the gate; the head for mix
        "states") and, end to end, the experts; frozen experts come from the experts stage. End
        to end, `experts` is handed over to the training (it starts from them and writes over
        them): pass a tree the caller does not use again."""
        f = self.config.fusion
        model = self.fusion_model()
        name = "fusion_e2e" if end_to_end else "fusion_frozen"
        runs = len(self.seeds)
        train_head = f.mix == "states" and f.train_head
        # The leaves the experts' heads are read from (the embedding when tied).
        heads = {k: v for k, v in experts.items() if k in ("embed_tokens", "wte", "lm_head")}
        if f.mix == "states":  # the fusion head replaces the experts' own
            experts = {k: v for k, v in experts.items() if k != "lm_head"}

        def own(r):  # seed r's fresh gate (and, for "states", the experts' mean head)
            head = lm_fusion.mean_head(self.cfg, take(heads, r)) if f.mix == "states" else None
            return lm_fusion.init_gate(model, jax.random.key(self.seeds[r]), head)

        def saved_shapes():
            tree = stack([own(r) for r in range(runs)])
            if end_to_end:
                tree["experts"] = experts
            if not f.select_windows:
                return tree
            points = -(-self.config.train.fusion_steps // self.config.train.log_every) + 1
            return {"params": tree, "curve": jnp.zeros((runs, points), jnp.float32)}

        def logits_fn(params, tokens):
            return model.apply({"params": params}, tokens[:, :-1])

        def model_params(p, frozen):  # what the model reads: less the head's anchor
            return {**p, **{k: v for k, v in frozen.items() if k != "head_init"}}

        def run():
            t = self.config.train
            params, frozen = stack([own(r) for r in range(runs)]), {}
            if end_to_end:
                params["experts"] = experts
            else:
                frozen["experts"] = experts
            if "head" in params and not train_head:
                frozen["head"] = params.pop("head")
            if train_head and f.head_decay:
                frozen["head_init"] = params["head"]  # the decay pulls the head back to it

            def loss_fn(p, fr, tokens, mask):
                full = model_params(p, jax.lax.stop_gradient(fr))
                logits, extra = model.apply({"params": full}, tokens[:, :-1], mutable=["aux_loss"])
                aux = lm.sown_losses(extra)
                if "head_init" in fr:
                    drift = p["head"]["kernel"] - fr["head_init"]["kernel"]
                    aux = aux + f.head_decay * jnp.sum(drift * drift)
                return lm.mean_nll(logits, tokens, mask) + aux

            def select(p):  # mean holdout bits per byte of each seed
                return self.score(logits_fn, model_params(p, frozen), "holdout",
                                  f.select_windows).mean(1)  # fmt: skip

            tx = optax.adam(t.fusion_learning_rate)
            if end_to_end and f.e2e_expert_learning_rate:  # the experts at their own rate
                labels = {k: "experts" if k == "experts" else "fusion" for k in params}
                tx = optax.multi_transform(
                    {"fusion": tx, "experts": optax.adam(f.e2e_expert_learning_rate)}, labels
                )
            batch = (end_to_end and f.e2e_batch_size) or t.batch_size
            sample = functools.partial(sample_mixture, batch_size=batch)
            keys = jax.vmap(lambda k: jax.random.fold_in(k, 3))(self.keys)
            trained, flops, curve = self._train(
                name, params, loss_fn, sample, self.data.padded("train"), keys, t.fusion_steps,
                tx, batch * self.config.model.seq_len, self._progress(name),
                select=select if f.select_windows else None, frozen=frozen,
                hand_over=end_to_end,
            )  # fmt: skip
            if "head" in frozen:
                trained["head"] = frozen["head"]
            return ({"params": trained, "curve": curve} if f.select_windows else trained), flops

        tree = self.stages.run(name, run, jax.eval_shape(saved_shapes))
        tree, curve = (tree["params"], tree["curve"]) if f.select_windows else (tree, None)
        return ({**tree} if end_to_end else {**tree, "experts": experts}), model, curve

    def dam(self, experts, init: str):
        """DAM coefficients per seed `[R, ...]` from `init` (dam.INITS): each seed's merge of its
        own experts, trained on every expert domain's batch for that domain's expert (the
        experts ride along, frozen). Stage "dam_average", or "dam" for the repository's start."""
        d = self.config.dam
        k = len(self.expert_names)
        value = dam.initial_value(k, init, "tanh")
        one_coeffs = jax.eval_shape(dam.init_coefficients, take(experts, 0))
        trainable = jax.tree.map(lambda g: g == "linear", dam.coefficient_groups(one_coeffs))

        name = "dam" if init == "repository" else f"dam_{init}"

        def run():
            keys = jax.vmap(lambda kk: jax.random.fold_in(kk, 4))(self.keys)
            tokens, mask, sizes = self.data.padded("train")
            rows = jnp.asarray(self.expert_domain)
            t = self.config.train
            trained, flops, _ = engine.train_dam(
                f"[lm_study] {name}", experts, d, self.plain_logits,
                functools.partial(engine.sample_experts, batch_size=d.batch_size),
                (tokens[rows], mask[rows], sizes[rows]), keys, init=value, trainable=trainable,
                similarity="per_layer", chunk=t.log_every, every_secs=t.checkpoint_every_secs,
                tokens_per_step=d.batch_size * k * self.config.model.seq_len,
                progress=self._progress(name),
            )  # fmt: skip
            return trained, flops

        abstract = jax.eval_shape(lambda: jax.vmap(lambda e: dam.init_coefficients(e, value))(
            experts))  # fmt: skip
        return self.stages.run(name, run, abstract)

    def control(self, base, extra_flops):
        """The base trained on the mixture for `extra_flops` more (per seed)."""
        t = self.config.train
        one = jax.tree.map(lambda x: x[0], base)
        state = (one, self.tx.init(one), jnp.zeros((), jnp.int32))
        batch = (jnp.zeros((t.batch_size, self.config.model.seq_len + 1), jnp.int32),
                 jnp.ones((t.batch_size, self.config.model.seq_len)))  # fmt: skip

        def one_step(s):
            loss, g = jax.value_and_grad(self.loss)(s[0], {}, *batch)
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

    def score(self, logits_fn, params, split="validation", limit=0, per_domain_params=None):
        """Bits per byte `[R, D]` of `logits_fn(params_r, tokens) -> logits` on each domain's
        windows of `split` (the first `limit` of them, 0: all), R being the params' leading
        axis (the seeds, or 1 for one candidate of the grid). The runs are scored as one
        vmapped program: no run's parameters are copied out of the stack.

        `per_domain_params(d)`, when given, replaces `params` by the model `[R, ...]` that
        scores domain d (the oracle: each domain's own expert).
        """
        if logits_fn not in self._scorers:  # one compiled scorer per model kind, not per call
            self._scorers[logits_fn] = jax.jit(jax.vmap(
                lambda p, t, m: bpb_sums(logits_fn(p, t), t, m, self.token_bytes),
                in_axes=(0, None, None)))  # fmt: skip
        fn = self._scorers[logits_fn]
        size = self.config.eval.batch_size
        out = []
        for d, (tokens, mask) in enumerate(self.data.splits[split]):
            p = per_domain_params(d) if per_domain_params else params
            n = min(limit, len(tokens)) if limit else len(tokens)
            nll = count = 0.0
            for i in range(0, n, size):
                a, b = fn(p, tokens[i : min(i + size, n)], mask[i : min(i + size, n)])
                nll, count = nll + np.asarray(a, np.float64), count + np.asarray(b, np.float64)
            out.append([text.bits_per_byte(x, c) for x, c in zip(nll, count, strict=True)])
        return np.asarray(out).T

    def row(self, method: engine.Method, base) -> dict:
        """The method's row: bits per byte per domain and seed, size, cost and choices. The
        oracle (`per_task`) scores each domain with its own expert, or `base` where it has none."""
        if method.per_task:

            def own_model(d):
                if d in self.expert_domain:
                    return take(method.params, (slice(None), self.expert_domain.index(d)))
                return base

            scores = self.score(method.logits_fn, None, per_domain_params=own_model)
            params = own_model(self.expert_domain[0])
        else:
            scores, params = self.score(method.logits_fn, method.params), method.params
        n, per_token, rate = self.cost(params, method.logits_fn)
        logging.info("[lm_study] %s: mean bits per byte %.4f", method.label, scores.mean())
        return {
            "method": method.label,
            "bits_per_byte": {d: scores[:, i].tolist() for i, d in enumerate(self.names)},
            "mean_bits_per_byte": scores.mean(1).tolist(),
            "params": n, "flops_per_token": per_token, "tokens_per_s": rate,
            "training_flops": method.train_flops, "hparams": method.hparams,
        }  # fmt: skip

    def plain_logits(self, params, tokens):
        return self.model.apply({"params": params}, tokens[:, :-1])

    def cost(self, params, logits_fn):
        """(parameters, forward FLOPs per token, measured tokens/s) of one seed's model."""
        p = take(params, 0)
        length = self.config.model.seq_len
        tokens = jnp.zeros((self.config.eval.batch_size, length + 1), jnp.int32)
        fn = jax.jit(logits_fn)
        flops = flops_of(logits_fn, p, tokens[:1]) / length
        jax.block_until_ready(fn(p, tokens))
        t0 = time.perf_counter()
        jax.block_until_ready(fn(p, tokens))
        rate = tokens.shape[0] * length / (time.perf_counter() - t0)
        return int(sum(x.size for x in jax.tree.leaves(p))), flops, rate

    def gate(self, model, params, tokens):
        """Gate weights `[B, L, K]` of seed 0 on `tokens [B, L+1]`."""
        fn = jax.jit(lambda p, t: model.apply({"params": p}, t[:, :-1], method="fused")[0])
        return np.asarray(fn(take(params, 0), tokens))

    def routing(self, model, params):
        """Mean gate weight per expert on each domain's validation text `[R, D, K]`, and the
        share of the tokens of domains with an expert whose top expert is theirs `[R]`."""
        fn = jax.jit(lambda p, t: model.apply({"params": p}, t[:, :-1], method="fused")[0])
        size = self.config.eval.batch_size
        k = len(self.expert_names)
        weights = np.zeros((len(self.seeds), len(self.names), k))
        hits = np.zeros(len(self.seeds))
        for r in range(len(self.seeds)):
            total = 0.0
            for d, (tokens, mask) in enumerate(self.data.splits["validation"]):
                own = self.expert_domain.index(d) if d in self.expert_domain else None
                for i in range(0, len(tokens), size):
                    w = np.asarray(fn(take(params, r), tokens[i : i + size]))
                    m = mask[i : i + size][..., None]
                    weights[r, d] += (w * m).sum((0, 1))
                    if own is not None:
                        hits[r] += float(((w.argmax(-1) == own) * m[..., 0]).sum())
                        total += float(m.sum())
                weights[r, d] /= max(float(self.data.splits["validation"][d][1].sum()), 1.0)
            hits[r] /= max(total, 1.0)
        return weights, hits

    def samples(self, models: dict) -> dict:
        """Greedy continuations of each domain's `eval.prompts` entry by seed 0 of every model
        in `models` ({label: (step function, cache)}), `eval.sample_tokens` tokens, cut at the
        end-of-sequence token: {domain: {"prompt": text, "continuations": {label: text}}}."""
        e = self.config.eval
        eos = () if self.tokenizer.eos_id is None else (self.tokenizer.eos_id,)
        out = {}
        for domain in self.names:
            prompt = e.prompts.get(domain, "") if "prompts" in e else ""
            if not prompt or not e.sample_tokens:
                continue
            ids = self.tokenizer.encode_prompt(prompt)
            continuations = {}
            for label, (step_fn, make_cache) in models.items():
                tokens = decoding.generate(
                    step_fn, make_cache(len(ids) + e.sample_tokens), jnp.asarray([ids], jnp.int32),
                    e.sample_tokens, jax.random.key(0), 0.0, eos,
                )  # fmt: skip
                new = np.asarray(tokens[0, len(ids) :]).tolist()
                new = new[: new.index(eos[0])] if eos and eos[0] in new else new
                continuations[label] = self.tokenizer.decode(new)
            out[domain] = {"prompt": prompt, "continuations": continuations}
            logging.info("[lm_study] samples for %s: %d models", domain, len(models))
        return out


def bpb_sums(logits, tokens, mask, token_bytes):
    """(sum of next-token NLL in nats, bytes of text the targets stand for) over the mask;
    `token_bytes [V]` is each token's UTF-8 byte count (special tokens, EOS among them, count
    in the NLL, since the model must predict them, but cover no bytes)."""
    total, _ = lm.next_token_nll(logits, tokens, mask)
    return total, jnp.sum(mask * token_bytes[tokens[:, 1:]])


# DAM's starting points (dam.INITS) as the table names them.
DAM_ROWS = {"average": "DAM", "repository": "DAM, repository init (c = 1/K)"}


@workdir_lib.claims_workdir(SPEC)
def run(config, workdir: str) -> dict:
    """Runs (or restores) every stage, scores every method and writes the comparison."""
    study = Study(config, workdir)
    k, seeds = len(study.expert_names), study.seeds
    base = study.base()
    experts = study.experts(base)
    fusion_frozen, fusion_model, frozen_curve = study.fusion(experts, end_to_end=False)
    costs = study.stages.costs
    control_extra = k * costs["experts"] + costs["fusion_frozen"]
    control, control_steps = study.control(base, control_extra)
    inits = split_list(config.dam.inits)
    coeffs = {init: study.dam(experts, init) for init in inits}
    # End to end, K experts train with Adam state: the experts and the control in memory are let
    # go meanwhile (the training gets its own copy, restored from the experts stage) and restored
    # after (SmolLM2's end-to-end fusion peaked at 24 GB on the 24 GB CPU).
    del experts, fusion_frozen, control
    fusion_e2e, _, e2e_curve = study.fusion(study.experts(base), end_to_end=True)
    experts = study.experts(base)
    control, _ = study.control(base, control_extra)
    fusion_frozen, _, _ = study.fusion(experts, end_to_end=False)
    costs = study.stages.costs

    plain = study.plain_logits

    def fusion_logits(params, tokens):
        return fusion_model.apply({"params": params}, tokens[:, :-1])

    rng = jax.random.key(config.seed)
    base_flops, expert_flops = costs["base"], costs["base"] + k * costs["experts"]
    pretrained_base = study.base_path is not None

    no_expert = [n for i, n in enumerate(study.names) if i not in study.expert_domain]
    oracle_label = "own expert per domain (oracle routing)" + (
        f"; the base for {', '.join(no_expert)}" if no_expert else "")  # fmt: skip

    def merge_of(row, hp):
        # A parameter at a time (the working memory is one tensor's K task vectors); a merge
        # that draws (DARE) takes each parameter's masks from fold_in(key, its index).
        def make(e, b, hp, i):
            return row.merge(e, b, jax.random.fold_in(rng, i), hp)

        return engine.merge_per_leaf(make, experts, base, len(seeds))(hp)

    dam_merged = {}
    for init in inits:
        dam_merged[init] = jax.vmap(lambda c, e: dam.merge(c, e))(coeffs[init], experts)
    # Each row's training FLOPs, the base's and experts' included.
    cost = {"base": base_flops, "ensemble": expert_flops, "merge": expert_flops,
            "fusion_frozen": expert_flops + costs["fusion_frozen"],
            "fusion_e2e": expert_flops + costs["fusion_e2e"]}  # fmt: skip
    table = engine.Table(
        apply=plain, ensemble=lambda mode: engine.output_ensemble(plain, mode), base=base,
        experts=experts, names=study.expert_names,
        base_label=("base model (pretrained, untouched)" if pretrained_base
                    else "base model (mixture)"),
        oracle=engine.Method(oracle_label, plain, experts, expert_flops, per_task=True),
        controls=[engine.Method(
            f"control: base + {control_steps} steps (experts' + fusion's FLOPs)", plain, control,
            base_flops + costs["control"])],
        cost=cost.get, grid=config.grid, merge=merge_of,
        holdout=lambda m: {"holdout_bits_per_byte": study.score(plain, m, "holdout").mean(1)},
        rank=lambda scores: (scores["holdout_bits_per_byte"],),
        dam=[engine.Method(DAM_ROWS[init], plain, dam_merged[init], expert_flops + costs[
            "dam" if init == "repository" else f"dam_{init}"]) for init in inits],
        fusion=fusion_logits, fusion_frozen=fusion_frozen, fusion_e2e=fusion_e2e,
    )  # fmt: skip
    rows, ties_merged = [], None
    for method in engine.methods(table, {}):
        rows.append(study.row(method, base))
        if method.label == "TIES":  # kept for the samples; the other merges are let go once scored
            ties_merged = method.params
        del method

    routing = {}
    for name, params in (("frozen", fusion_frozen), ("end_to_end", fusion_e2e)):
        weights, hits = study.routing(fusion_model, params)
        routing[name] = {"mean_gate_weight": weights.tolist(), "top_is_own_expert": hits.tolist()}
    out = {
        "domains": study.names,
        "experts": study.expert_names,
        "base": os.path.basename(study.base_path) if pretrained_base else "trained here",
        "seeds": seeds,
        "device": jax.devices()[0].platform,
        "control_steps": control_steps,
        "rows": rows,
        "routing": routing,
    }
    chunk = config.train.log_every
    steps = [min(i * chunk, config.train.fusion_steps)
             for i in range(-(-config.train.fusion_steps // chunk) + 1)]  # fmt: skip
    curves = {"frozen": frozen_curve, "end_to_end": e2e_curve}
    out["fusion_selection"] = {
        name: {"steps": steps, "holdout_bits_per_byte": np.asarray(c).tolist()}
        for name, c in curves.items() if c is not None
    }  # fmt: skip
    out["samples"] = study.samples(_sample_models(
        study, base, experts, dam_merged[inits[0]], ties_merged, fusion_model,
        fusion_frozen, fusion_e2e))  # fmt: skip
    engine.write_comparison(
        workdir, out, study_markdown(out),
        [(r["method"], r["flops_per_token"], r["mean_bits_per_byte"]) for r in rows],
        xlabel="forward FLOPs per token", ylabel="mean validation bits per byte",
        title="Bits per byte against inference cost",
    )  # fmt: skip
    plot_routing(out, os.path.join(workdir, "routing.png"))
    plot_gate_tokens(study, fusion_model, fusion_frozen, os.path.join(workdir, "gate_tokens.png"))
    if out["fusion_selection"]:
        plot_selection(out, os.path.join(workdir, "fusion_selection.png"))
    return out


def _sample_models(study, base, experts, dam_merged, ties_merged, fusion_model, frozen, e2e):
    """{label: (step function, cache maker)} of the models the samples table shows (seed 0)."""

    def plain_step(p, t, c, i):
        return study.model.apply({"params": p}, t, c, i)

    def fusion_step(p, t, c, i):
        return fusion_model.apply({"params": p}, t, c, i)

    def plain(params):
        return jax.tree_util.Partial(plain_step, take(params, 0)), functools.partial(
            lm.init_cache, study.cfg, 1)  # fmt: skip

    def fused(params):
        return jax.tree_util.Partial(fusion_step, take(params, 0)), functools.partial(
            lm_fusion.init_fusion_cache, fusion_model.config, 1)  # fmt: skip

    models = {"base": plain(base)}
    for i, name in enumerate(study.expert_names):
        models[f"expert {name}"] = plain(take(experts, (slice(None), i)))
    models["DAM"] = plain(dam_merged)
    models["TIES"] = plain(ties_merged)
    models["fusion, frozen experts"] = fused(frozen)
    models["fusion, end to end"] = fused(e2e)
    return models


def export(config, workdir: str, out_type: str = "float32") -> list[str]:
    """Writes each trained expert of a study on a pretrained base as a checkpoint folder
    (config.json, safetensors, the base's tokenizer files) holding `model.gguf` too:
    `<workdir>/export/expert_<domain>/`. Returns the folders. Reads the stages only."""
    study = Study(config, workdir)
    if study.base_path is None:
        raise UserError(
            "--mode=export writes experts of a study on a pretrained base (config.model.base); "
            "this one trained its own byte-level base"
        )
    if "experts" not in study.stages.costs:
        raise UserError(f"{workdir} has no finished experts stage: train it first")
    hf_config = hc.read_config(study.base_path)
    experts = study.experts(study.base())
    folders = []
    for i, name in enumerate(study.expert_names):
        folder = os.path.join(workdir, "export", f"expert_{name}")
        params = jax.tree.map(np.asarray, take(take(experts, 0), i))
        hc.save(params, hf_config, folder, source=study.base_path)
        gguf_checkpoint.write_gguf(os.path.join(folder, "model.gguf"), hc.read_config(folder),
                                   hc.open_tensors(folder), out_type, study.base_path)  # fmt: skip
        logging.info("[lm_study] exported %s (seed %d) to %s", name, study.seeds[0], folder)
        folders.append(folder)
    return folders


def plot_routing(out: dict, path: str) -> None:
    plt = plots.pyplot()
    names, experts = out["domains"], out.get("experts", out["domains"])
    fig, axes = plt.subplots(1, len(out["routing"]), figsize=(5 * len(out["routing"]), 4))
    for ax, (name, r) in zip(np.atleast_1d(axes), out["routing"].items(), strict=True):
        w = np.mean(np.asarray(r["mean_gate_weight"]), 0)  # [text domain, expert]
        im = ax.imshow(w, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(experts)), experts)
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("expert")
        ax.set_ylabel("text domain")
        ax.set_title(f"mean gate weight ({name})")
        for i in range(len(names)):
            for j in range(len(experts)):
                ax.text(j, i, f"{w[i, j]:.2f}", ha="center", va="center", color="w", fontsize=7)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_selection(out: dict, path: str) -> None:
    """Fusion's holdout bits per byte at every chunk (seed mean), and the step each seed kept."""
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, c in out["fusion_selection"].items():
        curve = np.asarray(c["holdout_bits_per_byte"], float)
        ax.plot(c["steps"], curve.mean(0), marker="o", label=f"fusion, {name}")
        kept = [c["steps"][int(np.nanargmin(seed))] for seed in curve]
        ax.scatter(kept, [np.nanmin(seed) for seed in curve], marker="*", s=120, zorder=3)
    ax.set_xlabel("fusion training step")
    ax.set_ylabel("holdout bits per byte (selection slice)")
    ax.set_title("Fusion on held-out text; stars: the step kept")
    ax.legend()
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
    plt = plots.pyplot()
    tokens = switching_paragraph(study)
    w = study.gate(model, params, tokens)[0]  # [L, K]
    chars = [study.tokenizer.decode([int(t)]).strip()[:6] or "·" for t in tokens[0, :-1]]
    fig, ax = plt.subplots(figsize=(max(8, len(chars) / 10), 2.5))
    ax.imshow(w.T, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(study.expert_names)), study.expert_names)
    step = max(1, len(chars) // 64)
    ax.set_xticks(range(0, len(chars), step), chars[::step], fontsize=6)
    ax.axvline(study.config.model.seq_len // 2 - 0.5, color="r")
    ax.set_title(f"gate per token (seed {study.seeds[0]}): {study.names[0]} text, then "
                 f"{study.names[1]} from the red line")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
