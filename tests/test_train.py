"""End to end through main.py, eval mode, checkpoints, resume, the schedule and config errors."""

import functools
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import baseline
from configs import lm_fuse as lm_fuse_config
from configs import lm_study as lm_study_config
from fusion_jax import modes
from fusion_jax.errors import UserError
from fusion_jax.evaluate import compare
from fusion_jax.train import checkpoint, logs, loop, steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA = os.path.join(ROOT, "tests", "fixtures", "lm", "llama")
REFERENCE_KEYS = {
    "means": {f"{k}_mean" for k in ("final_train_loss", "final_val_loss", "final_train_acc",
                                      "final_val_acc", "step_val_acc_99")},
    "stderrs": {f"{k}_stderr" for k in ("final_train_loss", "final_val_loss", "final_train_acc",
                                          "final_val_acc", "step_val_acc_99")},
}  # fmt: skip


def tiny():
    config = baseline.get_config("tiny")
    config.train.num_devices = 1
    return config


def restore_params(workdir, config, task="x_plus_y", step=None):
    setup = loop.setup_task(config, task)
    mngr = checkpoint.manager(os.path.join(workdir, task, "checkpoints"), 5)
    try:
        return checkpoint.restore(mngr, setup.abstract_runs(), step)
    finally:
        mngr.close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny baseline trained once through main.py's flag parsing and dispatch."""
    workdir = str(tmp_path_factory.mktemp("baseline"))
    command = [sys.executable, "main.py", "--config=configs/baseline.py:tiny",
               f"--workdir={workdir}", "--config.train.num_devices=1"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[x_plus_y] step 20/20" in done.stderr  # progress lines reach the console
    return workdir


def test_main_writes_reference_outputs(trained):
    with open(os.path.join(trained, "final_info.json")) as f:
        info = json.load(f)
    assert set(info) == {"x_plus_y"}
    assert set(info["x_plus_y"]["means"]) == REFERENCE_KEYS["means"]
    assert set(info["x_plus_y"]["stderrs"]) == REFERENCE_KEYS["stderrs"]
    assert len(info["x_plus_y"]["final_info_dict"]["final_val_acc"]) == 2  # one per seed
    for split in ("train", "val"):
        for metric in ("loss", "acc"):
            assert os.path.getsize(os.path.join(trained, f"{split}_{metric}_x_plus_y.png")) > 1000
    records = logs.read(os.path.join(trained, "x_plus_y", "metrics.jsonl"))
    assert [(r["step"], r["seed"]) for r in records] == [
        (s, r) for s in (5, 10, 15, 20) for r in (0, 1)
    ]
    # The final_info values are the last logged ones.
    last = [r for r in records if r["step"] == 20]
    assert info["x_plus_y"]["final_info_dict"]["final_val_loss"] == [r["val_loss"] for r in last]


def test_eval_mode_recomputes_logged_validation(trained):
    config = tiny()
    out = modes.evaluate(config, trained)["x_plus_y"]
    records = logs.read(os.path.join(trained, "x_plus_y", "metrics.jsonl"))
    last = [r for r in records if r["step"] == 20]
    assert out["step"] == 20 and out["seeds"] == [0, 1]
    np.testing.assert_allclose(out["val_loss"], [r["val_loss"] for r in last], rtol=1e-5)
    np.testing.assert_allclose(out["val_acc"], [r["val_acc"] for r in last], rtol=1e-6)
    assert os.path.exists(os.path.join(trained, "eval_latest.json"))
    earlier = modes.evaluate(config, trained, step=10)["x_plus_y"]
    at_10 = [r for r in records if r["step"] == 10]
    np.testing.assert_allclose(earlier["val_loss"], [r["val_loss"] for r in at_10], rtol=1e-5)
    with pytest.raises(UserError) as e:
        modes.evaluate(config, trained, step=7)
    checkpoints = os.path.join(trained, "x_plus_y", "checkpoints")
    assert str(e.value) == f"No checkpoint for step 7 in {checkpoints}; saved steps: [10, 20]."


def test_the_tiny_run_trains_as_it_did_before_the_one_training_loop(trained):
    """Pinned: the log of the tiny baseline written by the grokking loop of 23cb38c, before it
    moved onto train/chunks.py (there, the new loop matched it bit for bit, parameters too).
    Within 1e-5: a CPU of another kind may round a reduction in another order."""
    with open(os.path.join(ROOT, "tests", "fixtures", "grokking_tiny_log.json")) as f:
        pinned = np.asarray(json.load(f)["x_plus_y"])
    records = logs.read(os.path.join(trained, "x_plus_y", "metrics.jsonl"))
    ours = np.asarray([[r[k] for k in ("step", "seed", "train_loss", "val_loss", "train_acc",
                                       "val_acc")] for r in records])  # fmt: skip
    np.testing.assert_array_equal(ours[:, :2], pinned[:, :2])
    np.testing.assert_allclose(ours[:, 2:], pinned[:, 2:], rtol=1e-5, atol=0)


def test_rerun_of_finished_workdir_skips_training(trained):
    before = os.path.getmtime(os.path.join(trained, "x_plus_y", "metrics.jsonl"))
    records = loop.train(tiny(), trained)["x_plus_y"]
    assert len(records) == 8
    assert os.path.getmtime(os.path.join(trained, "x_plus_y", "metrics.jsonl")) == before


def test_interrupt_then_resume_equals_uninterrupted(trained, tmp_path, monkeypatch):
    config = tiny()
    config.train.checkpoint_every = 20  # so only the interrupt handler saves step 10
    real_progress = loop._progress

    def interrupt(*args):
        real_progress(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_progress", interrupt)
    with pytest.raises(KeyboardInterrupt):
        loop.train(config, str(tmp_path))
    monkeypatch.setattr(loop, "_progress", real_progress)
    assert restore_params(str(tmp_path), config).step.tolist() == [10, 10]
    loop.train(config, str(tmp_path))

    resumed = restore_params(str(tmp_path), config)
    uninterrupted = restore_params(trained, config)
    assert resumed.step.tolist() == [20, 20]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 resumed.params, uninterrupted.params)  # fmt: skip
    assert logs.read(os.path.join(tmp_path, "x_plus_y", "metrics.jsonl")) == logs.read(
        os.path.join(trained, "x_plus_y", "metrics.jsonl")
    )


def test_a_task_finished_by_its_log_is_not_trained_again_without_checkpoints(trained, tmp_path):
    # A study carried to a fresh machine by its results/ folder: config.json and the logs.
    workdir = str(tmp_path / "carried")
    shutil.copytree(trained, workdir)
    shutil.rmtree(os.path.join(workdir, "x_plus_y", "checkpoints"))
    log = os.path.join(workdir, "x_plus_y", "metrics.jsonl")
    before = open(log).read()
    records = loop.train(tiny(), workdir)["x_plus_y"]
    assert open(log).read() == before and records == logs.read(log)
    assert not os.listdir(os.path.join(workdir, "x_plus_y", "checkpoints"))
    # A log short of the last step is an unfinished task: it trains from the start.
    with open(log, "w") as f:
        f.writelines(line + "\n" for line in before.splitlines()[:-2])
    loop.train(tiny(), workdir)
    assert open(log).read() == before


def test_time_based_checkpoints_survive_a_hard_kill_and_resume_to_identical_results(
    tmp_path, monkeypatch
):
    def config_40():
        config = tiny()
        config.num_steps = config.train.checkpoint_every = 40  # step checkpoints at the end only
        return config

    uninterrupted = str(tmp_path / "uninterrupted")
    loop.train(config_40(), uninterrupted)

    config = config_40()
    config.train.checkpoint_every_secs = 1e-9  # a save is due after every chunk
    # As on a slow device: chunks of one evaluation interval once the speed is measured.
    monkeypatch.setattr(loop, "piece_steps", lambda *args: config.train.eval_every)
    real_progress = loop._progress

    def killed_at_30(task, step, *args):
        real_progress(task, step, *args)
        if step == 30:
            raise RuntimeError("killed")  # no handler saves anything, as with kill -9

    saved, save = [], checkpoint.save

    def recording_save(mngr, step, state):
        save(mngr, step, state)
        saved.append(step)

    monkeypatch.setattr(loop, "_progress", killed_at_30)
    monkeypatch.setattr(checkpoint, "save", recording_save)
    workdir = str(tmp_path / "killed")
    with pytest.raises(RuntimeError, match="killed"):
        loop.train(config, workdir)
    monkeypatch.undo()
    # The first chunk (log_every) is timed without its compile, so the chunks shrink right after
    # it: 0-10, then 10-15, ..., 25-30, with a time-based save after every chunk before the kill.
    assert saved == [10, 15, 20, 25]
    assert restore_params(workdir, config).step.tolist() == [25, 25]
    loop.train(config, workdir)

    resumed, expected = restore_params(workdir, config), restore_params(uninterrupted, config)
    assert resumed.step.tolist() == [40, 40]
    jax.tree.map(np.testing.assert_array_equal, resumed.params, expected.params)
    ours, theirs = (
        logs.to_arrays(logs.read(os.path.join(w, "x_plus_y", "metrics.jsonl")))
        for w in (workdir, uninterrupted)
    )
    for name in ("step", "seed", "train_loss", "train_acc", "val_acc"):
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    # A validation pass compiled into a shorter chunk may round its sum in another order.
    np.testing.assert_allclose(ours["val_loss"], theirs["val_loss"], rtol=1e-6)


def test_a_run_whose_loss_turns_nan_stops_with_nothing_of_that_chunk_kept(tmp_path, monkeypatch):
    make_chunk_fn, calls = steps.make_chunk_fn, []

    def nan_in_second_chunk(*args):
        chunk_fn = make_chunk_fn(*args)

        def call(*inputs):
            state, metrics = chunk_fn(*inputs)
            calls.append(1)
            if len(calls) == 2:
                metrics = {**metrics, "train_loss": metrics["train_loss"] * jnp.nan}
            return state, metrics

        return call

    monkeypatch.setattr(steps, "make_chunk_fn", nan_in_second_chunk)
    config = tiny()
    config.train.checkpoint_every = 10
    with pytest.raises(UserError) as e:
        loop.train(config, str(tmp_path))
    assert str(e.value) == (
        "[x_plus_y]: train_loss is NaN or Inf by step 20; nothing past step 10 is saved: lower "
        "the learning rate or check the inputs, then rerun"
    )
    log = logs.read(str(tmp_path / "x_plus_y" / "metrics.jsonl"))
    assert max(r["step"] for r in log) == 10
    assert restore_params(str(tmp_path), config).step.tolist() == [10, 10]


def test_a_chunk_is_timed_without_its_compile(tmp_path, monkeypatch):
    # A 2 s "compile" inside the first call of every chunk program: the speed that chooses the
    # next chunk length leaves it out (10 tiny updates take well under 0.5 s, so > 20 steps/s;
    # timed with it, at most 10 / 2 = 5 steps/s).
    make_chunk_fn, rates = steps.make_chunk_fn, []

    def slow_to_compile(*args):
        chunk_fn, calls = make_chunk_fn(*args), []

        def call(*inputs):
            if not calls:
                time.sleep(2)
            calls.append(1)
            return chunk_fn(*inputs)

        return call

    monkeypatch.setattr(steps, "make_chunk_fn", slow_to_compile)
    monkeypatch.setattr(loop, "piece_steps", lambda rate, *args: rates.append(rate) or args[-1])
    loop.train(tiny(), str(tmp_path))
    assert len(rates) == 2 and rates[0] > 20, rates


def test_a_chunk_that_ran_inside_its_call_is_timed_from_the_call(tmp_path, monkeypatch):
    # Synchronous dispatch (a profiler, async dispatch off): the call returns with the results,
    # 2 s after it began. Timed from its return, the speed would be absurd and pick the longest
    # chunks; from the call, it is at most 10 / 2 = 5 steps/s.
    make_chunk_fn, rates = steps.make_chunk_fn, []

    def synchronous(*args):
        chunk_fn = make_chunk_fn(*args)

        def call(*inputs):
            time.sleep(2)
            return jax.block_until_ready(chunk_fn(*inputs))

        return call

    monkeypatch.setattr(steps, "make_chunk_fn", synchronous)
    monkeypatch.setattr(loop, "piece_steps", lambda rate, *args: rates.append(rate) or args[-1])
    loop.train(tiny(), str(tmp_path))
    assert len(rates) == 2 and all(r <= 5 for r in rates), rates


def _lm_fuse_config():
    config = lm_fuse_config.get_config()
    config.models = f"{LLAMA},{LLAMA}"
    config.data.sources = f"{LLAMA}/config.json,{LLAMA}/generation_config.json"
    return config


@pytest.mark.parametrize(
    "make_config", [tiny, lambda: lm_study_config.get_config("tiny"), _lm_fuse_config],
    ids=["grokking", "lm_study", "lm_fuse"],
)  # fmt: skip
def test_a_required_accelerator_that_is_missing_stops_the_run_before_any_work(
    tmp_path, make_config
):
    config = make_config()
    config.train.require_accelerator = True
    workdir = tmp_path / "run"
    with pytest.raises(UserError) as e:
        modes.train(config, str(workdir))
    assert str(e.value) == (
        "config.train.require_accelerator=True but JAX found only the CPU: install the "
        "accelerator build (pip install -e '.[cuda]' or '.[tpu]'), check that the runtime has a "
        "GPU or TPU attached, or set config.train.require_accelerator=False"
    )
    assert not workdir.exists()


@pytest.mark.parametrize(
    "steps_per_sec, every_secs, expected",
    [(100.0, 600, 500), (0.5, 600, 50), (0.2, 600, 20), (0.01, 600, 10), (0.01, 0, 500)],
)
def test_chunks_shrink_to_a_quarter_of_the_checkpoint_interval(steps_per_sec, every_secs, expected):
    # log_every 500, eval_every 10: chunk lengths are multiples of 10 that divide 500.
    assert loop.piece_steps(steps_per_sec, every_secs, 10, 500) == expected


def test_checkpoint_round_trip(tmp_path):
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.array([3, 3], jnp.int32)}
    mngr = checkpoint.manager(str(tmp_path), max_to_keep=2)
    for step in (1, 2, 3):
        checkpoint.save(mngr, step, jax.tree.map(lambda x, s=step: x + s, state))
    mngr.wait_until_finished()
    assert mngr.all_steps() == [2, 3]  # max_to_keep
    restored = checkpoint.restore(mngr, state)
    np.testing.assert_array_equal(restored["w"], state["w"] + 3)
    np.testing.assert_array_equal(checkpoint.restore(mngr, state, 2)["step"], [5, 5])
    mngr.close()


