"""Task tables, vocabulary, TFDS round trip, splits and sampling."""

import itertools

import jax
import numpy as np
import pytest

from fusion_jax.data import pipeline, tasks


@pytest.mark.parametrize(
    "name,num_pairs,vocab,classes",
    [
        ("x_plus_y", 9409, 99, 97),
        ("x_minus_y", 9409, 99, 97),
        ("x_div_y", 9312, 99, 97),
        ("permutation", 14400, 122, 120),
    ],
)
def test_table_sizes_and_vocabulary(name, num_pairs, vocab, classes):
    task = tasks.get_task(name)
    inputs, labels = task.table()
    assert inputs.shape == (num_pairs, 4) and labels.shape == (num_pairs,)
    assert task.vocab_size == vocab and task.num_classes == classes
    # [a, "o", b, "="]: the operator and equals tokens are ids 0 and 1 everywhere.
    assert (inputs[:, 1] == tasks.OP_TOKEN).all() and (inputs[:, 3] == tasks.EQ_TOKEN).all()
    assert inputs[:, [0, 2]].min() >= 2 and inputs.max() < vocab
    assert labels.min() >= 0 and labels.max() < classes
    # Every answer class occurs (all four operations are surjective).
    assert len(np.unique(labels)) == classes


@pytest.mark.parametrize("name", ["x_plus_y", "x_minus_y", "x_div_y"])
def test_modular_tables_exhaustively(name):
    p = 97
    inputs, labels = tasks.get_task(name).table()
    a, b = inputs[:, 0] - 2, inputs[:, 2] - 2
    if name == "x_plus_y":
        expected = (a + b) % p
    elif name == "x_minus_y":
        expected = (a - b) % p
    else:
        # Independent inverse by search rather than Fermat's little theorem.
        inverse = {x: next(y for y in range(1, p) if x * y % p == 1) for x in range(1, p)}
        expected = np.array([ai * inverse[bi] % p for ai, bi in zip(a, b, strict=True)])
        assert (labels * b % p == a).all()
        assert b.min() == 1
    np.testing.assert_array_equal(labels, expected)
    # Canonical order: pair index = i_a * |B| + i_b.
    np.testing.assert_array_equal(a, np.repeat(np.arange(p), len(np.unique(b))))


def test_permutation_table_exhaustively():
    inputs, labels = tasks.get_task("permutation").table()
    perms = np.array(list(itertools.permutations(range(5))))
    a, b, c = perms[inputs[:, 0] - 2], perms[inputs[:, 2] - 2], perms[labels]
    # c = a o b means c[i] = a[b[i]] for every position i.
    np.testing.assert_array_equal(c, np.take_along_axis(a, b, axis=1))
    assert len({tuple(x) for x in inputs[:, [0, 2]]}) == 14400


def test_tfds_table_equals_algebra(tmp_path):
    for name in ("x_div_y", "permutation"):
        from_tfds = pipeline.load_table(name, "tfds", str(tmp_path))
        direct = tasks.get_task(name).table()
        np.testing.assert_array_equal(from_tfds[0], direct[0])
        np.testing.assert_array_equal(from_tfds[1], direct[1])


def test_unknown_task_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown task 'x_times_y'.*known tasks: permutation"):
        tasks.parse_task_names("x_plus_y,x_times_y")
    with pytest.raises(ValueError, match="config.tasks is empty"):
        tasks.parse_task_names(" , ")


def test_split_is_deterministic_disjoint_and_complete():
    train, val = pipeline.split_indices(9409, 0.5, seed=3)
    train2, val2 = pipeline.split_indices(9409, 0.5, seed=3)
    other, _ = pipeline.split_indices(9409, 0.5, seed=4)
    np.testing.assert_array_equal(train, train2)
    np.testing.assert_array_equal(val, val2)
    assert len(train) == 4704 and len(val) == 4705  # int(N * frac) train, as the reference
    assert not set(train) & set(val)
    assert sorted(np.concatenate([train, val])) == list(range(9409))
    assert not np.array_equal(train, other)
    with pytest.raises(ValueError, match="frac_train"):
        pipeline.split_indices(10, 1.0, seed=0)


def test_task_data_stacks_one_split_per_seed():
    inputs, labels = tasks.get_task("x_plus_y", 11).table()
    data = pipeline.make_task_data(inputs, labels, 0.5, seeds=[0, 1, 2])
    assert data.train.inputs.shape == (3, 60, 4) and data.val.labels.shape == (3, 61)
    for r, seed in enumerate([0, 1, 2]):
        train_idx, _ = pipeline.split_indices(121, 0.5, seed)
        np.testing.assert_array_equal(data.train.labels[r], labels[train_idx])


def test_sampling_is_uniform_with_replacement():
    split = pipeline.Split(np.arange(40).reshape(10, 4), np.arange(10))
    batch = pipeline.sample_batch(split, jax.random.key(0), 5000)
    counts = np.bincount(np.asarray(batch.labels), minlength=10)
    assert counts.min() > 400 and counts.max() < 600  # 500 expected, sd ~21
    np.testing.assert_array_equal(np.asarray(batch.inputs)[:, 0], 4 * np.asarray(batch.labels))


def test_shard_for_eval_pads_and_masks():
    split = pipeline.Split(np.arange(2 * 7 * 4).reshape(2, 7, 4), np.arange(14).reshape(2, 7))
    shard, mask = pipeline.shard_for_eval(split, 4)
    assert shard.inputs.shape == (4, 2, 2, 4) and mask.shape == (4, 2)
    assert mask.sum() == 7
    flat = np.moveaxis(shard.labels, 0, 1).reshape(2, 8)
    np.testing.assert_array_equal(flat[:, :7], split.labels)
