"""Two processes with 2 fake CPU devices each (collectives through gloo on the loopback address)
train to the same parameters and logs as one process with 4 devices."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading

import numpy as np
from test_multidevice import assert_params_match

from configs import baseline
from fusion_jax.train import checkpoint, logs, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _restore(config, workdir):
    setup = loop.setup_task(config, "x_plus_y")
    mngr = checkpoint.manager(os.path.join(workdir, "x_plus_y", "checkpoints"), 2)
    try:
        return checkpoint.restore(mngr, setup.abstract_runs())
    finally:
        mngr.close()


# main.py, except that process 1's own clock would choose otherwise than process 0's: chunks of
# one evaluation interval, and a time-based save after every chunk. Every chunk and save is
# collective, so a process that followed its own choice would wait forever for the other.
DIVERGENT_CLOCKS = """
import itertools, runpy, sys, time, types
from fusion_jax.train import loop
if sys.argv[1] == "1":
    loop.piece_steps = lambda *args: 5
    clock = itertools.count(0.0, 1e6)  # 1e6 s pass between readings: a save is always due
    loop.time = types.SimpleNamespace(perf_counter=time.perf_counter, monotonic=clock.__next__)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _spawn(args_of, devices: int) -> list[subprocess.Popen]:
    """Two processes running `python *args_of(i)`, with `devices` fake CPU devices each."""
    # The last of a repeated XLA flag wins; the rest of conftest's flags carry over.
    flag = f" --xla_force_host_platform_device_count={devices}"
    env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"] + flag)
    return [
        subprocess.Popen(
            [sys.executable, *args_of(i)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]


def _two_processes(workdir, python_args, *flags):
    """Starts main.py (after `python_args`, where "{process}" becomes the process id) as the
    two processes of one run of the tiny baseline, 2 fake CPU devices each."""
    port = _free_port()
    return _spawn(
        lambda i: [
            *(a.format(process=i) for a in python_args),
            os.path.join(ROOT, "main.py"),
            "--config=configs/baseline.py:tiny",
            f"--workdir={workdir}",
            "--config.train.num_processes=2",
            f"--config.train.coordinator_address=127.0.0.1:{port}",
            f"--config.train.process_id={i}",
            *flags,
        ],
        2,
    )


def test_two_processes_train_like_one_process_with_four_devices(tmp_path):
    config = baseline.get_config("tiny")
    config.train.num_devices = 4
    one = str(tmp_path / "one")
    records = loop.train(config, one)["x_plus_y"]

    two = str(tmp_path / "two")
    procs = _two_processes(two, ["-c", DIVERGENT_CLOCKS, "{process}"])
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "4 in all over 2 process(es)" in outputs[1]

    # Process 1 ran process 0's chunks (log_every: a progress line at steps 10 and 20 only).
    assert re.findall(r"\[x_plus_y\] step (\d+)/20", outputs[1]) == ["10", "20"], outputs[1][-3000:]
    # Process 0 alone wrote the log and the results; both saved the checkpoint together.
    ours = logs.to_arrays(logs.read(os.path.join(two, "x_plus_y", "metrics.jsonl")))
    theirs = logs.to_arrays(records)
    np.testing.assert_array_equal(ours["step"], theirs["step"])
    for name in logs.METRICS:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=2e-5, atol=1e-6, err_msg=name)
    assert os.path.exists(os.path.join(two, "final_info.json"))

    assert_params_match(
        _restore(config, two).params, _restore(config, one).params, config.model.dim
    )


def test_a_signal_to_one_process_stops_both_at_the_same_saved_step(tmp_path):
    # SIGTERM to process 1 only, once it logged its first chunk: both processes save the same
    # chunk end and die by SIGTERM; the rerun resumes there and logs every step once.
    flags = ["--config.num_steps=200", "--config.train.checkpoint_every=200"]
    workdir = str(tmp_path / "two")
    procs = _two_processes(workdir, [], *flags)
    # Reading process 1's lines has no timeout of its own: a hung run is killed after 300 s.
    watchdog = threading.Timer(300, lambda: [p.kill() for p in procs])
    watchdog.start()
    for line in procs[1].stdout:
        if "[x_plus_y] step 10/200" in line:
            procs[1].send_signal(signal.SIGTERM)
            break
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    watchdog.cancel()
    assert [p.returncode for p in procs] == [-15, -15], outputs[0][-2000:] + outputs[1][-2000:]
    (saved,) = os.listdir(os.path.join(workdir, "x_plus_y", "checkpoints"))
    assert 10 <= int(saved) < 200 and int(saved) % 10 == 0
    procs = _two_processes(workdir, [], *flags)
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:]
    assert f"resuming from the checkpoint at step {saved}" in outputs[1]
    logged = logs.read(os.path.join(workdir, "x_plus_y", "metrics.jsonl"))
    assert [(r["step"], r["seed"]) for r in logged] == [
        (step, seed) for step in range(5, 201, 5) for seed in (0, 1)
    ]


