"""Tests for the static merges and DAM on stacked parameter trees (CPU, small)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from hlo_checks import dot_precisions

from fusion_jax.merging import dam, static
from fusion_jax.merging.static import (
    dare,
    merge,
    slerp,
    task_arithmetic,
    ties,
    weight_average,
)


def _normal(seed, *shape):
    # Test data comes from NumPy: every eager jax.random call of a new shape would compile.
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _close(a, b, **kw):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5)(nn.relu(nn.Dense(16)(x)))


@functools.cache
def _stacked_mlps():
    """3 differently initialised MLPs as one stacked tree; shared because init compiles."""
    model = _MLP()
    keys = jax.random.split(jax.random.key(0), 3)
    return model, jax.jit(jax.vmap(model.init, in_axes=(0, None)))(keys, jnp.zeros((1, 8)))


def _mlps_and_base():
    _, stacked = _stacked_mlps()
    return stacked, jax.tree.map(lambda x: x[0] * 0.5, stacked)


def test_the_merges_dots_are_float32_whatever_the_backend_default():
    # Weighted sums, SLERP's cosine and DAM's similarity regulariser (and its gradient); the
    # other merges are element-wise.
    _, stacked = _stacked_mlps()
    pair = jax.tree.map(lambda x: x[:2], stacked)
    coefficients = dam.init_coefficients(stacked)
    programs = [
        (weight_average, stacked),
        (functools.partial(slerp, t=0.3), pair),
        (jax.grad(lambda c: dam.similarity(c, 3, "whole_model")), coefficients),
        (jax.grad(lambda c: dam.similarity(c, 3, "per_layer")), coefficients),
    ]
    for fn, tree in programs:
        found = dot_precisions(fn, tree)
        assert found and set(found) == {("HIGHEST", "HIGHEST")}, (fn, found)


# --- weight averaging and task arithmetic


def test_average_of_copies_returns_the_model():
    _, stacked = _stacked_mlps()
    single = jax.tree.map(lambda x: x[0], stacked)
    copies = jax.tree.map(lambda x: jnp.repeat(x[:1], 4, axis=0), stacked)
    _close(weight_average(copies), single, rtol=1e-6)


def test_weighted_average_hand_numbers():
    stacked = {"w": jnp.array([[0.0, 4.0], [8.0, -4.0]])}
    # weights [1, 3] normalise to [0.25, 0.75]: 0.25 * [0, 4] + 0.75 * [8, -4] = [6, -2].
    _close(weight_average(stacked, jnp.array([1.0, 3.0])), {"w": jnp.array([6.0, -2.0])})


def test_task_arithmetic_lam_zero_is_base_and_hand_numbers():
    base = {"w": jnp.array([1.0, 2.0])}
    stacked = {"w": jnp.array([[2.0, 2.0], [1.0, 5.0]])}
    _close(task_arithmetic(stacked, base, 0.0), base)
    # tau = [1, 0] and [0, 3]; sum [1, 3]; base + 0.5 * sum = [1.5, 3.5].
    _close(task_arithmetic(stacked, base, 0.5), {"w": jnp.array([1.5, 3.5])})


# --- TIES


def test_ties_sign_election_and_disjoint_mean_hand_example():
    base = {"w": jnp.array([1.0, 1.0, 1.0])}
    # Task vectors tau_0 = [1, -2, 3], tau_1 = [3, 1, -3] (2 experts x 3 entries).
    stacked = {"w": jnp.array([[2.0, -1.0, 4.0], [4.0, 2.0, -2.0]])}
    # Mass per entry [4, -1, 0] elects signs [+, -, 0]; entry 1 is a 1:1 tie by count, so only the
    # total mass decides it. Disjoint means: [(1 + 3) / 2, -2 / 1, 0 (no agreeing expert)].
    merged = ties(stacked, base, density=1.0, lam=0.5)
    _close(merged, {"w": jnp.array([1.0 + 0.5 * 2.0, 1.0 - 0.5 * 2.0, 1.0])})


def test_ties_trims_per_expert_at_density():
    tau = jnp.array([[0.1, -3.0, 2.0, 0.5], [4.0, 0.2, -0.3, -1.0]])
    base = {"w": jnp.zeros(4)}
    # With one expert, sign election and disjoint mean return the trimmed vector itself.
    kept0 = ties({"w": tau[:1]}, base, density=0.5, lam=1.0)
    kept1 = ties({"w": tau[1:]}, base, density=0.5, lam=1.0)
    _close(kept0, {"w": jnp.array([0.0, -3.0, 2.0, 0.0])})
    _close(kept1, {"w": jnp.array([4.0, 0.0, 0.0, -1.0])})
    # 0.3 * 10 is 3.0000000000000004 in floating point: still 3 entries kept, not 4.
    ten = ties({"w": jnp.arange(1.0, 11.0)[None]}, {"w": jnp.zeros(10)}, density=0.3, lam=1.0)
    _close(ten, {"w": jnp.array([0.0] * 7 + [8.0, 9.0, 10.0])})


def test_ties_inside_an_outer_jit_with_traced_lam():
    stacked, base = _mlps_and_base()
    direct = ties(stacked, base, density=0.4, lam=0.7)
    nested = jax.jit(lambda s, b, lam: ties(s, b, 0.4, lam))(stacked, base, 0.7)
    _close(nested, direct, rtol=1e-6)


# --- DARE


def test_dare_without_drop_equals_task_arithmetic_and_ties():
    stacked, base = _mlps_and_base()
    # Keyword calls, as merge() makes them, so test_merge_dispatches_by_name reuses these compiles.
    linear = dict(base=base, rng=jax.random.key(1), drop_rate=0.0, lam=0.3)
    _close(dare(stacked, **linear), task_arithmetic(stacked, base=base, lam=0.3), rtol=1e-6)
    _close(
        dare(stacked, **linear, combine="ties", density=0.5),
        ties(stacked, base=base, density=0.5, lam=0.3),
        rtol=1e-6,
    )


def test_dare_preserves_expectation():
    k, p, n = 2, 0.5, 4000
    tau = _normal(0, k, 4, 8)
    base = {"w": jnp.zeros((4, 8))}
    keys = jax.random.split(jax.random.key(3), n)
    samples = jax.jit(jax.vmap(lambda key: dare({"w": tau}, base, key, p, 1.0)["w"]))(keys)
    expected = jnp.sum(tau, axis=0)
    # Each rescaled entry tau * Bernoulli(1 - p) / (1 - p) has variance tau^2 * p / (1 - p); the
    # mean of n samples of the sum over experts therefore has this standard deviation. 5 sigma on
    # 32 entries leaves a chance of about 2e-5 that a correct implementation fails (fixed keys).
    sigma = jnp.sqrt(jnp.sum(tau**2, axis=0) * p / (1 - p) / n)
    assert jnp.all(jnp.abs(jnp.mean(samples, axis=0) - expected) < 5 * sigma)


def test_dare_keys_differ_per_expert_and_leaf():
    ones = jnp.ones((2, 256))
    out = dare(
        {"a": ones, "b": ones},
        {"a": jnp.zeros(256), "b": jnp.zeros(256)},
        jax.random.key(4),
        0.5,
        1.0,
    )
    # Survivors are 2.0 each: a shared mask across experts would give only 0 or 4, never 2.
    assert jnp.any(out["a"] == 2.0)
    assert not jnp.array_equal(out["a"], out["b"])


# --- SLERP


def test_slerp_endpoints():
    a, b = jnp.array([1.0, 2.0, -1.0]), jnp.array([-2.0, 0.5, 3.0])
    stacked = {"w": jnp.stack([a, b])}
    _close(slerp(stacked, 0.0), {"w": a}, rtol=1e-6)
    _close(slerp(stacked, 1.0), {"w": b}, rtol=1e-5, atol=1e-6)


def test_slerp_orthogonal_midpoint_keeps_norm():
    stacked = {"w": jnp.array([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])}
    mid = slerp(stacked, 0.5)["w"]
    _close(mid, jnp.array([3.0, 3.0, 0.0]) / jnp.sqrt(2.0), rtol=1e-6)
    # Linear interpolation would give norm 3 / sqrt(2) here; slerp keeps 3.
    np.testing.assert_allclose(jnp.linalg.norm(mid), 3.0, rtol=1e-6)


def test_slerp_falls_back_to_linear():
    a = jnp.array([1.0, 2.0, 3.0])
    colinear = {"w": jnp.stack([a, 2.0 * a])}
    _close(slerp(colinear, 0.3), {"w": 0.7 * a + 0.6 * a}, rtol=1e-6)
    zero = {"w": jnp.stack([jnp.zeros(3), a])}
    _close(slerp(zero, 0.3), {"w": 0.3 * a}, rtol=1e-6)


# --- registry and errors


def test_merge_dispatches_by_name():
    # Same arguments as test_dare_without_drop..., so the compiled merges are reused.
    stacked, base = _mlps_and_base()
    key = jax.random.key(1)
    _close(merge("weight_average", stacked), weight_average(stacked))
    _close(
        merge("ties", stacked, base, density=0.5, lam=0.3),
        ties(stacked, base=base, density=0.5, lam=0.3),
    )
    _close(
        merge("dare", stacked, base, key, drop_rate=0.0, lam=0.3),
        dare(stacked, base=base, rng=key, drop_rate=0.0, lam=0.3),
    )


def test_static_errors():
    stacked = {"w": jnp.ones((3, 4))}
    base = {"w": jnp.zeros(4)}
    with pytest.raises(ValueError, match="known methods"):
        merge("fisher", stacked)
    with pytest.raises(ValueError, match="needs a base"):
        merge("task_arithmetic", stacked, lam=1.0)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        merge("dare", stacked, base, drop_rate=0.1, lam=1.0)
    for density in (0.0, 1.5):
        with pytest.raises(ValueError, match="density"):
            ties(stacked, base, density, 1.0)
    with pytest.raises(ValueError, match="drop_rate"):
        dare(stacked, base, jax.random.key(0), 1.0, 1.0)
    with pytest.raises(ValueError, match="exactly 2 experts"):
        slerp(stacked, 0.5)
    with pytest.raises(ValueError, match="disagree on the number of experts"):
        weight_average({"w": jnp.ones((3, 4)), "v": jnp.ones((2, 4))})
    with pytest.raises(ValueError, match="base shape"):
        task_arithmetic(stacked, {"w": jnp.zeros(5)}, 1.0)
    with pytest.raises(ValueError, match="weights must have shape"):
        weight_average(stacked, jnp.ones(2))


# --- DAM


def _all_kinds(k):
    return {
        "Dense_0": {"kernel": _normal(1, k, 4, 6), "bias": _normal(2, k, 6)},
        "Embed_0": {"embedding": _normal(3, k, 10, 3)},
        "LayerNorm_0": {"scale": _normal(4, k, 3), "bias": _normal(5, k, 3)},
    }


def test_dam_coefficient_shapes_and_init():
    coefficients = dam.init_coefficients(_all_kinds(3))
    shapes = jax.tree.map(jnp.shape, coefficients)
    assert shapes == {
        "Dense_0": {"kernel": (3, 4), "bias": (3,)},
        "Embed_0": {"embedding": (3, 3)},
        "LayerNorm_0": {"scale": (3, 3), "bias": (3,)},
    }
    assert all(jnp.all(c == 1.0 / 3) for c in jax.tree.leaves(coefficients))


@pytest.mark.parametrize("nonlinearity", ["tanh", "sigmoid", "relu", "none"])
def test_dam_average_start_is_the_weight_average_and_the_repository_start_is_not(nonlinearity):
    stacked = _all_kinds(4)
    for init, close in (("average", True), ("repository", nonlinearity in ("relu", "none"))):
        value = dam.initial_value(4, init, nonlinearity)
        merged = dam.merge(dam.init_coefficients(stacked, value), stacked, nonlinearity)
        same = jax.tree.map(lambda m, s: np.allclose(m, np.mean(s, 0), rtol=1e-6, atol=1e-7),
                            merged, stacked)  # fmt: skip
        assert all(jax.tree.leaves(same)) == close, (init, nonlinearity)
    # tanh at the repository's c = 1/K: every layer at K tanh(1/K) of the average.
    assert 4 * np.tanh(dam.initial_value(4, "repository")) == pytest.approx(0.9797, abs=1e-4)
    with pytest.raises(ValueError, match="unknown DAM init 'zero'; known: average, repository"):
        dam.initial_value(4, "zero")


def test_dam_per_layer_similarity_gradient_is_zero_at_parallel_starts_and_moves_after():
    """Every coefficient vector starts equal, where cosine similarity is at its maximum: no
    gradient; once the vectors differ, the regulariser's gradient reaches them."""
    stacked = _all_kinds(3)
    coefficients = dam.init_coefficients(stacked)

    def sim(c):
        return dam.similarity(c, 3, "per_layer")

    grads = jax.grad(sim)(coefficients)
    assert float(sim(coefficients)) == pytest.approx(3.0)  # three vector leaves, cosine 1 each
    assert all(float(jnp.abs(g).max()) < 1e-6 for g in jax.tree.leaves(grads))
    moved = jax.tree.map(lambda c: c + 0.01 * _normal(7, *c.shape), coefficients)
    assert float(sim(moved)) < 3.0
    assert any(float(jnp.abs(g).max()) > 1e-3 for g in jax.tree.leaves(jax.grad(sim)(moved)))


