"""How a model computes: matmul precision and compute dtype (config.model.matmul_precision and
config.model.compute_dtype), applied around `model.apply` so every model gets them alike.

* The precision is set with `jax.default_matmul_precision` while the model is traced, so every
  dot of the forward pass, and of its transpose in the backward pass, carries it in the compiled
  program (tests/test_numerics.py reads it from the lowered HLO).
* bfloat16 compute casts the float32 parameters to bfloat16 on the way in: the master weights,
  their gradients (the cast's transpose returns them to float32) and the optimiser state stay
  float32, and the model's float outputs come back as float32 for the loss and the metrics.
"""

import dataclasses

import jax
import jax.numpy as jnp


def _cast_floats(tree, dtype):
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree
    )


# The config.model fields that set how a model computes (not its shapes).
NUMERICS_FIELDS = ("matmul_precision", "compute_dtype")


@dataclasses.dataclass(frozen=True)
class Numerics:
    matmul_precision: str = "highest"
    compute_dtype: str = "float32"

    @classmethod
    def of(cls, model_config) -> "Numerics":
        return cls(model_config.matmul_precision, model_config.compute_dtype)

    def apply(self, model, params, *args, **kwargs):
        """`model.apply({"params": params}, *args, **kwargs)` under these numerics."""
        with jax.default_matmul_precision(self.matmul_precision):
            params = _cast_floats(params, jnp.dtype(self.compute_dtype))
            out = model.apply({"params": params}, *args, **kwargs)
        return _cast_floats(out, jnp.float32)


# Full-precision float32: the reference's numerics.
FLOAT32 = Numerics()
