"""fusion_jax: dynamic fusion vs static merging of Transformer experts on grokking tasks.

`fusion_jax.load_run(workdir)` restores a trained workdir for analysis (fusion_jax/run.py); it is
imported on first use, so importing a submodule does not load it.
"""


def __getattr__(name: str):
    if name == "load_run":
        from fusion_jax.run import load_run

        return load_run
    raise AttributeError(f"module 'fusion_jax' has no attribute {name!r}")


__all__ = ["load_run"]