def test_dam_one_hot_identity_returns_that_expert():
    stacked = _all_kinds(3)
    coefficients = jax.tree.map(
        lambda c: jnp.zeros_like(c).at[1].set(1.0), dam.init_coefficients(stacked)
    )
    merged = dam.merge(coefficients, stacked, nonlinearity="none")
    jax.tree.map(lambda m, s: np.testing.assert_array_equal(m, s[1]), merged, stacked)


def test_dam_broadcasts_over_the_right_axes():
    stacked = _all_kinds(2)
    coefficients = jax.tree.map(lambda c: _normal(6, *c.shape), dam.init_coefficients(stacked))
    merged = dam.merge(coefficients, stacked, nonlinearity="none")
    c, s = coefficients, stacked
    # Kernel: per input feature (axis 0 of [in, out]); embedding: per feature dim (last axis).
    expected_kernel = jnp.einsum("ki,kio->io", c["Dense_0"]["kernel"], s["Dense_0"]["kernel"])
    expected_embed = jnp.einsum("kd,kvd->vd", c["Embed_0"]["embedding"], s["Embed_0"]["embedding"])
    expected_bias = jnp.einsum("k,ko->o", c["Dense_0"]["bias"], s["Dense_0"]["bias"])
    _close(merged["Dense_0"]["kernel"], expected_kernel, rtol=1e-5, atol=1e-6)
    _close(merged["Embed_0"]["embedding"], expected_embed, rtol=1e-5, atol=1e-6)
    _close(merged["Dense_0"]["bias"], expected_bias, rtol=1e-5, atol=1e-6)


