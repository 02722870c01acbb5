"""Static merges: pure functions from a stacked expert tree `[K, ...]` to one model's tree `[...]`.

Every leaf of `stacked` carries a leading expert axis K; `base` (where used) is the same tree
without it. Hyper-parameters that fix shapes or are range-checked (`density`, `drop_rate`,
`combine`, `eps`) are static arguments and must be Python values; mixing weights (`lam`, `t`,
`weights`) may be traced.
"""

import concurrent.futures
import dataclasses
import functools
import inspect
import itertools
import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# The precision of the merges' few dots (weighted sums, SLERP's cosine): see `weight_average`.
HIGHEST = jax.lax.Precision.HIGHEST


def _path_str(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def num_experts(stacked) -> int:
    """The shared leading axis K of every leaf of `stacked`; raises if leaves disagree."""
    leaves = jax.tree.leaves_with_path(stacked)
    if not leaves:
        raise ValueError("stacked parameter tree has no leaves")
    sizes = {}
    for path, leaf in leaves:
        if jnp.ndim(leaf) == 0:
            raise ValueError(f"leaf {_path_str(path)!r} is a scalar; it has no expert axis")
        sizes.setdefault(jnp.shape(leaf)[0], _path_str(path))
    if len(sizes) > 1:
        found = ", ".join(f"K={k} at {p!r}" for k, p in sizes.items())
        raise ValueError(f"leaves disagree on the number of experts: {found}")
    return next(iter(sizes))


def _check_base(stacked, base) -> None:
    if jax.tree.structure(base) != jax.tree.structure(stacked):
        raise ValueError("base does not have the same tree structure as the stacked experts")
    for (path, s), b in zip(jax.tree.leaves_with_path(stacked), jax.tree.leaves(base), strict=True):
        if jnp.shape(s)[1:] != jnp.shape(b):
            raise ValueError(
                f"leaf {_path_str(path)!r}: base shape {jnp.shape(b)} does not match "
                f"expert shape {jnp.shape(s)[1:]}"
            )


def _compute_dtype(x):
    # Merging in at least float32 keeps bf16 experts from losing the small task-vector differences.
    return jnp.promote_types(x.dtype, jnp.float32)


def _task_vectors(stacked, base):
    """tau_k = expert_k - base, leaf-wise `[K, ...]`, in the compute dtype."""
    num_experts(stacked)
    _check_base(stacked, base)
    return jax.tree.map(
        lambda s, b: s.astype(_compute_dtype(s)) - b.astype(_compute_dtype(s))[None], stacked, base
    )


def _apply_to_base(base, merged, lam):
    """base + lam * merged, cast back to each base leaf's dtype."""
    return jax.tree.map(lambda b, m: (b.astype(m.dtype) + lam * m).astype(b.dtype), base, merged)


def _check_density(density) -> None:
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")


def _mixing_weights(stacked, weights):
    """`weights` `[K]` (None: uniform) normalised to sum 1, checked against the experts."""
    k = num_experts(stacked)
    w = jnp.ones((k,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    if w.shape != (k,):
        raise ValueError(f"weights must have shape ({k},) for K={k} experts, got {w.shape}")
    return w / jnp.sum(w)


# Each public merge is one jitted program (static: the range-checked numbers) so that eager callers
# compile once per tree instead of once per operation; inside an outer jit it simply inlines.
@jax.jit
def weight_average(stacked, weights=None):
    """Model soup: sum_k w_k * expert_k with `weights` `[K]` normalised to sum 1 (default uniform).

    `weights` must have a non-zero sum.
    """
    w = _mixing_weights(stacked, weights)

    def average(x):
        dtype = _compute_dtype(x)
        if x.dtype != dtype:
            # bfloat16/float16 experts: summed expert by expert in float32, which XLA:CPU fuses
            # into one pass (its dot converted first and ran 25x slower on [3, 8M]). Float32
            # keeps the dot, whose rounding the studies' numbers carry.
            terms = [w[k].astype(dtype) * x[k].astype(dtype) for k in range(x.shape[0])]
            return functools.reduce(jnp.add, terms).astype(x.dtype)
        # HIGHEST: a merge is float32 arithmetic whatever the backend's default (one bfloat16
        # pass on a TPU, TF32 on recent GPUs), like the element-wise merges.
        y = jnp.tensordot(w.astype(dtype), x, axes=1, precision=HIGHEST)
        return y.astype(x.dtype)

    return jax.tree.map(average, stacked)


@jax.jit
def task_arithmetic(stacked, base, lam):
    """base + lam * sum_k (expert_k - base)."""
    tau = _task_vectors(stacked, base)
    return _apply_to_base(base, jax.tree.map(lambda t: jnp.sum(t, axis=0), tau), lam)


def _trim(tau, density):
    """Per expert, keep the ceil(density * n) largest-magnitude entries of tau `[K, ...]`.

    Entries tied with the smallest kept magnitude are kept too: a threshold avoids a scatter.
    """
    flat = tau.reshape(tau.shape[0], -1)
    n = flat.shape[1]
    keep = _kept(n, density)
    if keep >= n:
        return tau
    return _cut(tau, _kth_largest(jnp.abs(flat), keep))


def _kept(n: int, density) -> int:
    # round() first so that e.g. 0.3 * 10 = 3.0000000000000004 keeps 3 entries, not 4.
    return max(1, math.ceil(round(density * n, 6)))


def _cut(tau, thresholds):
    """Entries of tau `[K, ...]` whose magnitude reaches expert k's threshold (`[K]`), else 0."""
    thresholds = thresholds.reshape((-1,) + (1,) * (tau.ndim - 1))
    return jnp.where(jnp.abs(tau) >= thresholds, tau, 0)


def ties_threshold(expert: np.ndarray, base: np.ndarray, density) -> np.ndarray:
    """The magnitude at which TIES cuts one expert's whole task vector (its `_trim` threshold;
    0 keeps everything), in NumPy, one expert at a time: the row-block form of TIES
    (`BLOCKWISE`) needs the thresholds of whole tensors before it merges any block."""
    tau = expert.astype(_compute_dtype(expert)).reshape(-1)  # a copy: the inputs stay
    np.subtract(tau, base.reshape(-1), out=tau)  # as `_task_vectors`: base cast to tau's dtype
    keep = _kept(tau.size, density)
    if keep >= tau.size:
        return np.zeros((), tau.dtype)
    np.abs(tau, out=tau)
    tau.partition(tau.size - keep)  # in place: no second copy of the tensor
    return tau[tau.size - keep]


@jax.jit
def ties_given_thresholds(stacked, base, thresholds, lam):
    """TIES with each expert's trim threshold given (`[K]`, from `ties_threshold`): element-wise,
    so a row block of a tensor merges to that block of `ties`' result. One-leaf trees."""
    tau = _task_vectors(stacked, base)
    return _apply_to_base(base, jax.tree.map(lambda t: _disjoint_mean(_cut(t, thresholds)), tau),
                          lam)  # fmt: skip


def _kth_largest(x, k: int):
    """Per row of non-negative `x [K, n]`, its k-th largest value, exactly.

    On CPU, NumPy's introselect (`np.partition`), one thread per row: 0.17 s for a [3, 24.6M]
    tensor on 2 cores, against 3.2 s for `_bisect_kth` and about 19 s for `lax.top_k`,
    which costs a full sort when k ~ n/2. Elsewhere (an accelerator, where a host round trip
    would cost more than it saves), bisection on the bit pattern: non-negative IEEE floats
    order like their bits read as integers, so the answer is the largest pattern t with
    count(x >= t) >= k, one counting pass per bit.
    """

    def select(rows):
        rows = np.asarray(rows)
        pick = lambda row: np.partition(row, row.size - k)[row.size - k]  # noqa: E731
        return np.asarray(list(_SELECT_POOL.map(pick, rows)), rows.dtype)

    def on_cpu(x):
        return jax.pure_callback(
            select, jax.ShapeDtypeStruct(x.shape[:1], x.dtype), x, vmap_method="sequential"
        )

    return jax.lax.platform_dependent(x, cpu=on_cpu, default=functools.partial(_bisect_kth, k=k))


def _bisect_kth(x, k: int):
    """`_kth_largest` off the CPU: bisection on the bit patterns of non-negative `x [K, n]`."""
    int_type = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, int_type)

    def body(_, bounds):
        lo, hi = bounds  # invariant: count(bits >= lo) >= k > count(bits >= hi)
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(bits >= mid[:, None], axis=1) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo = jnp.zeros(x.shape[:1], int_type)
    hi = jnp.max(bits, axis=1) + 1
    lo, _ = jax.lax.fori_loop(0, 8 * x.dtype.itemsize, body, (lo, hi))
    return jax.lax.bitcast_convert_type(lo, x.dtype)


# Threads for the CPU selection: np.partition releases the GIL.
_SELECT_POOL = concurrent.futures.ThreadPoolExecutor(max(1, os.cpu_count() or 1))


def _disjoint_mean(trimmed):
    """Elect a sign per entry by total mass, then average only the experts that agree with it.

    Written expert by expert (K is small and static): XLA:CPU fuses it into one elementwise
    pass, where reductions over the leading axis took 16x longer (1.8 s against 0.11 s for a
    [3, 24.6M] tensor), with the same sums in the same order.
    """
    experts = [trimmed[i] for i in range(trimmed.shape[0])]
    elected = jnp.sign(functools.reduce(jnp.add, experts))
    # Where the mass sums to exactly 0 the elected sign is 0 and no nonzero entry agrees: result 0.
    count = jnp.zeros_like(elected)
    total = jnp.zeros_like(elected)
    for t in experts:
        agree = (t != 0) & (jnp.sign(t) == elected)
        count = count + agree.astype(t.dtype)
        total = total + jnp.where(agree, t, 0)
    return total / jnp.maximum(count, 1)


def _ties_combine(tau, density):
    return jax.tree.map(lambda t: _disjoint_mean(_trim(t, density)), tau)


@functools.partial(jax.jit, static_argnames="density")
def ties(stacked, base, density, lam):
    """TIES: trim each task vector to its top `density` fraction, elect signs, disjoint mean.

    Trimming is per tensor and per expert; the kept count is ceil(density * n), at least 1
    (plus any entries tied with the smallest kept magnitude).
    """
    _check_density(density)
    return _apply_to_base(base, _ties_combine(_task_vectors(stacked, base), density), lam)


def _drop_leaf(key, tau, p):
    """Drop entries of tau `[K, ...]` with prob p and rescale survivors; one key per expert."""
    keys = jax.random.split(key, tau.shape[0])
    # Flat draws, reshaped: threefry over a multi-axis shape compiles several times slower on CPU.
    flat = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - p, (math.prod(tau.shape[1:]),)))(keys)
    return jnp.where(flat.reshape(tau.shape), tau / (1.0 - p), 0)


