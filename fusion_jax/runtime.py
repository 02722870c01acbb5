"""The process's place in a run: multi-process start-up, the devices it uses, who writes files.

A run of several processes (a TPU pod slice, GPU hosts, or CPU processes in tests) trains one
program: every process feeds its local devices and the collectives span all of them. Process 0
alone writes config.json, logs, plots and result files; Orbax saves and restores checkpoints
collectively (every process calls it, process 0 writes).
"""

import contextlib
import gc
import os
import signal
import sys
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from fusion_jax.errors import UserError

# In a multi-process run: the signal (SIGINT, SIGTERM) this process has received, 0 if none.
_received = 0


def _record_signal(signum, frame) -> None:
    del frame
    global _received
    if _received:
        # A second signal: die by it now (a hung run). Raising instead would send this process
        # alone into the collective save on the way out, and wait there for the others.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    _received = signum


def start(config) -> None:
    """Call before any JAX computation of a training run: joins the other processes of a
    multi-process run (config.train.num_processes), then `check_devices`.

    In a multi-process run, SIGINT and SIGTERM are recorded instead of raised: a process
    stopping at once would leave the others waiting in their next collective. The training loop
    stops every process at the same chunk end instead (`agree`)."""
    train = config.get("train") or {}
    processes = train.get("num_processes", 1)
    if processes != 1 and not jax.distributed.is_initialized():
        # CPU processes reach each other's devices through gloo (no effect on GPU or TPU).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        previous = signal.getsignal(signal.SIGTERM)
        if processes == 0:  # TPU pod slices, SLURM, Open MPI: the cluster describes itself
            jax.distributed.initialize()
        else:
            jax.distributed.initialize(
                train.coordinator_address, num_processes=processes, process_id=train.process_id
            )
        if jax.process_count() == 1 and previous is not None:
            # JAX's preemption notifier took SIGTERM, and a cluster of one process never asks
            # it: SIGTERM goes back to the handler it had (main.py's, which saves and stops).
            signal.signal(signal.SIGTERM, previous)
    if jax.process_count() > 1:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, _record_signal)
    check_devices(config)


def check_devices(config) -> None:
    """Logs the backend and devices in use; fails if config.train.require_accelerator is set
    and JAX found only the CPU."""
    train = config.get("train") or {}
    backend = jax.default_backend()
    devices = jax.local_devices()
    logging.info(
        "JAX %s on %s: %d local devices (%s), %d in all over %d process(es); this is process %d",
        jax.__version__, backend, len(devices), devices[0].device_kind, jax.device_count(),
        jax.process_count(), jax.process_index(),
    )  # fmt: skip
    if train.get("require_accelerator", False) and backend == "cpu":
        raise UserError(
            "config.train.require_accelerator=True but JAX found only the CPU: install the "
            "accelerator build (pip install -e '.[cuda]' or '.[tpu]'), check that the runtime "
            "has a GPU or TPU attached, or set config.train.require_accelerator=False"
        )


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


def agree(*values: int) -> tuple[tuple[int, ...], int]:
    """(process 0's integers `values`, the signal any process has received or 0), the same in
    every process. Choices made from a process's own clock (the chunk length, whether a
    time-based save is due) and a stop must agree: every chunk and every save is collective, so
    a process that went its own way would leave the others waiting forever. One process: its
    values, and 0 (a signal raises KeyboardInterrupt at once there)."""
    if jax.process_count() == 1:
        return values, 0
    rows = multihost_utils.process_allgather(np.asarray([*values, _received], np.int64))
    return tuple(int(v) for v in rows[0, :-1]), int(rows[:, -1].max())


def wait_for_all(name: str) -> None:
    """Returns when every process of a multi-process run has reached this point, so that they
    shut jax.distributed down together (one process exiting early times the others out), or
    start the next task together. A signal any process has received since the last chunk then
    ends every process by it, rather than with status 0 or after the next task's first chunk."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
        if signum := agree()[1]:
            raise KeyboardInterrupt(signum)


def raise_interrupt(signum, frame) -> None:
    """SIGTERM handler (preemption, `kill`): stop as Ctrl-C does, so the loops save on the way
    out. The signal number rides along for `exit_on_interrupt`.

    Python discards an exception raised inside a garbage-collector callback ("Exception ignored
    in", and the run went on: JAX registers one, and a SIGTERM during a compile landed there under
    load). There the signal is sent again a moment later instead, to reach the code it stopped."""
    if _in_gc_callback(frame):
        threading.Timer(0.01, os.kill, (os.getpid(), signum)).start()
        return
    raise KeyboardInterrupt(signum)


def _in_gc_callback(frame) -> bool:
    callbacks = {getattr(c, "__code__", None) for c in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks:
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def exit_on_interrupt(wait_for_saves=lambda: None):
    """Ends the process by the signal (Ctrl-C: SIGINT) when an interrupt leaves the block.

    The loops save on their way out; `wait_for_saves()` then waits for any save still in flight
    (an interrupt can end the wait for one), with further SIGINT/SIGTERM ignored. The process
    then dies by the signal itself, as an unhandled Ctrl-C would (shells see status 130 or 143,
    and stop their loops), without interpreter shutdown: an interrupt that lands while JAX waits
    for a compile leaves the compile running on XLA's thread pool, and shutdown frees the devices
    under it (a segmentation fault; BUILD_NOTES, "SIGTERM during a compile").
    """
    try:
        yield
    except KeyboardInterrupt as e:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        by_signal = bool(e.args) and isinstance(e.args[0], int)
        signum = signal.Signals(e.args[0] if by_signal else signal.SIGINT)
        wait_for_saves()
        logging.warning("stopped by %s: a rerun continues from what was saved", signum.name)
        logging.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)  # not reached: the default action of both signals ends the process
