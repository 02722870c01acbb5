"""Dynamic fusion of Hugging Face language models: train the gate on local text, then generate.

    python main.py --config=configs/lm_fuse.py --workdir=runs/f \
        --config.models=DIR_A,DIR_B --config.data.sources='texts/**/*.txt'
    python main.py --config=configs/lm_fuse.py --workdir=runs/f --mode=generate \
        --config.generate.prompt='Once upon a time'   # the model comes from the workdir

The experts stay frozen by default (only the gate and the fusion head train, and only those are
checkpointed; the experts are re-read from their directories, whose sha256 are recorded in
`<workdir>/experts.json` and checked on every resume); `config.train.end_to_end=True` trains and
saves everything. Orbax checkpoints under `<workdir>/checkpoints`; a rerun resumes from the latest
and an interrupted run saves its last step on the way out. Batches are drawn with
`fold_in(seed key, step)`, so a resumed run sees the batches of an uninterrupted one. Each batch
is split over `config.train.num_devices` local devices (0 = all), the model replicated on each.
"""

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from fusion_jax import files
from fusion_jax import hf_checkpoint as hc
from fusion_jax import mesh as mesh_lib
from fusion_jax import workdir as workdir_lib
from fusion_jax.data import text, tokenize
from fusion_jax.errors import UserError
from fusion_jax.models import decoding, lm, lm_fusion
from fusion_jax.schema import split_list
from fusion_jax.specs.lm_fuse import SPEC
from fusion_jax.train import checkpoint, chunks, logs


class Setup:
    """Experts, model, tokenizer and data for a fusion workdir. With a `mesh`, the experts are
    stacked straight onto their shards (mesh.RULES)."""

    def __init__(self, config, workdir: str, load_data: bool = True, mesh=None):
        self.config = config
        models = split_list(config.models)
        if len(models) < 2:
            raise UserError(f"config.models needs at least 2 expert directories, got {models}")
        lm_config, _, _ = hc.check_compatible(models)
        lm_config = dataclasses.replace(
            lm_config, dtype=config.compute_dtype, matmul_precision=config.matmul_precision
        )
        hc.check_inputs(os.path.join(workdir, "experts.json"), hc.input_records(models))
        # Frozen experts stay in their stored dtype (half the memory of float32 for bfloat16
        # checkpoints; each matmul casts to the compute dtype, exactly as a float32 copy would).
        # Trained ones (end_to_end) need float32 for their updates.
        dtype = "float32" if config.train.end_to_end else None
        expert_params = [hc.load(m, dtype)[1] for m in models]
        f = config.fusion
        self.fusion_config = lm_fusion.fusion_config(
            lm_config,
            len(models),
            gate_dim=f.gate_dim,
            temperature=f.temperature,
            top_k=f.top_k,
            balance_weight=f.balance_weight,
            entropy_weight=f.entropy_weight,
        )
        self.model = lm_fusion.LMFusion(self.fusion_config)
        if mesh is not None:
            expert_params = mesh_lib.stack_onto(expert_params, mesh)
        self.params = lm_fusion.init_from_experts(
            self.model, jax.random.key(config.seed), expert_params
        )
        tok = config.data.tokenizer
        self.tokenizer = tokenize.load_tokenizer(models[0] if tok == "model" else tok)
        if load_data:
            self._load_data(workdir)

    def _load_data(self, workdir: str):
        d = self.config.data
        paths = text.text_files(d.sources)  # empty and binary sources refused by name
        # The text is part of the workdir's identity: a resume on other text would mix the two.
        hc.check_inputs(os.path.join(workdir, "text.json"), hc.input_records(paths), "text files")
        docs = text.read_documents(paths, d.record_separator or None)
        # Two or more documents (specs/lm_fuse.py): both splits get one.
        train_docs, val_docs = text.split_documents(docs, self.config.seed, d.val_fraction)
        eos = getattr(self.tokenizer, "eos_id", None)
        pad = self.tokenizer.pad_id

        encode = self.tokenizer.encode_document if d.special_tokens else self.tokenizer.encode

        def pack(ds):
            return text.pack([encode(x) for x in ds], d.seq_len, eos, pad)

        self.train, self.val = pack(train_docs), pack(val_docs)
        vocab = self.fusion_config.expert.vocab_size
        top = max(int(self.train[0].max()), int(self.val[0].max()))
        if top >= vocab:
            raise UserError(
                f"config.data.tokenizer gives token ids up to {top} but the experts' "
                f"vocab_size is {vocab}"
            )

    def split(self, params):
        """(trainable, frozen): without end_to_end the experts are frozen."""
        if self.config.train.end_to_end:
            return params, {}
        return {k: v for k, v in params.items() if k != "experts"}, {"experts": params["experts"]}


def _empty_window() -> dict:
    return {"loss_sum": jnp.zeros((), jnp.float32), "loss_count": jnp.zeros((), jnp.int32)}


def _initial_state(tx, trainable) -> dict:
    """Step, trainable params, optimiser state and the training loss summed since the last log
    line (checkpointed, so a resumed run logs the means of an uninterrupted one)."""
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": trainable,
        "opt_state": tx.init(trainable),
        **_empty_window(),
    }


