"""The one training loop: jitted chunks of steps, saved, stopped and resumed the same way for
every run that trains (grokking tasks, every stage of the studies, DAM, LM fusion).

Each caller brings its program (`run_chunk(state, n)`: `n` steps, returning the new state and
the chunk's metrics), where its log records go and how its progress line reads. The loop owns
what must not differ between them:

* chunks end on multiples of the chunk length and of `every_steps`, so a save is always a chunk
  end and a resumed run is chunked as an uninterrupted one (with batches drawn by
  `fold_in(key, step)`, it trains to the same bits);
* a chunk whose metrics hold NaN or Inf stops the run with nothing of it saved or logged;
* saves every `every_steps`, after a chunk once `every_secs` have passed since the last save
  (0: never), at the end (`save_at_end`), and on Ctrl-C or SIGTERM (main.py raises it as
  KeyboardInterrupt). The state saved on the way out is the newest one whose records reached the
  log: a chunk the host was waiting for is first finished and logged;
* in a run of several processes, every choice made from a process's own clock (the next chunk's
  length, a time-based save) and a signal any process received are agreed before they act
  (`runtime.agree`): every chunk and every save is collective;
* the speed behind the progress line's ETA and the chunk length is measured without compiles.
"""

import time
from collections.abc import Callable

import jax
import numpy as np
from absl import logging

from fusion_jax import runtime
from fusion_jax.errors import UserError
from fusion_jax.train import checkpoint


def _non_finite(metrics) -> list[str] | None:
    """Names of the metrics holding NaN or Inf ("" for an unnamed array), None if all finite."""
    bad = [
        ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        for path, x in jax.tree_util.tree_flatten_with_path(metrics)[0]
        if np.issubdtype(np.asarray(x).dtype, np.floating) and not np.all(np.isfinite(x))
    ]
    return bad or None


def compile_reporting(tag: str, jitted, *args, static: tuple = ()):
    """`jitted` compiled ahead of time for `args` (then `static`, its static arguments), with
    the per-device memory XLA plans for it logged: what a run needs, measured rather than
    guessed. Call the result with `args`' kind of arrays only (no static arguments)."""
    compiled = jitted.lower(*args, *static).compile()
    m = compiled.memory_analysis()
    if m is not None:  # backends without the analysis give None
        logging.info(
            "%s program per device: arguments %.3f GB, outputs %.3f GB (%.3f GB of them reusing "
            "donated arguments), temporaries %.3f GB",
            tag, m.argument_size_in_bytes / 1e9, m.output_size_in_bytes / 1e9,
            m.alias_size_in_bytes / 1e9, m.temp_size_in_bytes / 1e9,
        )  # fmt: skip
    return compiled


def _intact(tree) -> bool:
    """False once a leaf was donated to a chunk (its buffer is then gone)."""
    return not any(x.is_deleted() for x in jax.tree.leaves(tree) if isinstance(x, jax.Array))


def train_in_chunks(
    tag: str,
    run_chunk: Callable,
    state,
    start: int,
    num_steps: int,
    *,
    mngr: checkpoint.Manager,
    chunk: int,
    shrink: Callable[[float], int] | None = None,
    report: Callable,
    log: Callable | None = None,
    every_steps: int = 0,
    every_secs: float = 0.0,
    save_at_end: bool = True,
    snapshot: Callable = lambda state: state,
):
    """Trains `state` (at step `start`) to `num_steps`; returns the state (the caller waits for
    and closes `mngr`).

    `chunk`: the chunk length; `shrink(steps per second) -> length`, if given, chooses each next
    length from the measured speed (e.g. to fit time-based saves). After each chunk, with its
    metrics on the host: `log(metrics, step)` writes its records, then `report(metrics, step,
    steps per second, compile seconds or None)` prints its progress line. `snapshot(state)` is
    what a save writes (and what is kept for a save on the way out: a host copy where the chunks
    donate the state and it is small enough to copy after every chunk).
    """
    piece = chunk
    step = saved = start
    latest = (start, snapshot(state))  # the newest state whose records are logged
    seen, pending = set(), None
    last_save = time.monotonic()

    def save(at: int, tree) -> None:
        nonlocal saved, last_save
        saved = at  # an interrupt inside the save does not start a second one
        checkpoint.save(mngr, at, jax.device_get(tree))
        last_save = time.monotonic()

    def record(new_state, metrics, n, tic, compiled) -> float:
        """Waits for a dispatched chunk, checks and logs it; returns its speed in steps/s."""
        nonlocal pending, step, latest
        # Dispatch is asynchronous: the call returns once the program is compiled and queued,
        # so a chunk that compiled is timed from there. Results already there mean it ran
        # inside the call (a profiler, synchronous dispatch): timed from `tic`.
        started = time.perf_counter()
        ran_in_call = jax.tree.leaves(metrics)[0].is_ready() if jax.tree.leaves(metrics) else True
        metrics = jax.device_get(metrics)
        pending = None  # from here on, an interrupt leaves this chunk unlogged and unsaved
        since = started if compiled and not ran_in_call else tic
        rate = n / max(time.perf_counter() - since, 1e-9)
        if (names := _non_finite(metrics)) is not None:
            raise UserError(
                f"{tag}: {', '.join(names) or 'the training loss'} is NaN or Inf by step "
                f"{step + n}; nothing past step {saved} is saved: lower the learning rate or "
                "check the inputs, then rerun"
            )
        if log is not None:
            log(metrics, step + n)
        step += n
        latest = (step, snapshot(new_state))
        report(metrics, step, rate, started - tic if compiled else None)
        return rate

    try:
        while step < num_steps:
            n = min(piece - step % piece, num_steps - step)
            if every_steps:
                n = min(n, every_steps - step % every_steps)
            compiled = n not in seen
            seen.add(n)
            tic = time.perf_counter()
            state, metrics = run_chunk(state, n)
            pending = (state, metrics, n, tic, compiled)
            rate = record(*pending)
            # Not at the end: a stage saved whole when its training ends needs no copy of it.
            due = step < num_steps and 0 < every_secs <= time.monotonic() - last_save
            (piece, due), signum = runtime.agree(chunk if shrink is None else shrink(rate), due)
            at_end = step == num_steps and save_at_end
            if (every_steps and step % every_steps == 0) or at_end or due or signum:
                save(*latest)
            if signum:  # a process of a multi-process run was stopped: all stop here, saved
                mngr.wait_until_finished()
                # Together, none exiting while another still saves; raises KeyboardInterrupt.
                runtime.wait_for_all(f"stop at step {step}")
    except KeyboardInterrupt:
        if pending is not None and _intact(pending[0]):
            # The usual case: the host was waiting for a chunk. Wait for it to end and log it,
            # so that the newest state is saved (its log lines written first).
            record(*pending)
        at, tree = latest
        if at > saved and _intact(tree):
            logging.warning("%s interrupted: saving step %d before exiting", tag, at)
            save(at, tree)
        elif at > saved:
            # Donated to a chunk that the interrupt stopped before it returned its new state:
            # the last save is the newest state there is.
            logging.warning("%s interrupted inside a chunk: resuming from step %d", tag, saved)
        raise
    finally:
        mngr.wait_until_finished()
    return state