def test_training_lowers_the_loss_and_first_update_has_lr_zero():
    config = tiny()
    config.num_seeds = 1
    config.opt.warmup_steps = 5
    config.opt.learning_rate = 1e-2
    setup = loop.setup_task(config, "x_plus_y")
    cfg = loop.step_config(config, 1)
    state = jax.tree.map(lambda x: x[0], setup.init_runs())
    data = jax.tree.map(lambda x: jnp.asarray(x[0]), setup.data.train)

    @jax.jit
    def run(state):
        return steps.train_steps(state, data, setup.run_keys[0], 200, apply_fn=setup.apply_fn,
                                 tx=setup.tx, cfg=cfg, axis_name=None)  # fmt: skip

    step = jax.jit(functools.partial(steps.train_step, apply_fn=setup.apply_fn, tx=setup.tx,
                                     cfg=cfg, axis_name=None))  # fmt: skip
    first, _ = step(state, data, setup.run_keys[0])  # jitted: op-by-op dispatch took ~15 s
    jax.tree.map(np.testing.assert_array_equal, first.params, state.params)  # lr(0) = 0
    end, metrics = run(state)
    assert int(end.step) == 200
    assert metrics["loss"][-10:].mean() < 0.7 * metrics["loss"][:5].mean()


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("train.num_devices", 4, "config.train.batch_size=30: must be divisible by the 4 devices "
         "used for data parallelism (or set config.train.num_devices)"),
        ("train.num_devices", 64, "config.train.num_devices=64: must be an integer in [0, 8] "
         "(the local devices; 0 = all)"),
        ("model.matmul_precision", "tf32", "config.model.matmul_precision='tf32': must be one "
         "of 'highest', 'high', 'default'"),
        ("model.compute_dtype", "float16", "config.model.compute_dtype='float16': must be one "
         "of 'float32', 'bfloat16'"),
        ("train.num_processes", 2, "config.train.coordinator_address='': must be 'host:port' of "
         "process 0 when config.train.num_processes=2"),
        ("train.log_every", 7, "config.train.log_every=7: must be a multiple of "
         "config.train.eval_every=5"),
        ("num_steps", 12, "config.num_steps=12: must be a multiple of config.train.eval_every=5"),
        ("eval.mode", "all", "config.eval.mode='all': must be one of 'exact', 'sampled'"),
        ("tasks", "x_plus_y,mod_pow", "config.tasks='x_plus_y,mod_pow': must be distinct "
         "comma-separated task names from permutation, x_div_y, x_minus_y, x_plus_y"),
        ("model.num_heads", 3, "config.model.num_heads=3: must be a divisor of "
         "config.model.dim=32"),
    ],
)  # fmt: skip
def test_bad_configs_fail_with_clear_errors(tmp_path, field, value, message):
    config = tiny()
    config.train.batch_size = 30
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(UserError) as e:
        loop.train(config, str(tmp_path / "w"))
    assert str(e.value) == message
    assert not (tmp_path / "w").exists()  # refused before anything was written


def test_compare_mode_puts_seed_numbers_beside_ours(trained, tmp_path):
    out = str(tmp_path / "cmp")
    table = modes.compare(None, out, workdirs=f"{trained},{trained}")
    rows = table["x_plus_y"]
    assert len(rows) == 2 and rows[0]["run"] != rows[1]["run"]  # same name, told apart
    with open(compare.REFERENCE) as f:
        seed = json.load(f)["run_0"]["means"]["x_plus_y"]
    assert rows[0]["seed_final_val_acc"] == seed["final_val_acc_mean"]
    info = json.load(open(os.path.join(trained, "final_info.json")))["x_plus_y"]
    assert rows[0]["final_val_loss"] == info["means"]["final_val_loss_mean"]
    markdown = open(os.path.join(out, "comparison.md")).read()
    assert f"{seed['step_val_acc_99_mean']:.4g}" in markdown
    assert os.path.exists(os.path.join(out, "val_acc_x_plus_y.png"))
