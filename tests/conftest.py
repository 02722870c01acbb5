"""Test session set-up: 8 fake CPU devices (a TPU v2-8/v3-8 has 8 cores) and a persistent
compilation cache.

The device count must be fixed before JAX initialises its backend, so it is set here, before
any test module imports JAX. Single-device tests pass `config.train.num_devices = 1`.
"""

import os
import sys
import tempfile

# The suite is dominated by XLA:CPU compiles of tiny programs, not by running them; LLVM's
# optimisation level 0 cuts the tiny merging comparison from 128 s to 86 s (BUILD_NOTES,
# "Session 11: suite time"). Results move in the last bits only, and every exact-equality test
# compares two runs made under the same flags.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Tests rebuild the same programs many times (a resumed run recompiles the uninterrupted run's
# chunks, main.py runs in a subprocess); caching compiled executables on disk keeps the suite
# within minutes on 2 cores. Set through the environment so subprocesses share the cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="fusion_jax_xla_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402


@pytest.fixture
def tiny_config():
    """The real baseline config shrunk to seconds (configs/baseline.py:tiny), one device."""
    from configs import baseline

    config = baseline.get_config("tiny")
    config.train.num_devices = 1
    return config


@pytest.fixture
def record_progress(monkeypatch):
    """`record(stop_after=None) -> (saves, resumes)`: records `(stage[/part], step)` of every save
    and every resume of unfinished stage training (`Stages.progress`); raises KeyboardInterrupt,
    as a kill would stop the run, once the save `stop_after` has finished."""
    from fusion_jax.train import checkpoint

    save, restore_newest = checkpoint.save, checkpoint.restore_newest

    def part(mngr) -> str:  # stage[/part] of the manager, without its seeds folder
        return os.path.dirname(str(mngr.directory).split(f"{os.sep}in_progress{os.sep}")[1])

    def record(stop_after=None):
        saves, resumes = [], []

        def recording_save(mngr, step, state):
            save(mngr, step, state)
            saves.append((part(mngr), step))
            if saves[-1] == stop_after:
                mngr.wait_until_finished()
                raise KeyboardInterrupt

        def recording_restore(mngr, abstract):
            found = restore_newest(mngr, abstract)
            if found is not None:
                resumes.append((part(mngr), found[0]))
            return found

        monkeypatch.setattr(checkpoint, "save", recording_save)
        monkeypatch.setattr(checkpoint, "restore_newest", recording_restore)
        return saves, resumes

    return record


@pytest.fixture
def tiny_gguf(tmp_path):
    """A tiny random Llama (1 layer, width 32, tied head) with the 600-piece SentencePiece
    vocabulary of tests/fixtures/gguf_spm, as a GGUF file written by fusion_jax."""
    import jax
    import jax.numpy as jnp

    from fusion_jax import gguf_checkpoint
    from fusion_jax import hf_checkpoint as hc
    from fusion_jax.models import lm

    hf = {"model_type": "llama", "vocab_size": 600, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
          "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
          "tie_word_embeddings": True}  # fmt: skip
    model = lm.LanguageModel(lm.LMConfig.from_hf(hf))
    params = model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"]
    folder = str(tmp_path / "tiny_base")
    hc.save(params, hf, folder)
    path = str(tmp_path / "tiny_base.gguf")
    spm = os.path.join(os.path.dirname(__file__), "fixtures", "gguf_spm", "tokenizer.gguf")
    gguf_checkpoint.write_gguf(path, hc.read_config(folder), hc.open_tensors(folder),
                               tokenizer_source=spm)  # fmt: skip
    return path


@pytest.fixture
def toy_merge(monkeypatch):
    """A merge method registered as a new one is: one entry in `merging.MERGES` and one row in
    `merging.ROWS` (the base plus `lam` times the first expert's task vector). Returns its row's
    label."""
    import jax

    from fusion_jax import merging

    def first_vector(stacked, base, lam):
        return jax.tree.map(lambda x, b: b + lam * (x[0] - b), stacked, base)

    monkeypatch.setitem(merging.MERGES, "first_vector", first_vector)
    label = "toy: first task vector"
    monkeypatch.setattr(merging, "ROWS", [*merging.ROWS, merging.Row(label, "first_vector")])
    return label