def test_a_second_signal_ends_a_process_of_several_at_once():
    # The handler a multi-process run installs: the first signal is kept for the next chunk
    # end, a second one ends the process by that signal there and then.
    script = (
        "import signal; from fusion_jax import runtime\n"
        "runtime._record_signal(signal.SIGINT, None)\n"
        "print('kept', runtime._received == signal.SIGINT, flush=True)\n"
        "runtime._record_signal(signal.SIGTERM, None)\n"
        "print('survived')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (-signal.SIGTERM, "kept True\n"), done.stderr[-2000:]


# main.py, where process 1 receives SIGTERM just after its first task's last chunk.
SIGNAL_AFTER_FIRST_TASK = """
import runpy, signal, sys
from fusion_jax import runtime
from fusion_jax.train import loop
if sys.argv[1] == "1":
    train_task = loop.train_task

    def then_signalled(*args):
        records = train_task(*args)
        runtime._record_signal(signal.SIGTERM, None)
        return records

    loop.train_task = then_signalled
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_signal_between_tasks_stops_both_before_the_next_task(tmp_path):
    workdir = str(tmp_path / "two")
    procs = _two_processes(
        workdir, ["-c", SIGNAL_AFTER_FIRST_TASK, "{process}"], "--config.tasks=x_plus_y,x_minus_y"
    )
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [-15, -15], outputs[0][-2000:] + outputs[1][-2000:]
    assert "20" in os.listdir(os.path.join(workdir, "x_plus_y", "checkpoints"))
    assert not os.path.exists(os.path.join(workdir, "x_minus_y"))


def test_sigterm_stops_a_run_on_a_cluster_of_one_process(tmp_path):
    # num_processes=0 under Open MPI's variables, as `mpirun -n 1` sets them: JAX joins a
    # cluster of one process, whose preemption notifier must not keep SIGTERM from main.py.
    env = dict(
        os.environ,
        OMPI_MCA_orte_hnp_uri="4096.0;tcp://127.0.0.1:1",
        OMPI_COMM_WORLD_SIZE="1",
        OMPI_COMM_WORLD_RANK="0",
        OMPI_COMM_WORLD_LOCAL_RANK="0",
        JAX_COORDINATOR_PORT=str(_free_port()),
    )
    workdir = str(tmp_path / "one")
    proc = subprocess.Popen(
        [
            sys.executable, os.path.join(ROOT, "main.py"), "--config=configs/baseline.py:tiny",
            f"--workdir={workdir}", "--config.train.num_processes=0", "--config.num_steps=400",
            "--config.train.checkpoint_every=400",
        ],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "[x_plus_y] step 10/400" in line:
            proc.send_signal(signal.SIGTERM)
            break
    output = "".join(lines) + proc.communicate(timeout=300)[0]
    watchdog.cancel()
    assert "1 process(es)" in output and proc.returncode == -15, output[-3000:]
    (saved,) = os.listdir(os.path.join(workdir, "x_plus_y", "checkpoints"))
    assert 10 <= int(saved) < 400


# One sharded DAM training (engine.train_dam, 2 steps) of two scaled copies of the Llama fixture
# on a data:2 x model:4 mesh of every process's devices; process 0 writes the coefficients.
SHARDED_DAM = """
import sys
import jax, ml_collections, numpy as np
process, port, out, checkpoints = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
if process >= 0:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process)
from jax.experimental import multihost_utils
from fusion_jax import hf_checkpoint as hc, mesh
from fusion_jax.experiments import engine
from fusion_jax.models import lm
from fusion_jax.train import checkpoint

source = "tests/fixtures/lm/llama"
_, params = hc.load(source)
m = mesh.make("data:2,model:4", jax.devices())
stacked = mesh.stack_onto([params, jax.tree.map(lambda x: 0.8 * x, params)], m)
model = lm.LanguageModel(lm.LMConfig.from_hf(hc.read_config(source)))
rng = np.random.default_rng(0)
tables = (rng.integers(0, 260, (2, 6, 17)).astype(np.int32), np.ones((2, 6, 16), np.float32),
          np.array([6, 6], np.int32))
whole = jax.sharding.NamedSharding(m, jax.sharding.PartitionSpec())
tables = tuple(mesh.from_host(lambda i, t=t: t[i], t.shape, t.dtype, whole) for t in tables)
mngr = checkpoint.manager(checkpoints, max_to_keep=1)
coefficients, _, _ = engine.train_dam(
    "[dam]", stacked, ml_collections.ConfigDict({"learning_rate": 3e-2, "num_steps": 2}),
    lambda p, x: model.apply({"params": p}, x[:, :-1]),
    lambda *data: engine.sample_experts(*data, batch_size=4), tables, jax.random.key(0),
    data_axes=(), chunk=1, progress=lambda state: (mngr, None),
    constrain=lambda batch: jax.lax.with_sharding_constraint(batch, mesh.batch(m, 1)),
    shard=lambda tree: mesh.shardings(tree, m),
)
mngr.close()
flat = {mesh.path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(
    multihost_utils.process_allgather(coefficients, tiled=True))}
if process <= 0:
    np.savez(out, **flat)
"""


def test_two_processes_run_a_sharded_dam_step_like_one_process_with_eight_devices(tmp_path):
    one = tmp_path / "one.npz"
    done = subprocess.run([sys.executable, "-c", SHARDED_DAM, "-1", "0", str(one),
                           str(tmp_path / "c1")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    two, port = tmp_path / "two.npz", _free_port()
    procs = _spawn(lambda i: ["-c", SHARDED_DAM, str(i), str(port), str(two), str(tmp_path / "c2")],
                   4)  # fmt: skip
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    a, b = np.load(one), np.load(two)
    assert sorted(a) == sorted(b) and len(a) > 10
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # The training moved the coefficients from their start (1/K = 0.5).
    assert max(float(np.abs(a[key] - 0.5).max()) for key in a) > 1e-3
