"""fusion_jax.load_run: a trained workdir restored for analysis, and its one-line errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import fusion_jax
from configs import baseline, dyn_fusion
from configs import compare as compare_config
from fusion_jax import files, merging, run
from fusion_jax.errors import UserError
from fusion_jax.evaluate import results
from fusion_jax.train import checkpoint, logs, loop


def tiny_fusion():
    config = dyn_fusion.get_config("tiny")  # x_plus_y mod 11, 2 seeds, 20 steps, 3 experts
    config.train.num_devices = 1
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny fusion run (checkpoints at steps 10 and 20) and its loaded Run."""
    workdir = str(tmp_path_factory.mktemp("fusion"))
    loop.train(tiny_fusion(), workdir)
    return workdir, fusion_jax.load_run(workdir)


def checkpoint_params(workdir, step=None):
    """The run-stacked params of a checkpoint, restored the way the README did before."""
    setup = loop.setup_task(tiny_fusion(), "x_plus_y")
    mngr = checkpoint.manager(os.path.join(workdir, "x_plus_y", "checkpoints"), 2)
    try:
        return setup, checkpoint.restore(mngr, setup.abstract_runs(), step).params
    finally:
        mngr.close()


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_config_tasks_seeds_and_logs(trained):
    workdir, r = trained
    assert isinstance(r, run.Run)
    assert r.config.name == "Dynamic Fusion" and r.config.num_steps == 20
    assert r.tasks == ["x_plus_y"] and r.seeds == [0, 1]
    assert r.steps("x_plus_y") == [10, 20]
    assert r.logs == {"x_plus_y": logs.read(os.path.join(workdir, "x_plus_y", "metrics.jsonl"))}
    assert [(x["step"], x["seed"]) for x in r.logs["x_plus_y"]] == [
        (s, seed) for s in (5, 10, 15, 20) for seed in (0, 1)
    ]
    curves = r.curves("x_plus_y")
    assert curves["val_acc"].shape == (2, 4)
    assert r.final_info is None  # loop.train writes no report
    info = results.final_info(r.logs, 20, 0.99)
    files.write_json(os.path.join(workdir, "final_info.json"), info)
    assert r.final_info == json.loads(json.dumps(info))


def test_params_are_the_checkpoints_seed_slice(trained):
    workdir, r = trained
    for step, expected_step in ((None, 20), (10, 10)):
        _, stacked = checkpoint_params(workdir, step)
        for index, seed in enumerate(r.seeds):
            assert_trees_equal(
                r.params("x_plus_y", seed, step), jax.tree.map(lambda x, i=index: x[i], stacked)
            )
        assert r.restored_step("x_plus_y", step) == expected_step
    # Different seeds, different models.
    first = jax.tree.leaves(r.params("x_plus_y", 0))[0]
    assert not np.array_equal(first, jax.tree.leaves(r.params("x_plus_y", 1))[0])


def test_apply_gate_weights_and_splits(trained):
    workdir, r = trained
    setup, stacked = checkpoint_params(workdir)
    split = r.splits("x_plus_y", 1)
    np.testing.assert_array_equal(split.val.inputs, setup.data.val.inputs[1])
    np.testing.assert_array_equal(split.train.labels, setup.data.train.labels[1])
    assert not np.array_equal(split.val.inputs, r.splits("x_plus_y", 0).val.inputs)
    tokens = split.val.inputs[:16]
    expected, _ = jax.jit(setup.apply_fn)(jax.tree.map(lambda x: x[1], stacked), tokens)
    logits = r.apply("x_plus_y", 1, tokens)
    assert logits.shape == (16, 11)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
    weights = r.gate_weights("x_plus_y", 1, tokens)
    assert weights.shape == (16, 1, 3)  # [B, last position, experts]
    np.testing.assert_allclose(np.sum(weights, -1), 1.0, rtol=1e-5)
    assert np.all(np.asarray(weights) >= 0)
    # An older checkpoint gives other logits.
    assert not np.allclose(r.apply("x_plus_y", 1, tokens, step=10), logits)


def test_errors_are_one_line(trained, tmp_path):
    workdir, r = trained
    missing = str(tmp_path / "nowhere")
    cases = [
        (lambda: fusion_jax.load_run(missing), f"{missing} does not exist; train into it first"),
        (
            lambda: fusion_jax.load_run(os.path.join(workdir, "config.json")),
            f"{os.path.join(workdir, 'config.json')} is a file, not a workdir",
        ),
        (
            lambda: fusion_jax.load_run(str(tmp_path)),
            f"{tmp_path} has no config.json: it is not a fusion_jax workdir, or its training "
            "never started",
        ),
        (
            lambda: r.params("x_div_y", 0),
            f"unknown task 'x_div_y' for {workdir}; its tasks: x_plus_y",
        ),
        (
            lambda: r.params("x_plus_y", 2),
            f"seed 2 is not a seed of {workdir}; its seeds: 0, 1 (config.seed=0, "
            "config.num_seeds=2)",
        ),
        (
            lambda: r.params("x_plus_y", 0, step=15),
            f"no checkpoint of step 15 for task 'x_plus_y' in {workdir}; saved steps: 10, 20",
        ),
    ]
    for call, message in cases:
        with pytest.raises(UserError) as e:
            call()
        assert str(e.value) == message