def test_dam_training_lowers_kl():
    k = 3
    model, stacked = _stacked_mlps()
    inputs = _normal(7, k, 32, 8)
    loss_fn = functools.partial(
        dam.dam_loss, stacked=stacked, apply_fn=model.apply, inputs_per_expert=inputs
    )
    coefficients = dam.init_coefficients(stacked)
    opt = optax.adam(3e-2)
    opt_state = opt.init(coefficients)

    @jax.jit
    def step(coefficients, opt_state):
        (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(coefficients)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(coefficients, updates), opt_state, aux

    # aux is measured before each update: the 41st step reports the loss after 40 updates.
    history = []
    for _ in range(41):
        coefficients, opt_state, aux = step(coefficients, opt_state)
        history.append(aux)
    first, final = history[0], history[-1]
    assert final["kl_per_expert"].shape == (k,)
    # Observed: about 0.41 -> 0.28; 0.85 leaves room for platform differences.
    assert final["kl"] < 0.85 * first["kl"], (first["kl"], final["kl"])


def test_dam_errors():
    with pytest.raises(ValueError, match="Dense_0/weight"):
        dam.init_coefficients({"Dense_0": {"weight": jnp.ones((2, 3, 4))}})
    stacked = _all_kinds(2)
    with pytest.raises(ValueError, match="unknown nonlinearity"):
        dam.merge(dam.init_coefficients(stacked), stacked, nonlinearity="gelu")


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_kth_largest_by_selection_and_by_bisection_equal_a_sort(dtype):
    # The CPU path (np.partition through a callback) and the accelerator path (bisection on
    # the bit patterns) against a sort, with ties (repeated values, zeros) in every row.
    rng = np.random.default_rng(0)
    x = np.abs(rng.standard_normal((3, 1001))).astype(dtype)
    x[:, ::7] = x[:, 3:4]
    x[1, :300] = 0
    reference = np.sort(x.astype(np.float32), axis=1)[:, ::-1]
    for k in (1, 2, 300, 500, 1001):
        selected = jax.jit(static._kth_largest, static_argnums=1)(jnp.asarray(x), k)
        bisected = jax.jit(static._bisect_kth, static_argnums=1)(jnp.asarray(x), k)
        np.testing.assert_array_equal(np.asarray(selected, np.float32), reference[:, k - 1])
        np.testing.assert_array_equal(np.asarray(bisected, np.float32), reference[:, k - 1])


# -- the methods after mergekit: hand-computable cases ----------------------------------------


def _one(values):
    return {"w": jnp.asarray(np.asarray(values, np.float32))}


def test_breadcrumbs_drops_the_outliers_and_keeps_the_next_density():
    # n = 10, gamma 0.2, density 0.5: the 2 largest magnitudes (10, 9) go, the next 5 (8..4) stay.
    tau = np.array([[1, -2, 3, -4, 5, -6, 7, -8, 9, -10]], np.float32)
    base = np.zeros(10, np.float32)
    out = static.breadcrumbs(_one(tau), _one(base), density=0.5, gamma=0.2, lam=2.0)["w"]
    np.testing.assert_array_equal(out, 2.0 * np.array([0, 0, 0, -4, 5, -6, 7, -8, 0, 0]))
    # gamma 0 drops no outlier (mergekit would keep nothing): the 5 largest stay.
    out = static.breadcrumbs(_one(tau), _one(base), density=0.5, gamma=0.0, lam=1.0)["w"]
    np.testing.assert_array_equal(out, [0, 0, 0, 0, 0, -6, 7, -8, 9, -10])


def test_breadcrumbs_ties_sums_the_entries_that_agree_with_the_elected_sign():
    tau = np.array([[4, 3, -2, 1], [-1, 2, 5, 1]], np.float32)
    base = np.full(4, 10.0, np.float32)
    out = static.breadcrumbs_ties(_one(base + tau), _one(base), density=1.0, gamma=0.0, lam=1.0)
    # Masses 3, 5, 3, 2: signs +, +, +, +; agreeing entries summed (not averaged).
    np.testing.assert_array_equal(out["w"], base + np.array([4, 5, 5, 2]))


def test_della_keeps_by_magnitude_rank_and_restores_the_l1_norm():
    # 4000 rows of 5 entries, ranks 1..5 by magnitude: kept with probability 0.3, 0.4, ..., 0.7.
    row = np.array([0.1, -0.2, 0.3, -0.4, 0.5], np.float32)
    tau = np.tile(row, (1, 4000, 1))
    key = jax.random.key(0)
    dropped = np.asarray(static._della_drop(key, jnp.asarray(tau), 0.5, 0.2))
    kept = (dropped != 0).mean(axis=(0, 1))
    np.testing.assert_allclose(kept, [0.3, 0.4, 0.5, 0.6, 0.7], atol=0.03)
    np.testing.assert_allclose(np.abs(dropped).sum(), np.abs(tau).sum(), rtol=1e-5)
    # Density 1 prunes nothing: della is TIES's disjoint mean, della_linear the sum.
    t2 = np.array([[4, 3, -2, 1], [-1, 2, 5, 1]], np.float32)
    zero = np.zeros(4, np.float32)
    args = dict(density=1.0, epsilon=0.1, lam=1.0)
    np.testing.assert_allclose(static.della(_one(t2), _one(zero), key, **args)["w"], [4, 2.5, 5, 1])
    np.testing.assert_allclose(
        static.della_linear(_one(t2), _one(zero), key, **args)["w"], [3, 5, 3, 2]
    )


def test_model_stock_interpolates_by_the_angle_between_task_vectors():
    base = np.array([1.0, 1.0], np.float32)
    # Orthogonal task vectors: cos 0, t 0 -> the base. Equal ones: cos 1, t 1 -> their mean.
    out = static.model_stock(_one(base + np.eye(2)), _one(base))["w"]
    np.testing.assert_allclose(out, base, atol=1e-7)
    same = base + np.array([[1.0, 2.0], [1.0, 2.0]])
    np.testing.assert_allclose(static.model_stock(_one(same), _one(base))["w"], [2, 3], rtol=1e-6)
    # cos 0.5: t = 2 * 0.5 / 1.5 = 2/3 of the experts' mean, 1/3 of the base.
    experts = base + np.array([[1.0, 0.0], [0.5, np.sqrt(3) / 2]])
    expected = 2 / 3 * experts.mean(0) + 1 / 3 * base
    np.testing.assert_allclose(static.model_stock(_one(experts), _one(base))["w"], expected,
                               rtol=1e-6)  # fmt: skip


def test_sce_weights_experts_by_energy_and_erases_disagreeing_entries():
    # Energies mean(tau^2): 2 and 1 -> weights 2/3, 1/3. Entry 0: both agree (+):
    # (2/3 * 2 + 1/3 * 1) / 1 = 5/3. Entry 1: elected -, only expert 1 (-1) agrees: -1.
    tau = np.array([[2.0, 0.0], [1.0, -1.0]], np.float32)
    out = static.sce(_one(tau), _one(np.zeros(2, np.float32)))["w"]
    np.testing.assert_allclose(out, [5 / 3, -1.0], rtol=1e-6)
    # select_topk 0.5 keeps 1 of the 2 entries: the one that varies most across experts
    # (variances 4 and 0.0625); expert 1 then has no energy left and weight 0.
    tau = np.array([[4.0, 1.0], [0.0, 1.5]], np.float32)
    out = static.sce(_one(tau), _one(np.zeros(2, np.float32)), select_topk=0.5)["w"]
    np.testing.assert_allclose(out, [4.0, 0.0], rtol=1e-6)


def test_multislerp_of_two_equal_norm_experts_is_slerp_halfway_and_karcher_the_arc_mean():
    a, b = np.array([3.0, 0.0, 0.0]), np.array([0.0, 3.0, 0.0])
    halfway = static.slerp(_one([a, b]), t=0.5)["w"]
    np.testing.assert_allclose(static.multislerp(_one([a, b]))["w"], halfway, rtol=1e-5)
    np.testing.assert_allclose(halfway, [3 / np.sqrt(2), 3 / np.sqrt(2), 0], rtol=1e-5)
    # Directions at 0, 30 and 90 degrees: on the circle the Karcher mean is the mean angle,
    # 40 degrees; the norms 1, 2 and 3 average to 2.
    angles = np.deg2rad([0.0, 30.0, 90.0])
    points = np.stack([np.cos(angles), np.sin(angles)], 1) * np.array([[1.0], [2.0], [3.0]])
    out = static.karcher(_one(points), max_iter=50, tol=1e-7)["w"]
    np.testing.assert_allclose(out, 2 * np.array([np.cos(np.deg2rad(40)), np.sin(np.deg2rad(40))]),
                               rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_weight_average_of_narrow_floats_is_the_float32_average_rounded_once(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 64, 48)).astype(dtype)
    w = np.array([0.2, 0.5, 0.3], np.float32)
    out = np.asarray(weight_average({"w": jnp.asarray(x)}, jnp.asarray(w))["w"])
    assert out.dtype == dtype
    exact = np.einsum("k,k...->...", w.astype(np.float64), x.astype(np.float64))
    # float32 sums rounded once to the narrow type: within half a unit of its last place,
    # plus float32's own rounding of the terms (far below it but where they cancel).
    ulp = float(ml_dtypes.finfo(dtype).eps) * 2.0 ** np.floor(np.log2(np.abs(exact)))
    terms = np.einsum("k,k...->...", w.astype(np.float64), np.abs(x.astype(np.float64)))
    assert np.all(np.abs(out.astype(np.float64) - exact) <= 0.5 * ulp + 1e-6 * terms)
