"""The merging comparison end to end on the tiny two-seed config: a row per method with standard
errors, stages restored per seed, and a seed trained alone equal to the same seed trained with
another in one vmapped program."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import compare as compare_config
from fusion_jax import merging, modes
from fusion_jax.data import tasks
from fusion_jax.evaluate import comparisons, plots
from fusion_jax.experiments import merge_compare, stages
from fusion_jax.models.transformer import Transformer, TransformerConfig

METHODS = {
    "base model", "own expert per task (oracle routing)", "output ensemble (mean logits)",
    "output ensemble (mean probs)", "weight average", "weight average, unrelated random inits",
    "task arithmetic", "TIES", "DARE (linear)", "DARE (TIES)", "SLERP (x_plus_y, x_minus_y)",
    "breadcrumbs (TIES)", "DELLA", "Model Stock", "SCE", "multi-SLERP", "Karcher mean", "DAM",
    "dynamic fusion, frozen experts", "dynamic fusion, end to end",
}  # fmt: skip
STAGES = ("base", "experts", "random_experts", "dam", "fusion_frozen", "fusion_e2e")


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """The docstring's command: the default --mode=train runs the config's experiment."""
    workdir = str(tmp_path_factory.mktemp("compare"))
    return workdir, modes.train(compare_config.get_config("tiny"), workdir)


def record_training(monkeypatch) -> list:
    """Records `(stage, seeds)` for every stage that is computed instead of restored."""
    trained = []
    original = stages.Stages.run_seeds

    def recording(self, name, seeds, fn, abstract_one):
        def wrapped(todo):
            trained.append((name, [seeds[i] for i in todo]))
            return fn(todo)

        return original(self, name, seeds, wrapped, abstract_one)

    monkeypatch.setattr(stages.Stages, "run_seeds", recording)
    return trained


def test_every_method_has_a_row_with_standard_errors(compared):
    workdir, out = compared
    assert out["seeds"] == [0, 1]
    assert {r["method"] for r in out["rows"]} == METHODS
    with open(os.path.join(workdir, "comparison.json")) as f:
        assert json.load(f)["rows"] == out["rows"]
    markdown = open(os.path.join(workdir, "comparison.md")).read()
    for method in METHODS:
        assert f"| {method} |" in markdown
    for plot in ("frontier.png", "dam_coefficients.png"):
        assert os.path.getsize(os.path.join(workdir, plot)) > 1000
    rows = {r["method"]: r for r in out["rows"]}
    # Every cell is the mean over both seeds with its standard error; the JSON keeps each seed's.
    for row in out["rows"]:
        for key in ("x_plus_y_acc", "permutation_loss", "mean_acc", "mean_loss", "mean_train_acc"):
            values = row["per_seed"][key]
            assert len(values) == 2
            assert row[key] == pytest.approx(np.mean(values))
            assert row[f"{key}_stderr"] == pytest.approx(np.std(values, ddof=1) / np.sqrt(2))
        assert (
            f"| {row['method']} | {comparisons.mean_se(row['per_seed']['x_plus_y_acc'])} / "
            in markdown
        )
        assert 0 <= row["mean_acc"] <= 1 and 0 <= row["mean_train_acc"] <= 1
        assert row["mean_loss"] > 0
    assert all(row["mean_loss_stderr"] > 0 for row in out["rows"])  # the seeds differ
    # A merged model is one expert's size; fusion and ensembles cost K experts per example.
    assert rows["DAM"]["params"] == rows["base model"]["params"]
    assert rows["output ensemble (mean logits)"]["params"] == 3 * rows["base model"]["params"]
    assert (
        rows["dynamic fusion, frozen experts"]["flops_per_example"]
        > 2.5 * (rows["DAM"]["flops_per_example"])
    )
    assert rows["weight average"]["train_flops"] == 0 and rows["DAM"]["train_flops"] > 0
    # Grid search chose per seed among the configured values, on that seed's held-out data.
    assert len(out["grid_search"]) == len(merging.ROWS)
    for label, search in out["grid_search"].items():
        assert rows[label]["hparams"] == search["chosen"]
        for r, chosen in enumerate(search["chosen"]):
            best = max(search["grid"], key=lambda g: (g["holdout_acc"][r], -g["holdout_loss"][r]))
            assert chosen == best["hparams"]
    assert {hp["lam"] for hp in out["grid_search"]["task arithmetic"]["chosen"]} <= {0.5, 1.0}


def test_more_seeds_train_only_the_new_one_to_the_results_of_training_both(
    compared, tmp_path, monkeypatch
):
    """A workdir left by a one-seed run, raised to two seeds: seed 1 trains alone (its own
    one-seed vmapped program) to exactly what it became beside seed 0, and seed 0 is restored,
    except a damaged stage checkpoint, which is moved aside and computed again."""
    workdir, out = compared
    one_seed = str(tmp_path / "one_seed")
    shutil.copytree(workdir, one_seed)
    for stage in STAGES:
        shutil.rmtree(os.path.join(one_seed, "stages", stage, "seed_1"))
    costs_path = os.path.join(one_seed, "stages", "costs.json")
    costs = json.load(open(costs_path))
    json.dump({k: v for k, v in costs.items() if not k.endswith("seed_1")}, open(costs_path, "w"))
    config_path = os.path.join(one_seed, "config.json")
    json.dump({**json.load(open(config_path)), "num_seeds": 1}, open(config_path, "w"))
    damaged = os.path.join(one_seed, "stages", "dam", "seed_0")
    files = [os.path.join(r, f) for r, _, fs in os.walk(damaged) for f in fs]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)

    trained = record_training(monkeypatch)
    again = modes.train(compare_config.get_config("tiny"), one_seed)  # num_seeds: 1 -> 2

    assert trained == [
        ("base", [1]), ("experts", [1]), ("random_experts", [1]), ("dam", [0, 1]),
        ("fusion_frozen", [1]), ("fusion_e2e", [1]),
    ]  # fmt: skip
    assert os.path.isdir(damaged + ".damaged") and os.path.isdir(damaged)
    # One seed's program and two seeds' agree to float rounding (XLA may order sums otherwise).
    for row, row_again in zip(out["rows"], again["rows"], strict=True):
        assert row_again["method"] == row["method"]
        for key, values in row["per_seed"].items():
            assert row_again["per_seed"][key] == pytest.approx(values, rel=1e-5), key
        assert row_again["hparams"] == row["hparams"]


def test_a_rerun_restores_every_stage_of_every_seed(compared, monkeypatch):
    workdir, out = compared
    trained = record_training(monkeypatch)
    again = modes.merge_compare(compare_config.get_config("tiny"), workdir)  # the --mode spelling
    assert trained == []
    assert [r["per_seed"] for r in again["rows"]] == [r["per_seed"] for r in out["rows"]]


def interrupt_after_chunk(monkeypatch, call: int) -> None:
    """Raises KeyboardInterrupt once the `call`-th training chunk of the run has returned and been
    logged, before anything saves it: Ctrl-C (or SIGTERM through main.py) while the host waits
    for a chunk."""
    log, calls = merge_compare.Pipeline._log, []

    def interrupted(*args):
        log(*args)
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt

    monkeypatch.setattr(merge_compare.Pipeline, "_log", staticmethod(interrupted))


KILLED = "killed after a time-based save"
DAMAGED = "killed after a time-based save that is then damaged"


@pytest.mark.parametrize("how", [KILLED, "Ctrl-C during a chunk", DAMAGED])
def test_an_interrupted_stage_resumes_to_the_bits_of_an_uninterrupted_run(
    compared, tmp_path, monkeypatch, record_progress, how
):
    """Stopped when x_minus_y's expert reached step 10 of 20 (killed after its time-based save,
    or interrupted during its first chunk, when it saves step 10 itself): the rerun restores the
    base stage and x_plus_y's finished expert, trains x_minus_y's from step 10 (from 0 if that
    save is damaged), and every number equals the uninterrupted run's (`compared`, which saved
    only at the end of each part)."""
    _, out = compared
    config = compare_config.get_config("tiny")
    workdir = str(tmp_path / "interrupted")
    if how in (KILLED, DAMAGED):
        config.train.checkpoint_every_secs = 1e-9  # save after every chunk
        saves, _ = record_progress(stop_after=("experts/x_minus_y", 10))
        expected = [("base", 10), ("base", 20), ("experts/x_plus_y", 10),
                    ("experts/x_plus_y", 20), ("experts/x_minus_y", 10)]  # fmt: skip
    else:
        saves, _ = record_progress()
        interrupt_after_chunk(monkeypatch, call=5)  # base 2 chunks, x_plus_y 2, x_minus_y 1
        expected = [("base", 20), ("experts/x_plus_y", 20), ("experts/x_minus_y", 10)]
    with pytest.raises(KeyboardInterrupt):
        modes.train(config, workdir)
    assert saves == expected
    in_progress = os.path.join(workdir, "stages", "in_progress")
    assert os.listdir(in_progress) == ["experts"]  # base's went when its stage was saved
    if how == DAMAGED:  # its one step emptied, as a disk that lost the files would leave it
        (seeds_dir,) = os.listdir(os.path.join(in_progress, "experts", "x_minus_y"))
        step_dir = os.path.join(in_progress, "experts", "x_minus_y", seeds_dir, "10")
        shutil.rmtree(step_dir)
        os.mkdir(step_dir)

    monkeypatch.undo()
    saves, resumes = record_progress()
    trained = record_training(monkeypatch)
    again = modes.train(compare_config.get_config("tiny"), workdir)  # saves at each part's end

    assert trained == [(stage, [0, 1]) for stage in STAGES[1:]]
    assert resumes == [("experts/x_plus_y", 20)] + [("experts/x_minus_y", 10)] * (how != DAMAGED)
    assert saves[:3] == [("experts/x_minus_y", 20), ("experts/permutation", 20),
                         ("random_experts/x_plus_y", 20)]  # fmt: skip
    assert os.listdir(in_progress) == []
    assert [r["per_seed"] for r in again["rows"]] == [r["per_seed"] for r in out["rows"]]


def test_dam_export_is_a_plain_transformer():
    cfg = TransformerConfig(vocab_size=13, num_classes=11, dim=16, num_heads=2)
    model = Transformer(cfg)
    tokens = jnp.asarray(tasks.get_task("x_plus_y", 11).table()[0][:20])
    # Compiled as wholes: op by op, a model's every primitive would compile on its own.
    stacked = jax.jit(jax.vmap(lambda k: model.init(k, tokens)["params"]))(
        jax.random.split(jax.random.key(0), 3)
    )
    one_hot = jax.tree.map(
        lambda c: c.at[:].set(0).at[1].set(1), merging.init_coefficients(stacked)
    )
    exported = jax.jit(merging.dam_merge, static_argnums=2)(one_hot, stacked, "none")
    expert1 = jax.tree.map(lambda x: x[1], stacked)
    assert jax.tree.structure(exported) == jax.tree.structure(expert1)
    apply = jax.jit(lambda p: model.apply({"params": p}, tokens))
    np.testing.assert_array_equal(apply(exported), apply(expert1))


def test_frontier_labels_of_equal_cost_are_spread_apart(tmp_path):
    # Costs within 10 % share a column (a log axis puts them in one place).
    assert plots._columns([9.06e6, 2.27e6, 9.09e6, 2.27e6, 5e6]) == [[1, 3], [4], [0, 2]]
    # Each label at its point's height, or just `gap` above the label below it.
    assert plots.spread_labels([0.02, 0.01, 0.5, 0.015], gap=0.03) == pytest.approx(
        [0.07, 0.01, 0.5, 0.04]
    )
    path = str(tmp_path / "frontier.png")
    plots.plot_frontier([("a", 1.0, [0.1, 0.2]), ("b", 1.0, [0.15]), ("c", 4.0, [0.5, 0.7])],
                        path, xlabel="x", ylabel="y", title="t")  # fmt: skip
    assert os.path.getsize(path) > 1000


def test_a_merge_method_registered_in_merging_is_a_searched_row(compared, tmp_path, toy_merge):
    workdir = str(tmp_path / "copy")
    shutil.copytree(compared[0], workdir)
    out = modes.train(compare_config.get_config("tiny"), workdir)  # stages restored
    (row,) = [r for r in out["rows"] if r["method"] == toy_merge]
    config = compare_config.get_config("tiny")
    assert row["hparams"] and all(hp == {"lam": hp["lam"]} for hp in row["hparams"])
    assert {hp["lam"] for hp in row["hparams"]} <= set(config.grid.lams)
    assert [hp["hparams"] for hp in out["grid_search"][toy_merge]["grid"]] == [
        {"lam": x} for x in config.grid.lams
    ]