@functools.partial(jax.jit, static_argnames=("drop_rate", "combine", "density"))
def dare(stacked, base, rng, drop_rate, lam, combine="linear", density=1.0):
    """DARE: drop task-vector entries with prob `drop_rate`, rescale survivors by 1/(1 - p).

    combine="linear": base + lam * sum_k tau_k; combine="ties": TIES on the rescaled task vectors
    (density 1.0 by default, i.e. sign election and disjoint mean without further trimming).
    """
    p = float(drop_rate)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
    if combine not in ("linear", "ties"):
        raise ValueError(f"combine must be 'linear' or 'ties', got {combine!r}")
    if combine == "ties":
        _check_density(density)
    # fold_in(leaf index) gives every leaf its own stream; _drop_leaf splits it per expert.
    leaves, treedef = jax.tree.flatten(_task_vectors(stacked, base))
    dropped = jax.tree.unflatten(
        treedef, [_drop_leaf(jax.random.fold_in(rng, i), t, p) for i, t in enumerate(leaves)]
    )
    if combine == "ties":
        merged = _ties_combine(dropped, density)
    else:
        merged = jax.tree.map(lambda t: jnp.sum(t, axis=0), dropped)
    return _apply_to_base(base, merged, lam)


def _slerp_leaf(x, t, eps):
    """Interpolate x[0] -> x[1] of one leaf `[2, ...]`, flattened, to `[...]`."""
    a = x[0].reshape(-1).astype(_compute_dtype(x))
    b = x[1].reshape(-1).astype(_compute_dtype(x))
    na, nb = jnp.linalg.norm(a), jnp.linalg.norm(b)
    degenerate = (na == 0) | (nb == 0)
    cos = jnp.clip(
        jnp.dot(a, b, precision=HIGHEST) / jnp.where(degenerate, 1.0, na * nb), -1.0, 1.0
    )
    linear = degenerate | (jnp.abs(cos) > 1.0 - eps)
    # A harmless cos on the linear branch keeps its unused slerp weights finite (no 0/0).
    omega = jnp.arccos(jnp.where(linear, 0.0, cos))
    sin_omega = jnp.sin(omega)
    wa = jnp.where(linear, 1.0 - t, jnp.sin((1.0 - t) * omega) / sin_omega)
    wb = jnp.where(linear, t, jnp.sin(t * omega) / sin_omega)
    return (wa * a + wb * b).reshape(x.shape[1:]).astype(x.dtype)


