"""Expert ensemble and gated fusion: structure, gate properties, freezing, run 1-4 configs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dyn_fusion
from fusion_jax import models
from fusion_jax.data import tasks
from fusion_jax.evaluate import analysis
from fusion_jax.models import fusion
from fusion_jax.models.transformer import Transformer, TransformerConfig
from fusion_jax.train import loop, steps

EXPERT = TransformerConfig(vocab_size=13, num_classes=11, num_layers=2, dim=16, num_heads=2)
TOKENS = jnp.asarray(tasks.get_task("x_plus_y", 11).table()[0][:40])


def init(cfg):
    model = fusion.FusionTransformer(cfg)
    return model, model.init(jax.random.key(0), TOKENS)["params"]


def test_ensemble_params_have_a_leading_expert_axis():
    _, params = init(fusion.FusionConfig(expert=EXPERT, num_experts=3))
    single = Transformer(EXPERT).init(jax.random.key(0), TOKENS)["params"]
    single.pop("head")  # the fusion model reads its own head, not the experts'
    stacked = params["ensemble"]["experts"]
    shapes = jax.tree.map(lambda x: x.shape, stacked)
    assert shapes == jax.tree.map(lambda x: (3,) + x.shape, single)
    emb = stacked["token_embed"]["embedding"]
    assert not np.allclose(emb[0], emb[1])  # split_rngs: experts start different


def test_one_expert_with_gate_forced_to_one_is_the_plain_transformer():
    model, params = init(fusion.FusionConfig(expert=EXPERT, num_experts=1, force_gate=True))
    plain = Transformer(EXPERT)
    plain_params = plain.init(jax.random.key(7), TOKENS)["params"]
    params["ensemble"]["experts"] = jax.tree.map(
        lambda x: x[None], {k: v for k, v in plain_params.items() if k != "head"}
    )
    params["head"] = plain_params["head"]
    np.testing.assert_allclose(
        model.apply({"params": params}, TOKENS),
        plain.apply({"params": plain_params}, TOKENS),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("context", ["experts", "tokens"])
def test_gate_weights_sum_to_one_and_depend_on_the_input(context):
    cfg = fusion.FusionConfig(
        expert=dataclasses.replace(EXPERT, last_position_only=False), num_experts=3, context=context
    )
    model, params = init(cfg)
    w = np.asarray(analysis.gate_weights(model, params, TOKENS))
    assert w.shape == (40, 4, 3)  # per example and position
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    assert w[:, -1].std(axis=0).max() > 1e-3  # differs across examples


def test_top_k_zeroes_the_other_experts():
    model, params = init(fusion.FusionConfig(expert=EXPERT, num_experts=3, top_k=2))
    w = np.asarray(analysis.gate_weights(model, params, TOKENS))
    assert ((w > 0).sum(-1) == 2).all()
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)


def test_balance_and_entropy_regularisers_enter_the_loss():
    plain = steps.model_apply_fn(init(fusion.FusionConfig(expert=EXPERT, num_experts=3))[0])
    cfg = fusion.FusionConfig(expert=EXPERT, num_experts=3, balance_weight=0.01, entropy_weight=0.1)
    model, params = init(cfg)
    _, aux = steps.model_apply_fn(model)(params, TOKENS)
    _, zero = plain(params, TOKENS)
    w = np.asarray(analysis.gate_weights(model, params, TOKENS)).reshape(-1, 3)
    frac = np.bincount(w.argmax(-1), minlength=3) / len(w)
    expected = 0.01 * 3 * np.sum(frac * w.mean(0)) + 0.1 * analysis.gate_statistics(w)["entropy"]
    assert float(zero) == 0.0
    np.testing.assert_allclose(aux, expected, rtol=1e-5)


def test_frozen_experts_stay_fixed_while_the_gate_trains():
    config = dyn_fusion.get_config("tiny")
    config.num_seeds, config.train.num_devices, config.opt.warmup_steps = 1, 1, 1
    config.model.freeze_experts = True
    setup = loop.setup_task(config, "x_plus_y")
    state = jax.tree.map(lambda x: x[0], setup.init_runs())
    data = jax.tree.map(lambda x: jnp.asarray(x[0]), setup.data.train)
    cfg = loop.step_config(config, 1)
    end, metrics = jax.jit(
        lambda s: steps.train_steps(
            s,
            data,
            setup.run_keys[0],
            30,
            apply_fn=setup.apply_fn,
            tx=setup.tx,
            cfg=cfg,
            axis_name=None,
        )  # fmt: skip
    )(state)
    jax.tree.map(np.testing.assert_array_equal, end.params["ensemble"], state.params["ensemble"])
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), end.params["fusion"],
                         state.params["fusion"])  # fmt: skip
    assert min(jax.tree.leaves(moved)) > 0
    assert metrics["loss"][-5:].mean() < metrics["loss"][:5].mean()


def test_freeze_experts_needs_experts(tiny_config, tmp_path):
    tiny_config.model.freeze_experts = True
    with pytest.raises(ValueError) as e:
        loop.train(tiny_config, str(tmp_path))
    assert str(e.value) == (
        "config.model.freeze_experts=True: must be False unless config.model.name='fusion' "
        "(a model with experts to freeze)"
    )


def test_run_1_config_trains(tmp_path):
    config = dyn_fusion.get_config("tiny")
    config.num_seeds, config.num_steps, config.train.num_devices = 1, 10, 1
    records = loop.train(config, str(tmp_path))["x_plus_y"]
    assert [r["step"] for r in records] == [5, 10]
    assert np.isfinite([r["train_loss"] for r in records]).all()


@pytest.mark.parametrize("variant,layers,heads", [("", 2, 4), ("layers4", 4, 4),
                                                  ("heads6", 2, 6), ("layers5", 5, 4)])  # fmt: skip
def test_seed_run_configs_build_their_models(variant, layers, heads):
    """Runs 1-4 differ only in depth and heads: each builds a fusion model of that shape (traced,
    not compiled; the model code is the same as run 1's, which trains above)."""
    config = dyn_fusion.get_config(",".join(filter(None, [variant, "tiny"])))
    assert (config.model.num_layers, config.model.num_heads) == (layers, heads)
    task = tasks.get_task("x_plus_y", config.data.p)
    model = models.build_model(config.model, task)
    tokens = jnp.asarray(task.table()[0][:4])
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    experts = params["ensemble"]["experts"]
    assert sorted(k for k in experts if k.startswith("blocks_")) == [
        f"blocks_{i}" for i in range(layers)
    ]
    k, dim = config.model.num_experts, config.model.dim
    assert experts["blocks_0"]["attn"]["kernel"].shape == (k, dim, 3 * dim)  # fused q, k, v
    logits = jax.eval_shape(lambda p: model.apply({"params": p}, tokens), params)
    assert logits.shape == (4, task.num_classes)


def test_full_size_heads6_config_is_valid():
    config = dyn_fusion.get_config("heads6")
    assert config.reference_run == "run_3"
    assert config.model.dim % config.model.num_heads == 0
    with pytest.raises(ValueError, match="Pick one of"):
        dyn_fusion.get_config("layers4,layers5")