def _restore(mngr, state: dict) -> dict:
    """The newest checkpoint; one written before the loss window was saved with the state (it
    holds step, params and opt_state only) restores with an empty window."""
    try:
        return checkpoint.restore(mngr, state)
    except checkpoint.ShapeMismatch:
        legacy = {k: state[k] for k in ("step", "params", "opt_state")}
        return {**checkpoint.restore(mngr, legacy), **_empty_window()}


def _loss_fn(model, trainable, frozen, tokens, mask):
    """Mean next-token cross-entropy over the mask, plus the gate's sown regularisers."""
    params = {**trainable, **jax.lax.stop_gradient(frozen)}
    logits, extra = model.apply({"params": params}, tokens[:, :-1], mutable=["aux_loss"])
    loss = lm.mean_nll(logits, tokens, mask)
    return loss + lm.sown_losses(extra), loss


# Parameters and data reach every jitted function below as arguments: arrays a jitted function
# closes over become constants of its program, compiled into it and held twice (gigabytes for
# real experts).


def evaluate(setup: Setup, params, tokens, mask, batch_size: int) -> float:
    """Mean next-token loss (nats per token) over every window of a split."""
    trainable, frozen = setup.split(params)

    @jax.jit
    def batch_sums(trainable, frozen, t, m):
        _, loss = _loss_fn(setup.model, trainable, frozen, t, m)
        return loss * jnp.sum(m), jnp.sum(m)

    total, count = 0.0, 0.0
    for i in range(0, len(tokens), batch_size):
        s, c = batch_sums(trainable, frozen, tokens[i : i + batch_size], mask[i : i + batch_size])
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)