@functools.partial(jax.jit, static_argnames="eps")
def slerp(stacked, t, eps=1e-4):
    """Spherical interpolation between the K=2 experts, per tensor (flattened): t=0 -> expert 0.

    Falls back to linear interpolation where |cos| > 1 - eps (nearly colinear: the slerp weights
    divide by sin(angle) ~ 0) or where either tensor has zero norm (no direction).
    """
    k = num_experts(stacked)
    if k != 2:
        raise ValueError(f"slerp merges exactly 2 experts, got K={k}")
    return jax.tree.map(lambda x: _slerp_leaf(x, t, eps), stacked)


# -- methods after mergekit 0.1.x (merge_methods/, sparsify.py), with uniform model weights -------


def _sum_consensus(d, normalize: bool):
    """TIES's sign consensus on `d [K, ...]`: keep the entries whose sign is that of the total
    mass, then their sum (or, `normalize`, their mean). An exact zero mass elects no sign (0)
    where mergekit elects +1: those entries merge to 0 either way unless an expert's entry is
    exactly 0 there."""
    if normalize:
        return _disjoint_mean(d)
    elected = jnp.sign(functools.reduce(jnp.add, [d[i] for i in range(d.shape[0])]))
    return functools.reduce(
        jnp.add, [jnp.where((d[i] != 0) & (jnp.sign(d[i]) == elected), d[i], 0)
                  for i in range(d.shape[0])],
    )  # fmt: skip


