"""The one training loop (fusion_jax/train/chunks.py): where chunks end, what is saved, what an
interrupt or a non-finite chunk leaves behind."""

import jax
import jax.numpy as jnp
import pytest

from fusion_jax.errors import UserError
from fusion_jax.train import checkpoint, chunks


def _run_chunk(state, n):
    """n steps of a toy run: the loss of step s is 1 / s."""
    steps = state["step"] + 1 + jnp.arange(n)
    return {"step": state["step"] + n}, {"loss": 1.0 / steps}


class Run:
    """The toy run trained to step 8 in `<tmp_path>/ckpt`: what it logged, reported and saved
    (kept when the training raises)."""

    def __init__(self, tmp_path):
        self.dir, self.logged, self.reported = str(tmp_path / "ckpt"), [], []

    def train(self, run_chunk=_run_chunk, start=0, **kwargs) -> "Run":
        mngr = checkpoint.manager(self.dir, max_to_keep=10)
        try:
            chunks.train_in_chunks(
                "[t]", run_chunk, {"step": jnp.asarray(start, jnp.int32)}, start, 8, mngr=mngr,
                log=lambda metrics, done: self.logged.append(done),
                report=lambda metrics, done, rate, compile_secs: self.reported.append(done),
                **kwargs,
            )  # fmt: skip
        finally:
            mngr.close()
        return self

    @property
    def saved(self) -> list[int]:
        mngr = checkpoint.manager(self.dir, max_to_keep=10)
        steps = list(mngr.all_steps())
        mngr.close()
        return steps


def test_chunks_end_at_multiples_of_the_chunk_and_of_the_save_interval(tmp_path):
    run = Run(tmp_path).train(chunk=2, every_steps=3)
    assert run.logged == run.reported == [2, 3, 4, 6, 8]
    assert run.saved == [3, 6, 8]
    # A resume from a save mid-chunk is chunked as the uninterrupted run was.
    assert Run(tmp_path / "resumed").train(start=3, chunk=2, every_steps=3).logged == [4, 6, 8]


def test_a_chunk_length_chosen_from_the_speed_takes_effect_from_the_next_chunk(tmp_path):
    rates = []
    run = Run(tmp_path).train(chunk=4, shrink=lambda rate: rates.append(rate) or 2)
    assert run.logged == [4, 6, 8] and run.saved == [8] and len(rates) == 3
    assert all(r > 0 for r in rates)


def test_an_interrupt_while_the_host_waits_for_a_chunk_logs_and_saves_that_chunk(
    tmp_path, monkeypatch
):
    real_get, waits = jax.device_get, []

    def get(tree):
        if isinstance(tree, dict) and "loss" in tree:
            waits.append(1)
            if len(waits) == 2:  # Ctrl-C while waiting for the second chunk's metrics
                raise KeyboardInterrupt
        return real_get(tree)

    monkeypatch.setattr(jax, "device_get", get)
    run = Run(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run.train(chunk=2)
    assert (run.logged, run.reported, run.saved) == ([2, 4], [2, 4], [4])


def test_an_interrupt_while_a_chunk_is_logged_saves_the_chunk_before(tmp_path):
    logged = []

    def log(metrics, done):
        if done == 4:
            raise KeyboardInterrupt
        logged.append(done)

    mngr = checkpoint.manager(str(tmp_path / "ckpt"), max_to_keep=10)
    with pytest.raises(KeyboardInterrupt):
        chunks.train_in_chunks("[t]", _run_chunk, {"step": jnp.zeros((), jnp.int32)}, 0, 8,
                               mngr=mngr, chunk=2, log=log, report=lambda *a: None)  # fmt: skip
    assert logged == [2] and mngr.all_steps() == [2]
    mngr.close()


def test_an_interrupt_inside_a_chunk_that_took_the_state_saves_nothing_newer(tmp_path, caplog):
    def donating(state, n):
        if int(state["step"]) == 2:  # the state is donated, then Ctrl-C before the chunk returns
            jax.tree.map(lambda x: x.delete(), state)
            raise KeyboardInterrupt
        return _run_chunk(state, n)

    run = Run(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run.train(run_chunk=donating, chunk=2)
    assert (run.logged, run.reported, run.saved) == ([2], [2], [])
    assert "[t] interrupted inside a chunk: resuming from step 0" in caplog.text


def test_a_non_finite_chunk_is_neither_logged_nor_saved_and_names_the_metric(tmp_path):
    def nan_at_6(state, n):
        state, metrics = _run_chunk(state, n)
        return state, {**metrics, "kl": jnp.where(state["step"] >= 6, jnp.nan, 0.0)}

    run = Run(tmp_path)
    with pytest.raises(UserError) as e:
        run.train(run_chunk=nan_at_6, chunk=2, every_steps=4)
    assert str(e.value) == (
        "[t]: kl is NaN or Inf by step 6; nothing past step 4 is saved: lower the learning rate "
        "or check the inputs, then rerun"
    )
    assert (run.logged, run.reported, run.saved) == ([2, 4], [2, 4], [4])


def test_time_based_saves_come_after_chunks_and_the_end_is_left_to_the_stage(tmp_path):
    run = Run(tmp_path).train(chunk=3, every_secs=1e-9, save_at_end=False)
    assert run.logged == [3, 6, 8] and run.saved == [3, 6]


def test_a_program_is_compiled_once_with_its_memory_logged(caplog):
    jitted = jax.jit(lambda x, y, n: (x * n + y, y.sum()), static_argnums=2, donate_argnums=0)
    x, y = jnp.ones(10**6), jnp.ones(10**6)  # 4 MB each
    # The absl logger's own level too: a test before this one in the same worker may have
    # set absl's verbosity above INFO.
    with caplog.at_level("INFO"), caplog.at_level("INFO", logger="absl"):
        program = chunks.compile_reporting("[t] chunk", jitted, x, y, static=(3,))
    assert (
        "[t] chunk program per device: arguments 0.008 GB, outputs 0.004 GB (0.004 GB of them "
        "reusing donated arguments), temporaries 0.000 GB" in caplog.text
    )
    out, total = program(x, y)
    assert float(out[0]) == 4.0 and float(total) == 1e6 and x.is_deleted()
