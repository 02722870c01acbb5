"""Test session set-up: 4 fake CPU devices and a persistent compilation cache.

The device count must be fixed before JAX initialises its backend, so it is set here, before
any test module imports JAX. Single-device tests pass `config.train.num_devices = 1`.
"""

import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import pytest  # noqa: E402

# Tests rebuild the same programs many times (e.g. a resumed run recompiles the uninterrupted
# run's chunks); caching compiled executables on disk keeps the suite within minutes on 2 cores.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="fusion_jax_xla_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture
def tiny_config():
    """The real baseline config shrunk to seconds (configs/baseline.py:tiny), one device."""
    from configs import baseline

    config = baseline.get_config("tiny")
    config.train.num_devices = 1
    return config