def _band(tau, density, gamma):
    """Breadcrumbs' mask on tau `[K, ...]` (per expert, over the whole tensor): drop the
    int(gamma * n) largest magnitudes, keep the next int(density * n), drop the rest."""
    flat = jnp.abs(tau.reshape(tau.shape[0], -1))
    n = flat.shape[1]
    top, keep = int(gamma * n), int(density * n)
    top = min(top, n - keep)  # mergekit: n_bot = n - keep - top, clipped at 0 by lowering top
    keep_mask = jnp.ones_like(flat, bool)
    if top + keep < n:
        keep_mask = flat >= _kth_largest(flat, top + keep)[:, None]
    if top > 0:
        keep_mask = keep_mask & (flat < _kth_largest(flat, top)[:, None])
    return keep_mask.reshape(tau.shape)


def _breadcrumbs(stacked, base, density, gamma, lam, consensus: bool):
    if not 0.0 <= float(gamma) < 1.0:
        raise ValueError(f"gamma must be in [0, 1), got {gamma}")
    _check_density(density)

    def leaf(t):
        if density < 1.0:
            t = jnp.where(_band(t, density, gamma), t, 0)
        return _sum_consensus(t, False) if consensus else jnp.sum(t, axis=0)

    return _apply_to_base(base, jax.tree.map(leaf, _task_vectors(stacked, base)), lam)