def train_step(setup: Setup, tx, batch_size: int, key, batch_sharding, state_shardings):
    """The jitted update `(state, frozen, tokens, mask) -> state`: a batch of `batch_size`
    windows drawn with `fold_in(key, step)` from the training split `tokens`, `mask`.

    On the run's mesh, `batch_sharding` splits the batch over its `data` axis (XLA sums the
    gradients across devices) and the new state keeps `state_shardings` (parameters and moments
    split over `model` by mesh.RULES)."""

    def split(x):
        return jax.lax.with_sharding_constraint(x, batch_sharding)

    @functools.partial(jax.jit, out_shardings=state_shardings)
    def step_fn(state, frozen, tokens, mask):
        idx = jax.random.randint(
            jax.random.fold_in(key, state["step"]), (batch_size,), 0, tokens.shape[0]
        )
        batch_tokens, batch_mask = split(tokens[idx]), split(mask[idx])
        (_, loss), grads = jax.value_and_grad(
            lambda p: _loss_fn(setup.model, p, frozen, batch_tokens, batch_mask), has_aux=True
        )(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {
            "step": state["step"] + 1,
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
            "loss_sum": state["loss_sum"] + loss,
            "loss_count": state["loss_count"] + 1,
        }

    return step_fn


@workdir_lib.claims_workdir(SPEC)
def train(config, workdir: str) -> dict:
    """Trains the fusion gate (and head; everything with end_to_end), resuming if possible."""
    t = config.train
    mesh = mesh_lib.make(t.mesh, mesh_lib.devices(t.mesh, t.num_devices))
    setup = Setup(config, workdir, mesh=mesh)
    tx = optax.adamw(t.learning_rate, weight_decay=t.weight_decay)
    trainable, frozen = setup.split(setup.params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = mesh_lib.place(_initial_state(tx, trainable), mesh)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    frozen = mesh_lib.place(frozen, mesh)
    train_tokens, train_mask = jax.device_put(setup.train, replicated)
    step_fn = train_step(setup, tx, t.batch_size, jax.random.key(config.seed),
                         mesh_lib.batch(mesh), shardings)  # fmt: skip
    # Beside the compiled step's per-device plan (logged at its compile): what the models weigh.
    logging.info("[lm_fuse] mesh %s: the batch of %d split over data, the models (%.3f GB in all) "
                 "over model", dict(mesh.shape), t.batch_size,
                 mesh_lib.nbytes(setup.params) / 1e9)  # fmt: skip

    mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"), max_to_keep=2)
    log_path = os.path.join(workdir, "metrics.jsonl")
    tokens_per_step = t.batch_size * config.data.seq_len

    compiled = []  # the step, compiled at its first call with its memory plan logged

    def run_chunk(state, n):
        if not compiled:
            args = (state, frozen, train_tokens, train_mask)
            compiled.append(chunks.compile_reporting("[lm_fuse] training step", step_fn, *args))
        for _ in range(n):
            state = compiled[0](state, frozen, train_tokens, train_mask)
        done = int(state["step"])
        if done % t.log_every and done != t.num_steps:
            return state, {}
        # The loss window ends at each log line; it is part of the state (and of its saves), so
        # a run resumed between log lines logs the means of an uninterrupted one.
        mean = state["loss_sum"] / state["loss_count"]
        # Placed as the state is: a differently placed window would retrace the step.
        return {**state, **jax.device_put(_empty_window(), replicated)}, {"train_loss": mean}

    def log(metrics, done):
        if metrics:
            logs.append(log_path, [{"step": done, "train_loss": float(metrics["train_loss"])}])

    def report(metrics, done, rate, compile_secs):
        if metrics:
            logging.info(
                "[lm_fuse] step %d/%d  loss %.4f  %.0f tokens/s  ETA %.0f s",
                done, t.num_steps, metrics["train_loss"], rate * tokens_per_step,
                (t.num_steps - done) / rate,
            )  # fmt: skip

    try:
        if mngr.latest_step() is not None:
            state = _restore(mngr, state)
            logging.info("[lm_fuse] resumed at step %d", int(state["step"]))
        start = int(state["step"])
        logs.truncate(log_path, start)  # lines written after the checkpoint a rerun starts from
        state = chunks.train_in_chunks(
            "[lm_fuse]", run_chunk, jax.device_put(state, shardings), start, t.num_steps,
            mngr=mngr, chunk=t.log_every, log=log, report=report,
            every_steps=t.checkpoint_every,
        )  # fmt: skip
    finally:
        mngr.close()
    params = {**state["params"], **frozen}
    val_loss = evaluate(setup, params, *setup.val, t.batch_size)
    expert_losses = _expert_val_losses(setup)
    info = {
        "steps": int(state["step"]),
        "val_loss": val_loss,
        "val_bits_per_token": val_loss / math.log(2),
        "expert_val_loss": expert_losses,
        "end_to_end": bool(t.end_to_end),
    }
    files.write_json(os.path.join(workdir, "fusion_info.json"), info)
    logging.info("[lm_fuse] validation loss %.4f (experts: %s)", val_loss, expert_losses)
    return info


def _expert_val_losses(setup: Setup) -> list[float]:
    """Each expert alone (with its own head) on the validation split, for comparison."""
    model = lm.LanguageModel(setup.fusion_config.expert)
    tokens, mask = setup.val
    size = setup.config.train.batch_size

    @jax.jit
    def sums(p, t, m):
        return lm.next_token_nll(model.apply({"params": p}, t[:, :-1]), t, m)

    out = []
    for directory in split_list(setup.config.models):
        _, p = hc.load(directory)  # stored dtype: the same numbers as float32, half the memory
        total = count = 0.0
        for i in range(0, len(tokens), size):
            s, c = sums(p, tokens[i : i + size], mask[i : i + size])
            total, count = total + float(s), count + float(c)
        out.append(total / max(count, 1.0))
    return out


def restore_params(setup: Setup, workdir: str):
    """The trained fusion params of a workdir (latest checkpoint)."""
    tx = optax.adamw(setup.config.train.learning_rate, weight_decay=setup.config.train.weight_decay)
    trainable, frozen = setup.split(setup.params)
    mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"), max_to_keep=2)
    try:
        state = _restore(mngr, _initial_state(tx, trainable))
    finally:
        mngr.close()
    return {**state["params"], **frozen}


def generate(config, workdir: str) -> str:
    """Continues `config.generate.prompt` with the trained fusion model; prints and returns it."""
    g = config.generate
    if g.max_new_tokens < 1 or g.temperature < 0:
        raise UserError("config.generate.max_new_tokens must be >= 1 and temperature >= 0")
    # Setup records the experts on first use; a workdir that never trained must stay untouched.
    if not os.path.exists(os.path.join(workdir, "experts.json")):
        raise UserError(f"{workdir} holds no trained fusion model: train it first (--mode=train)")
    setup = Setup(config, workdir, load_data=False)
    prompt = setup.tokenizer.encode_prompt(g.prompt)
    if not setup.tokenizer.encode(g.prompt):  # a prompt of special tokens only
        raise UserError("config.generate.prompt is empty")
    max_len = setup.fusion_config.expert.max_len
    if len(prompt) + g.max_new_tokens > max_len:
        raise UserError(
            f"prompt ({len(prompt)} tokens) + config.generate.max_new_tokens "
            f"({g.max_new_tokens}) exceeds the experts' {max_len} positions"
        )
    params = restore_params(setup, workdir)
    model = setup.model
    step_fn = jax.tree_util.Partial(lambda p, t, c, i: model.apply({"params": p}, t, c, i), params)
    cache = lm_fusion.init_fusion_cache(setup.fusion_config, 1, len(prompt) + g.max_new_tokens)
    # The experts' own end of sequence, or the end the configured tokenizer packed the text with.
    if config.data.tokenizer == "model":
        eos_ids = hc.eos_token_ids(split_list(config.models)[0])
    else:
        eos_ids = () if setup.tokenizer.eos_id is None else (setup.tokenizer.eos_id,)
    out = decoding.generate(
        step_fn,
        cache,
        jnp.asarray([prompt], jnp.int32),
        g.max_new_tokens,
        jax.random.key(g.seed),
        g.temperature,
        eos_ids,
    )
    new = np.asarray(out[0, len(prompt) :]).tolist()
    ended = [i for i, token in enumerate(new) if token in eos_ids]
    completion = setup.tokenizer.decode(prompt + new[: ended[0] if ended else len(new)])
    print(completion)
    return completion
