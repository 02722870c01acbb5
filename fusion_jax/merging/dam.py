"""DAM (Differentiable Adaptive Merging): trainable per-feature merge coefficients.

`coefficients` is a tree shaped like the stacked experts, one coefficient array per leaf:
  kernel    [K, in, out] -> [K, in]  one per input feature, broadcast over outputs
  embedding [K, V, d]    -> [K, d]   one per feature dimension, broadcast over the vocabulary
  scale     [K, d]       -> [K, d]   one per feature
  bias      [K, ...]     -> [K]      one scalar per expert (Dense and LayerNorm biases alike)
Kernels with more than one input axis (DenseGeneral) get one coefficient per entry of their first
axis. The merged leaf is sum_k f(c_k) * W_k; only the coefficients train, the experts stay frozen.
"""

import jax
import jax.numpy as jnp

from fusion_jax.merging.static import HIGHEST, _path_str, num_experts

NONLINEARITIES = {
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "relu": jax.nn.relu,
    "none": lambda c: c,
}


def _leaf_name(path):
    """The Flax name of a leaf: the last key of its path (dict key or attribute name)."""
    return getattr(path[-1], "key", getattr(path[-1], "name", None)) if path else None


def _coefficient_shape(path, leaf) -> tuple[int, ...]:
    """Coefficient shape for one stacked leaf, chosen by its Flax name."""
    name = _leaf_name(path)
    shape = jnp.shape(leaf)
    where = _path_str(path)
    if name == "kernel":
        if len(shape) < 3:
            raise ValueError(f"kernel {where!r} has stacked shape {shape}; expected [K, in, out]")
        return shape[:2]
    if name == "embedding":
        if len(shape) != 3:
            raise ValueError(f"embedding {where!r} has stacked shape {shape}; expected [K, V, d]")
        return (shape[0], shape[2])
    if name == "scale":
        if len(shape) != 2:
            raise ValueError(f"scale {where!r} has stacked shape {shape}; expected [K, d]")
        return shape
    if name == "bias":
        return shape[:1]
    raise ValueError(
        f"DAM has no coefficient rule for leaf {where!r} (name {name!r}); "
        "known leaf names: kernel, embedding, scale, bias"
    )


# Coefficient groups of language models; the DAM repository trains "linear" only.
GROUPS = ("linear", "embedding", "norm")


def coefficient_groups(coefficients) -> dict:
    """Per coefficient leaf its DAM group: linear (kernels and biases of the decoder's Dense
    layers), embedding (token/position embeddings and the LM head), norm (norm scales/biases)."""

    def group(path, _):
        keys = [getattr(p, "key", None) for p in path]
        if keys[-1] == "embedding" or "lm_head" in keys:
            return "embedding"
        if keys[-1] == "scale" or any(str(k).startswith(("ln_", "norm")) for k in keys):
            return "norm"
        return "linear"

    return jax.tree.map_with_path(group, coefficients)


# Where DAM's coefficients start: "average" makes f(c) = 1/K, so the merged model starts as the
# weight average; "repository" sets c = 1/K as the DAM repository does (under tanh every layer
# then starts at K tanh(1/K) of the average: 0.96 for K = 3).
INITS = ("average", "repository")
_INVERSE = {"tanh": jnp.arctanh, "sigmoid": jax.scipy.special.logit, "none": lambda c: c}


def initial_value(k: int, init: str = "repository", nonlinearity: str = "tanh") -> float:
    """The starting coefficient for K experts under `init` (one of `INITS`)."""
    if init not in INITS:
        raise ValueError(f"unknown DAM init {init!r}; known: {', '.join(INITS)}")
    if init == "repository" or nonlinearity == "relu":  # relu is the identity at 1/K > 0
        return 1.0 / k
    return float(_INVERSE[nonlinearity](jnp.float32(1.0 / k)))


def init_coefficients(stacked, init=None):
    """A coefficient tree for `stacked` (shapes in the module docstring), every entry `init`.

    `init` defaults to 1/K (`initial_value` gives the other starting points).
    """
    k = num_experts(stacked)
    value = 1.0 / k if init is None else float(init)
    return jax.tree.map_with_path(
        lambda path, leaf: jnp.full(_coefficient_shape(path, leaf), value, jnp.float32), stacked
    )


def _broadcast(path, c, leaf):
    """Reshape coefficients `c` so they multiply the stacked leaf elementwise."""
    expected = _coefficient_shape(path, leaf)
    if c.shape != expected:
        raise ValueError(
            f"coefficients for {_path_str(path)!r} have shape {c.shape}, expected {expected}"
        )
    if _leaf_name(path) == "embedding":
        return c[:, None, :]
    return c.reshape(c.shape + (1,) * (leaf.ndim - c.ndim))


def merge(coefficients, stacked, nonlinearity="tanh"):
    """Merged single-model tree: each leaf is sum_k f(c_k) * W_k, cast to the experts' dtype."""
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"unknown nonlinearity {nonlinearity!r}; known: {sorted(NONLINEARITIES)}")
    f = NONLINEARITIES[nonlinearity]
    num_experts(stacked)
    if jax.tree.structure(coefficients) != jax.tree.structure(stacked):
        raise ValueError("coefficients do not have the same tree structure as the stacked experts")

    def combine(path, leaf, c):
        return jnp.sum(_broadcast(path, f(c), leaf) * leaf, axis=0).astype(leaf.dtype)

    return jax.tree.map_with_path(combine, stacked, coefficients)