@functools.partial(jax.jit, static_argnames=("density", "gamma"))
def breadcrumbs(stacked, base, density, gamma, lam):
    """Model Breadcrumbs: per expert and tensor, drop the int(gamma * n) largest task-vector
    magnitudes (outliers) and keep the next int(density * n); base + lam * the sum.

    Deviation: at int(gamma * n) = 0 mergekit keeps nothing (its slice `[n_bot:-0]` is empty);
    we drop no outlier and keep the int(density * n) largest. Entries tied with a threshold
    magnitude are kept at the lower one and dropped at the upper one."""
    return _breadcrumbs(stacked, base, density, gamma, lam, consensus=False)


@functools.partial(jax.jit, static_argnames=("density", "gamma"))
def breadcrumbs_ties(stacked, base, density, gamma, lam):
    """`breadcrumbs` with TIES's sign consensus (the agreeing entries summed, not averaged,
    as mergekit's breadcrumbs_ties, whose normalize defaults to False)."""
    return _breadcrumbs(stacked, base, density, gamma, lam, consensus=True)


def _della_drop(key, tau, density, epsilon):
    """DELLA's MAGPRUNE on tau `[K, ...]`: per row (the last axis; a 1-D tensor is one row), an
    entry of magnitude rank r (1 = smallest of n) is kept with probability (density - epsilon)
    + 2 epsilon (r - 1) / (n - 1); then each expert's tensor is scaled back to its L1 norm."""
    rows = tau.reshape(tau.shape[0], -1, tau.shape[-1])
    n = rows.shape[-1]
    rank = jnp.argsort(jnp.argsort(jnp.abs(rows), axis=-1), axis=-1)  # 0 = smallest
    p = (density - epsilon) + 2 * epsilon * rank / max(n - 1, 1)
    keys = jax.random.split(key, tau.shape[0])
    u = jax.vmap(lambda k: jax.random.uniform(k, rows.shape[1:]))(keys)
    kept = jnp.where(u < p, rows, 0).reshape(tau.shape)
    norm = lambda x: jnp.sum(jnp.abs(x.reshape(x.shape[0], -1)), axis=1)  # noqa: E731
    before, after = norm(tau), norm(kept)
    scale = jnp.where((before < 1e-7) | (after < 1e-7), 1.0, before / jnp.maximum(after, 1e-7))
    return kept * scale.reshape((-1,) + (1,) * (tau.ndim - 1))


def _della(stacked, base, rng, density, epsilon, lam, consensus: bool):
    _check_density(density)
    if density < 1.0 and not 0.0 < density - epsilon < density + epsilon < 1.0:
        raise ValueError(
            f"density - epsilon and density + epsilon must lie in (0, 1), got density "
            f"{density} and epsilon {epsilon}"
        )
    leaves, treedef = jax.tree.flatten(_task_vectors(stacked, base))
    merged = []
    for i, t in enumerate(leaves):
        if density < 1.0:
            t = _della_drop(jax.random.fold_in(rng, i), t, density, epsilon)
        merged.append(_sum_consensus(t, True) if consensus else jnp.sum(t, axis=0))
    return _apply_to_base(base, jax.tree.unflatten(treedef, merged), lam)


@functools.partial(jax.jit, static_argnames=("density", "epsilon"))
def della(stacked, base, rng, density, epsilon, lam):
    """DELLA: MAGPRUNE (`_della_drop`), then TIES's sign consensus and the mean of the agreeing
    entries; base + lam * that. As mergekit (not the paper): the pruned tensor is rescaled to
    its L1 norm as a whole, not each kept entry by 1/p; density 1 prunes nothing."""
    return _della(stacked, base, rng, density, epsilon, lam, consensus=True)


@functools.partial(jax.jit, static_argnames=("density", "epsilon"))
def della_linear(stacked, base, rng, density, epsilon, lam):
    """`della` without the sign consensus: base + lam * the sum of the pruned task vectors."""
    return _della(stacked, base, rng, density, epsilon, lam, consensus=False)


def _pair_cosines(tau):
    """Mean over expert pairs of the cosine between flattened task vectors `[K, ...]`."""
    flat = tau.reshape(tau.shape[0], -1)
    norms = jnp.linalg.norm(flat, axis=1)
    dots = jnp.dot(flat, flat.T, precision=HIGHEST)
    cos = jnp.clip(dots / jnp.maximum(norms[:, None] * norms[None, :], 1e-6), -1.0, 1.0)
    i, j = np.triu_indices(flat.shape[0], 1)
    return jnp.mean(cos[i, j])


