"""config.model.matmul_precision and config.model.compute_dtype reach the compiled train step."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import baseline, dyn_fusion
from fusion_jax.train import logs, loop, steps


def _train_step_hlo(config) -> str:
    setup = loop.setup_task(config, "x_plus_y")
    state = jax.tree.map(lambda x: x[0], setup.init_runs())
    data = jax.tree.map(lambda x: jnp.asarray(x[0]), setup.data.train)
    cfg = loop.step_config(config, 1)

    def step(state, key):
        return steps.train_step(
            state, data, key, apply_fn=setup.apply_fn, tx=setup.tx, cfg=cfg, axis_name=None
        )

    return jax.jit(step).lower(state, setup.run_keys[0]).as_text()


def _dots(text: str) -> list[str]:
    return re.findall(r"stablehlo\.dot_general .*", text)


@pytest.mark.parametrize(
    "make, precision",
    [
        (baseline.get_config, "highest"),
        (baseline.get_config, "high"),
        (baseline.get_config, "default"),
        (dyn_fusion.get_config, "highest"),
    ],
)
def test_every_matmul_of_forward_and_backward_has_the_configured_precision(make, precision):
    config = make("tiny")
    config.model.matmul_precision = precision
    dots = _dots(_train_step_hlo(config))
    # Forward, input gradients and weight gradients: well over the forward's own matmuls.
    assert len(dots) > 20
    found = {m for d in dots for m in re.findall(r"precision = \[(\w+), (\w+)\]", d)}
    assert found == {(precision.upper(), precision.upper())}


def test_bfloat16_compute_keeps_float32_master_weights():
    config = baseline.get_config("tiny")
    config.model.compute_dtype = "bfloat16"
    dots = _dots(_train_step_hlo(config))
    operand_types = {t for d in dots for t in re.findall(r"tensor<[\dx]*x(\w+)>", d)}
    assert operand_types == {"bf16"}
    setup = loop.setup_task(config, "x_plus_y")
    state = setup.init_runs()
    assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))} <= {
        jnp.dtype("float32"),
        jnp.dtype("int32"),
    }


def test_bfloat16_training_lowers_the_loss_and_stays_near_float32(tmp_path):
    curves = {}
    for dtype in ("float32", "bfloat16"):
        config = baseline.get_config("tiny")
        config.train.num_devices = 1
        config.model.compute_dtype = dtype
        config.num_steps = 60
        config.train.log_every = config.train.checkpoint_every = 30
        records = loop.train(config, str(tmp_path / dtype))["x_plus_y"]
        curves[dtype] = logs.to_arrays(records)["train_loss"]  # [seeds, intervals]
    bf16, fp32 = curves["bfloat16"], curves["float32"]
    assert np.all(bf16[:, -1] < bf16[:, 0] - 0.15)
    # bfloat16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 0.2 %) in every matmul input;
    # over 60 updates the loss drifts from float32's by well under 1 % (measured: 0.1 %).
    np.testing.assert_allclose(bf16, fp32, rtol=1e-2)
    assert not np.array_equal(bf16, fp32)