def _mean_pairwise_cosine(vectors):
    """Mean cosine similarity over expert pairs i < j of the rows of `vectors [K, n]`."""
    k = vectors.shape[0]
    if k < 2:
        return jnp.zeros((), jnp.float32)
    sq = jnp.sum(vectors * vectors, axis=1)
    # The floor keeps the norm (and its gradient) finite if a coefficient vector reaches zero.
    dots = jnp.matmul(vectors, vectors.T, precision=HIGHEST)
    cos = dots / jnp.sqrt(jnp.maximum(sq[:, None] * sq[None, :], 1e-24))
    i, j = jnp.triu_indices(k, 1)
    return jnp.mean(cos[i, j])


SIMILARITIES = ("whole_model", "per_layer")


def similarity(coefficients, k, granularity="whole_model"):
    """The cosine-similarity regulariser.

    whole_model: one vector per expert holding all its coefficients. per_layer (the DAM
    repository's): for each coefficient vector leaf (`[K, n]`, n > 1), the mean pairwise cosine,
    summed over leaves; scalar bias coefficients have no direction and are left out.
    """
    leaves = jax.tree.leaves(coefficients)
    if granularity == "whole_model":
        return _mean_pairwise_cosine(jnp.concatenate([c.reshape(k, -1) for c in leaves], axis=1))
    if granularity == "per_layer":
        layers = [c.reshape(k, -1) for c in leaves if c.ndim > 1 and c.size > k]
        return sum((_mean_pairwise_cosine(v) for v in layers), jnp.zeros((), jnp.float32))
    raise ValueError(f"unknown similarity {granularity!r}; known: {', '.join(SIMILARITIES)}")


def _masked_mean(x, mask):
    """Mean of `x [K, B, ...]` per expert, over the entries where `mask` is 1 (all if None)."""
    x = x.reshape(x.shape[0], -1)
    if mask is None:
        return jnp.mean(x, axis=-1)
    mask = mask.reshape(mask.shape[0], -1).astype(x.dtype)
    return jnp.sum(x * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def dam_loss(
    coefficients,
    stacked,
    apply_fn,
    inputs_per_expert,
    temperature=2.0,
    similarity_weight=0.01,
    l1_weight=0.0,
    l2_weight=0.0,
    nonlinearity="tanh",
    mask_per_expert=None,
    similarity_granularity="whole_model",
    trainable=None,
):
    """DAM objective; returns (loss, aux) for `jax.value_and_grad(..., has_aux=True)`.

    `apply_fn(params, inputs) -> logits [B, ..., C]` runs one plain model; `inputs_per_expert` is
    `[K, B, ...]`, expert k's own batch, and `mask_per_expert` (optional, `[K, B, ...]` matching
    the logits without C) marks the positions that count (1) and padding (0). Loss = sum_k T^2 *
    KL(p_k || q_k) averaged over expert k's counted positions, with p_k, q_k the temperature-T
    softmaxes of expert k's and the merged model's logits on batch k; plus similarity_weight *
    `similarity(...)`, plus the DAM repository's L1/L2: sums over coefficient vectors of their
    L1 and L2 norms (norms, not squares). `trainable` (a tree of bools like `coefficients`)
    freezes the False leaves (no gradient) and keeps them out of the regularisers.
    aux: loss, kl, kl_per_expert [K], similarity, l1, l2.
    """
    k = num_experts(stacked)
    if jax.tree.leaves(inputs_per_expert)[0].shape[0] != k:
        raise ValueError(f"inputs_per_expert must have a leading axis of K={k} expert batches")
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if trainable is not None:
        coefficients = jax.tree.map(
            lambda c, t: c if t else jax.lax.stop_gradient(c), coefficients, trainable
        )
    merged = merge(coefficients, stacked, nonlinearity)
    expert_logits = jax.lax.stop_gradient(jax.vmap(apply_fn)(stacked, inputs_per_expert))
    merged_logits = jax.vmap(apply_fn, in_axes=(None, 0))(merged, inputs_per_expert)
    log_p = jax.nn.log_softmax(expert_logits / temperature, axis=-1)
    log_q = jax.nn.log_softmax(merged_logits / temperature, axis=-1)
    kl_per_position = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    kl_per_expert = temperature**2 * _masked_mean(kl_per_position, mask_per_expert)
    kl = jnp.sum(kl_per_expert)
    regularised = coefficients
    if trainable is not None:
        regularised = [
            c
            for c, t in zip(jax.tree.leaves(coefficients), jax.tree.leaves(trainable), strict=True)
            if t
        ]
    sim = similarity(regularised, k, similarity_granularity)
    vectors = [c.reshape(k, -1) for c in jax.tree.leaves(regularised)]
    l1 = sum((jnp.sum(jnp.abs(v)) for v in vectors), jnp.zeros((), jnp.float32))
    # The floor keeps the norm's gradient finite at a zero vector.
    l2 = sum(
        (jnp.sum(jnp.sqrt(jnp.maximum(jnp.sum(v * v, axis=1), 1e-24))) for v in vectors),
        jnp.zeros((), jnp.float32),
    )
    loss = kl + similarity_weight * sim + l1_weight * l1 + l2_weight * l2
    aux = {
        "loss": loss,
        "kl": kl,
        "kl_per_expert": kl_per_expert,
        "similarity": sim,
        "l1": l1,
        "l2": l2,
    }
    return loss, aux