@jax.jit
def model_stock(stacked, base):
    """Model Stock: per tensor, t = K cos / (1 + (K - 1) cos) from the mean pairwise cosine of
    the flattened task vectors, then t * mean_k(expert_k) + (1 - t) * base (needs K >= 2; for
    K > 2 the mean over pairs is mergekit's choice, as its code says)."""
    if num_experts(stacked) < 2:
        raise ValueError("model_stock needs 2 or more experts")

    def leaf(x, b):
        k = x.shape[0]
        xc = x.astype(_compute_dtype(x))
        cos = _pair_cosines(xc - b.astype(xc.dtype)[None])
        t = k * cos / (1 + (k - 1) * cos)
        return (t * jnp.mean(xc, axis=0) + (1 - t) * b.astype(xc.dtype)).astype(b.dtype)

    return jax.tree.map(leaf, stacked, base)


@functools.partial(jax.jit, static_argnames="select_topk")
def sce(stacked, base, select_topk=1.0):
    """SCE: Select the entries whose task vectors vary most across experts (the top
    int(select_topk * nonzero) by variance, shared by the experts; 1: all), Calculate each
    expert's weight from its mean squared task vector, Erase entries against the elected sign;
    base + the weighted mean of what remains. Entries tied with the variance threshold are kept
    (mergekit's top-k keeps exactly k)."""
    if not 0.0 < float(select_topk) <= 1.0:
        raise ValueError(f"select_topk must be in (0, 1], got {select_topk}")

    def leaf(t):
        k = t.shape[0]
        if select_topk < 1.0:
            var = jnp.var(t, axis=0).reshape(-1)
            keep = jnp.floor(jnp.count_nonzero(var) * select_topk).astype(jnp.int32)
            ordered = jnp.sort(var)[::-1]
            threshold = ordered[jnp.maximum(keep - 1, 0)]
            mask = (var >= threshold) & (keep > 0)
            t = jnp.where(mask.reshape(t.shape[1:])[None], t, 0)
        energy = jnp.mean(jnp.square(t.reshape(k, -1)), axis=1)
        total = jnp.sum(energy)
        w = jnp.where(total < 1e-6, 1.0 / k, energy / jnp.where(total < 1e-6, 1.0, total))
        elected = jnp.sign(functools.reduce(jnp.add, [t[i] for i in range(k)]))
        agree = [(t[i] != 0) & (jnp.sign(t[i]) == elected) for i in range(k)]
        num = functools.reduce(jnp.add, [jnp.where(agree[i], w[i] * t[i], 0) for i in range(k)])
        den = functools.reduce(jnp.add, [jnp.where(agree[i], w[i], 0) for i in range(k)])
        return num / jnp.maximum(den, 1e-6)

    return _apply_to_base(base, jax.tree.map(leaf, _task_vectors(stacked, base)), 1.0)


@functools.partial(jax.jit, static_argnames="eps")
def multislerp(stacked, weights=None, eps=1e-8):
    """Spherical interpolation of K >= 2 experts, per flattened tensor, as mergekit's
    multislerp without a base: the weighted mean direction of the unit tensors, one tangent
    step from it by the weighted tangent components, scaled by the weighted mean norm.
    `weights` (default uniform) are normalised to sum 1. Where the mean direction vanishes
    mergekit raises for K > 2; inside a compiled program we return the weighted sum."""
    k = num_experts(stacked)
    w = _mixing_weights(stacked, weights)

    def leaf(x):
        flat = x.reshape(k, -1).astype(_compute_dtype(x))
        norms = jnp.linalg.norm(flat, axis=1)
        units = flat / (norms[:, None] + eps)
        mean = jnp.tensordot(w, units, axes=1, precision=HIGHEST)
        m_norm = jnp.linalg.norm(mean)
        m_hat = mean / jnp.where(m_norm < eps, 1.0, m_norm)
        tangent = units - jnp.dot(units, m_hat, precision=HIGHEST)[:, None] * m_hat[None]
        step = jnp.tensordot(w, tangent, axes=1, precision=HIGHEST)
        a = jnp.linalg.norm(step) + eps
        out = (m_hat * jnp.cos(a) + step * jnp.sin(a) / a) * jnp.dot(w, norms)
        linear = jnp.tensordot(w, flat, axes=1, precision=HIGHEST)
        return jnp.where(m_norm < eps, linear, out).reshape(x.shape[1:]).astype(x.dtype)

    return jax.tree.map(leaf, stacked)


