"""Two processes with 2 fake CPU devices each (collectives through gloo on the loopback address)
train to the same parameters and logs as one process with 4 devices."""

import os
import re
import socket
import subprocess
import sys

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


def test_two_processes_train_like_one_process_with_four_devices(tmp_path):
    config = baseline.get_config("tiny")
    config.train.num_devices = 4
    one = str(tmp_path / "one")
    records = loop.train(config, one)["x_plus_y"]

    two = str(tmp_path / "two")
    # The last of a repeated XLA flag wins; the rest of conftest's flags carry over.
    flags = os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2"
    env = dict(os.environ, XLA_FLAGS=flags)
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                DIVERGENT_CLOCKS,
                str(i),
                os.path.join(ROOT, "main.py"),
                "--config=configs/baseline.py:tiny",
                f"--workdir={two}",
                "--config.train.num_processes=2",
                f"--config.train.coordinator_address=127.0.0.1:{port}",
                f"--config.train.process_id={i}",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
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
