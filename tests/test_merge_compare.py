"""The merging comparison pipeline end to end on a tiny config, and its stage resume."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import compare as compare_config
from fusion_jax import merging, modes
from fusion_jax.data import tasks
from fusion_jax.experiments import merge_compare
from fusion_jax.models.transformer import Transformer, TransformerConfig

METHODS = {
    "base model", "own expert per task (oracle routing)", "output ensemble (mean logits)",
    "output ensemble (mean probs)", "weight average", "weight average, unrelated random inits",
    "task arithmetic", "TIES", "DARE (linear)", "DARE (TIES)", "SLERP (x_plus_y, x_minus_y)", "DAM",
    "dynamic fusion, frozen experts", "dynamic fusion, end to end",
}  # fmt: skip


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """The docstring's command: the default --mode=train runs the config's experiment."""
    workdir = str(tmp_path_factory.mktemp("compare"))
    return workdir, modes.train(compare_config.get_config("tiny"), workdir)


def test_writes_every_methods_row(compared):
    workdir, out = compared
    assert {r["method"] for r in out["rows"]} == METHODS
    with open(os.path.join(workdir, "comparison.json")) as f:
        assert json.load(f)["rows"] == out["rows"]
    markdown = open(os.path.join(workdir, "comparison.md")).read()
    for method in METHODS:
        assert f"| {method} |" in markdown
    for plot in ("frontier.png", "dam_coefficients.png"):
        assert os.path.getsize(os.path.join(workdir, plot)) > 1000
    rows = {r["method"]: r for r in out["rows"]}
    # A merged model is one expert's size; fusion and ensembles cost K experts per example.
    assert rows["DAM"]["params"] == rows["base model"]["params"]
    assert rows["output ensemble (mean logits)"]["params"] == 3 * rows["base model"]["params"]
    assert (
        rows["dynamic fusion, frozen experts"]["flops_per_example"]
        > 2.5 * (rows["DAM"]["flops_per_example"])
    )
    assert rows["weight average"]["train_flops"] == 0 and rows["DAM"]["train_flops"] > 0
    for row in out["rows"]:
        assert 0 <= row["mean_acc"] <= 1 and 0 <= row["mean_train_acc"] <= 1
        assert row["mean_loss"] > 0
    # Grid search chose among the configured values on held-out training data.
    assert out["grid_search"]["task arithmetic"]["chosen"]["lam"] in (0.5, 1.0)


def test_rerun_restores_finished_stages(compared, monkeypatch):
    workdir, out = compared

    def fail(*args, **kwargs):
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr(merge_compare, "train_params", fail)
    again = modes.merge_compare(compare_config.get_config("tiny"), workdir)  # the --mode spelling
    assert [r["mean_acc"] for r in again["rows"]] == [r["mean_acc"] for r in out["rows"]]


def test_dam_export_is_a_plain_transformer():
    cfg = TransformerConfig(vocab_size=13, num_classes=11, dim=16, num_heads=2)
    model = Transformer(cfg)
    tokens = jnp.asarray(tasks.get_task("x_plus_y", 11).table()[0][:20])
    stacked = jax.vmap(lambda k: model.init(k, tokens)["params"])(
        jax.random.split(jax.random.key(0), 3)
    )
    one_hot = jax.tree.map(
        lambda c: c.at[:].set(0).at[1].set(1), merging.init_coefficients(stacked)
    )
    exported = merging.dam_merge(one_hot, stacked, "none")
    expert1 = jax.tree.map(lambda x: x[1], stacked)
    assert jax.tree.structure(exported) == jax.tree.structure(expert1)
    np.testing.assert_array_equal(
        model.apply({"params": exported}, tokens), model.apply({"params": expert1}, tokens)
    )