@functools.partial(jax.jit, static_argnames=("max_iter", "tol"))
def karcher(stacked, max_iter=10, tol=1e-5):
    """The Karcher (Riemannian) mean of the experts' directions on the unit sphere, per
    flattened tensor, scaled by their mean norm (mergekit's karcher: equal weights; tensors of
    norm <= tol have no direction and take no part in it, but count in the mean norm)."""
    k = num_experts(stacked)

    def leaf(x):
        flat = x.reshape(k, -1).astype(_compute_dtype(x))
        norms = jnp.linalg.norm(flat, axis=1)
        valid = norms > tol
        units = jnp.where(valid[:, None], flat / jnp.where(valid, norms, 1.0)[:, None], 0.0)
        alpha = valid / jnp.maximum(jnp.sum(valid), 1)
        start = jnp.tensordot(alpha, units, axes=1, precision=HIGHEST)
        first = units[jnp.argmax(valid)]
        start = jnp.where(jnp.linalg.norm(start) < tol, first,
                          start / jnp.maximum(jnp.linalg.norm(start), tol))  # fmt: skip

        def body(state):
            i, u, _ = state
            cos = jnp.clip(jnp.dot(units, u, precision=HIGHEST), -1.0, 1.0)
            theta = jnp.arccos(cos)
            factor = jnp.where(
                theta < tol, 0.0, theta / jnp.where(theta < tol, 1.0, jnp.sin(theta))
            )
            step = jnp.tensordot(alpha * factor, units - cos[:, None] * u[None], axes=1,
                                 precision=HIGHEST)  # fmt: skip
            size = jnp.linalg.norm(step)
            moved = jnp.cos(size) * u + jnp.sin(size) * step / jnp.maximum(size, tol)
            moved = moved / jnp.linalg.norm(moved)
            return i + 1, jnp.where(size < tol, u, moved), size

        def going(state):
            i, _, size = state
            return (i < max_iter) & (size >= tol)

        _, u, _ = jax.lax.while_loop(going, body, (0, start, jnp.asarray(jnp.inf, start.dtype)))
        out = jnp.where(jnp.any(valid), u * jnp.mean(norms), 0.0)
        return out.reshape(x.shape[1:]).astype(x.dtype)

    return jax.tree.map(leaf, stacked)


# Every static merge, by the name configs use. A method registered here is offered by lm_merge
# (`--config.method`) and, given a row in ROWS, compared by both studies.
MERGES: dict[str, Callable] = {
    "weight_average": weight_average,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare": dare,
    "slerp": slerp,
    "breadcrumbs": breadcrumbs,
    "breadcrumbs_ties": breadcrumbs_ties,
    "della": della,
    "della_linear": della_linear,
    "model_stock": model_stock,
    "sce": sce,
    "multislerp": multislerp,
    "karcher": karcher,
}


@dataclasses.dataclass(frozen=True)
class Blockwise:
    """How the streaming merge runs `MERGES[name]` on a large tensor a block of rows at a time
    (its working memory then is a few tensors, not a few times K). `stats(expert, base, **hp)`
    (None: no statistics) gives one expert's number from its whole tensor, an expert at a time;
    `merge(stacked, base, stats [K], **hp)` merges a row block of one-leaf trees to the same
    values as `MERGES[name]` gives for those rows of the whole tensor."""

    stats: Callable | None
    merge: Callable


def _ties_blocks(stacked, base, stats, density, lam):
    del density  # in the thresholds
    return ties_given_thresholds(stacked, base, stats, lam)