def test_errors_of_an_untrained_baseline_workdir(tmp_path):
    config = baseline.get_config("tiny")
    (tmp_path / "config.json").write_text(config.to_json())
    r = fusion_jax.load_run(str(tmp_path))
    assert r.logs == {"x_plus_y": []} and r.steps("x_plus_y") == []
    directory = os.path.join(str(tmp_path), "x_plus_y", "checkpoints")
    with pytest.raises(UserError) as e:
        r.params("x_plus_y", 0)
    assert str(e.value) == f"no checkpoints for task 'x_plus_y' in {directory}; train first"
    assert not os.path.exists(directory)  # reading writes nothing into the workdir
    with pytest.raises(UserError) as e:
        r.gate_weights("x_plus_y", 0, np.zeros((1, 4), np.int32))
    assert str(e.value) == (
        f"{tmp_path} trains 'transformer' models, which have no gate; gate weights exist for "
        "fusion models (configs/dyn_fusion.py)"
    )


def test_merge_run_restores_the_dam_merged_model(tmp_path):
    """A comparison workdir's saved stages (written here as experiments/stages.py writes them,
    untrained) give the DAM-merged model: one-hot coefficients select one expert."""
    config = compare_config.get_config("tiny")
    workdir = str(tmp_path)
    (tmp_path / "config.json").write_text(config.to_json())
    r = fusion_jax.load_run(workdir)
    assert isinstance(r, run.MergeRun) and r.seeds == [0, 1]
    tokens = r.splits("x_minus_y", 1).val.inputs
    example = jnp.asarray(tokens[:2])
    keys = jax.random.split(jax.random.key(0), 3)
    experts = jax.jit(jax.vmap(lambda k: r.model.init(k, example)["params"]))(keys)
    one_hot = jax.tree.map(
        lambda c: c.at[:].set(0).at[1].set(1), merging.init_coefficients(experts)
    )
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.abspath(r.stage_dir("experts", 1)), experts)
        ckpt.save(os.path.abspath(r.stage_dir("dam", 1)), one_hot)
    assert r.saved_stages(1) == ["dam", "experts"] and r.saved_stages(0) == []
    # With f = "none", one-hot coefficients give expert 1 itself (tanh would scale it).
    r.config.dam.nonlinearity = "none"
    expert1 = jax.tree.map(lambda x: x[1], experts)
    assert_trees_equal(r.dam_params(1), merging.dam_merge(one_hot, experts, "none"))
    logits = r.apply(expert1, tokens)
    np.testing.assert_allclose(r.apply(r.dam_params(1), tokens), logits, rtol=1e-6)
    scores = r.evaluate(expert1, 1, tasks=["x_minus_y"])
    labels = r.splits("x_minus_y", 1).val.labels
    assert scores["x_minus_y"]["acc"] == pytest.approx(np.mean(np.argmax(logits, -1) == labels))
    with pytest.raises(UserError) as e:
        r.stage("dam", 0)
    assert str(e.value) == (
        f"no stage 'dam' saved for seed 0 in {workdir}; saved stages: none (train it first)"
    )


def test_analyze_of_a_workdir_still_training_skips_tasks_without_checkpoints(trained, tmp_path):
    from fusion_jax.evaluate import eval_loop

    workdir = str(tmp_path / "copy")
    shutil.copytree(trained[0], workdir)
    config = tiny_fusion()
    config.tasks = "x_plus_y,x_minus_y"  # x_minus_y has started, with no checkpoint yet
    os.makedirs(os.path.join(workdir, "x_minus_y", "checkpoints"))
    out = eval_loop.analyze(config, workdir)
    assert list(out["gates"]) == ["x_plus_y"] and list(out["compute"]) == ["x_plus_y"]
    with open(os.path.join(workdir, "gate_analysis.json")) as f:
        gates = json.load(f)
    assert gates["x_plus_y"]["step"] == 20
    assert len(gates["x_plus_y"]["per_seed"]) == 2


def test_analyze_keeps_earlier_entries_of_tasks_without_checkpoints(trained, tmp_path):
    """A study carried to a fresh machine by its logs and analyses: the finished task's
    checkpoints are gone, its gates stay; the task with checkpoints is analysed afresh."""
    from fusion_jax.evaluate import eval_loop

    workdir = str(tmp_path / "copy")
    shutil.copytree(trained[0], workdir)
    config = tiny_fusion()
    config.tasks = "x_minus_y,x_plus_y"
    earlier = {"x_minus_y": {"step": 7, "mean": "kept"}, "x_plus_y": {"step": 3, "mean": "stale"}}
    for name in ("gate_analysis.json", "compute.json"):
        (tmp_path / "copy" / name).write_text(json.dumps(earlier))
    out = eval_loop.analyze(config, workdir)
    for name, key in (("gate_analysis.json", "gates"), ("compute.json", "compute")):
        with open(os.path.join(workdir, name)) as f:
            written = json.load(f)
        assert written == out[key] and list(written) == ["x_minus_y", "x_plus_y"]
        assert written["x_minus_y"] == earlier["x_minus_y"]
    assert out["gates"]["x_plus_y"]["step"] == 20 and len(out["gates"]["x_plus_y"]["per_seed"]) == 2
    assert "flops_per_example" in out["compute"]["x_plus_y"]