# The merges that are element-wise (given per-tensor statistics): the others merge whole tensors.
BLOCKWISE: dict[str, Blockwise] = {
    "weight_average": Blockwise(
        None, lambda stacked, base, stats, **hp: weight_average(stacked, **hp)
    ),
    "task_arithmetic": Blockwise(
        None, lambda stacked, base, stats, **hp: task_arithmetic(stacked, base, **hp)
    ),
    "ties": Blockwise(
        lambda expert, base, density, lam: ties_threshold(expert, base, density), _ties_blocks
    ),
}


def _takes(name: str, argument: str) -> bool:
    return argument in inspect.signature(MERGES[name]).parameters


def needs_base(name: str) -> bool:
    """Whether `MERGES[name]` merges task vectors against a base (it takes `base`)."""
    return _takes(name, "base")


def needs_rng(name: str) -> bool:
    """Whether `MERGES[name]` draws random numbers (it takes `rng`, from config.seed)."""
    return _takes(name, "rng")


def hyperparameters(name: str) -> tuple[str, ...]:
    """The hyper-parameters `MERGES[name]` takes: its arguments after the trees and the key."""
    params = inspect.signature(MERGES[name]).parameters
    return tuple(p for p in params if p not in ("stacked", "base", "rng"))


@dataclasses.dataclass(frozen=True)
class Row:
    """A searched merge as the studies (the grokking comparison, the LM study) show it:
    `MERGES[method]` with the `fixed` hyper-parameters, and the `searched` ones (default: every
    one that has a grid in GRID_FIELDS) chosen per seed on held-out data from the config's grid.
    A `pairwise` method merges the first two experts."""

    label: str
    method: str
    fixed: tuple[tuple[str, object], ...] = ()
    searched: tuple[str, ...] | None = None
    pairwise: bool = False

    def grid(self, grid) -> list[dict]:
        """The points to search: `grid` (config.grid) holds each hyper-parameter's values in
        the field GRID_FIELDS names; the first name varies slowest."""
        fixed = dict(self.fixed)
        names = self.searched or tuple(
            h for h in hyperparameters(self.method) if h in GRID_FIELDS and h not in fixed
        )
        values = [grid[GRID_FIELDS[n]] for n in names]
        return [dict(zip(names, point, strict=True)) for point in itertools.product(*values)]

    def merge(self, stacked, base, rng, hparams: dict):
        """This row's merge of `stacked` at the grid point `hparams`."""
        if self.pairwise:
            stacked = jax.tree.map(lambda x: x[jnp.array([0, 1 % x.shape[0]])], stacked)
        return merge(self.method, stacked, base, rng, **dict(self.fixed), **hparams)


# The config.grid field of each searched hyper-parameter's values.
GRID_FIELDS = {"lam": "lams", "density": "densities", "drop_rate": "drop_rates", "t": "slerp_ts"}

ROWS: list[Row] = [
    Row("task arithmetic", "task_arithmetic"),
    Row("TIES", "ties"),
    Row("DARE (linear)", "dare", searched=("drop_rate", "lam")),
    Row("DARE (TIES)", "dare", (("combine", "ties"),), ("drop_rate", "lam", "density")),
    Row("SLERP", "slerp", pairwise=True),
    Row("breadcrumbs (TIES)", "breadcrumbs_ties", (("gamma", 0.01),)),
    Row("DELLA", "della", (("epsilon", 0.1),)),
    Row("Model Stock", "model_stock"),
    Row("SCE", "sce"),
    Row("multi-SLERP", "multislerp"),
    Row("Karcher mean", "karcher"),
]


def merge(name, stacked, base=None, rng=None, **hparams):
    """Run the static merge `name` from MERGES; `base`/`rng` are passed only where used."""
    if name not in MERGES:
        raise ValueError(f"unknown merge method {name!r}; known methods: {sorted(MERGES)}")
    args = {}
    if needs_base(name):
        if base is None:
            raise ValueError(f"merge method {name!r} needs a base model (base=...)")
        args["base"] = base
    if needs_rng(name):
        if rng is None:
            raise ValueError(f"merge method {name!r} needs a PRNG key (rng=...)")
        args["rng"] = rng
    return MERGES[name](stacked, **args, **hparams)
