"""The Transformer against an independent NumPy forward pass with torch semantics."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from fusion_jax.data import tasks
from fusion_jax.models import build_model
from fusion_jax.models.transformer import Transformer, TransformerConfig, gelu, layer_norm_fn


def numpy_forward(p, tokens, num_heads):
    """Reference semantics: post-LN blocks, causal MHA, exact GELU, logits at the last position."""

    def ln(x, q):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * q["scale"] + q["bias"]

    def dense(x, q):
        return x @ q["kernel"] + q["bias"]

    x = p["token_embed"]["embedding"][tokens] + p["pos_embed"]["embedding"][: tokens.shape[1]]
    n, length, d = x.shape
    dh = d // num_heads
    blocks = sorted(k for k in p if k.startswith("blocks_"))
    for name in blocks:
        q = p[name]
        qkv = dense(x, q["attn"])
        heads = [qkv[..., i * d : (i + 1) * d].reshape(n, length, num_heads, dh) for i in range(3)]
        scores = np.einsum("bqhd,bkhd->bhqk", heads[0], heads[1]) / math.sqrt(dh)
        scores = scores + np.triu(np.full((length, length), -np.inf), k=1)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        attn = np.einsum("bhqk,bkhd->bqhd", weights, heads[2]).reshape(n, length, d)
        x = ln(x + dense(attn, q["attn"]["out"]), q["attn_norm"])
        h = dense(x, q["mlp_in"])
        h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
        x = ln(x + dense(h, q["mlp_out"]), q["mlp_norm"])
    return dense(ln(x, p["final_norm"]), p["head"])[:, -1]


@pytest.fixture(scope="module")
def model_and_params():
    cfg = TransformerConfig(vocab_size=99, num_classes=97, num_layers=2, dim=128, num_heads=4)
    model = Transformer(cfg)
    tokens = jnp.asarray(tasks.get_task("x_plus_y").table()[0][:64])
    params = model.init(jax.random.key(0), tokens)["params"]
    return model, params, tokens


def test_matches_numpy_reference(model_and_params):
    model, params, tokens = model_and_params
    ours = np.asarray(model.apply({"params": params}, tokens))
    ref = numpy_forward(jax.tree.map(np.asarray, params), np.asarray(tokens), num_heads=4)
    assert ours.shape == (64, 97)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_last_position_shortcut_is_exact(model_and_params):
    model, params, tokens = model_and_params
    full = Transformer(dataclasses.replace(model.config, last_position_only=False))
    np.testing.assert_allclose(
        model.apply({"params": params}, tokens), full.apply({"params": params}, tokens), atol=1e-5
    )
    hidden = full.apply({"params": params}, tokens, method=Transformer.features)
    assert hidden.shape == (64, 4, 128)


def test_initialisation_matches_torch(model_and_params):
    _, p, _ = model_and_params
    d = 128
    emb = np.asarray(p["token_embed"]["embedding"])
    assert abs(emb.std() - 1.0) < 0.02 and abs(emb.mean()) < 0.02  # N(0, 1)
    for name, fan_in in [("mlp_in", d), ("mlp_out", 4 * d)]:
        for leaf in ("kernel", "bias"):
            w = np.asarray(p["blocks_0"][name][leaf])
            bound = 1 / math.sqrt(fan_in)
            assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
    head = np.asarray(p["head"]["kernel"])
    assert abs(head.var() - (1 / d) / 3) < 0.1 * (1 / d) / 3  # U(+-b) has variance b^2 / 3
    in_proj = np.asarray(p["blocks_0"]["attn"]["kernel"])
    xavier = math.sqrt(6 / (d + 3 * d))
    assert in_proj.shape == (d, 3 * d) and 0.95 * xavier < np.abs(in_proj).max() <= xavier
    assert not np.any(p["blocks_0"]["attn"]["bias"]) and not np.any(
        p["blocks_0"]["attn"]["out"]["bias"]
    )
    assert np.all(p["final_norm"]["scale"] == 1) and not np.any(p["final_norm"]["bias"])


def test_causal_mask(model_and_params):
    model, params, tokens = model_and_params
    full = Transformer(dataclasses.replace(model.config, last_position_only=False))
    changed = tokens.at[:, 2].set(5)
    h0 = full.apply({"params": params}, tokens, method=Transformer.features)
    h1 = full.apply({"params": params}, changed, method=Transformer.features)
    np.testing.assert_allclose(h0[:, :2], h1[:, :2], atol=1e-6)  # the past ignores the future
    assert np.abs(h0[:, 2:] - h1[:, 2:]).max() > 1e-3


def test_config_errors_name_the_field(tiny_config):
    with pytest.raises(ValueError, match="model.num_heads=6 does not divide model.dim=128"):
        TransformerConfig(vocab_size=99, num_classes=97, num_heads=6)
    tiny_config.model.name = "mystery"
    with pytest.raises(ValueError, match="Unknown config.model.name 'mystery'.*transformer"):
        build_model(tiny_config.model, tasks.get_task("x_plus_y"))


def test_hand_written_derivatives_match_autodiff():
    x = jax.random.normal(jax.random.key(1), (6, 3, 16)) * 3
    scale, bias = jnp.linspace(0.5, 1.5, 16), jnp.linspace(-0.2, 0.2, 16)
    cot = jax.random.normal(jax.random.key(2), (6, 3, 16))

    def plain_ln(x, s, b):
        c = x - x.mean(-1, keepdims=True)
        return c / jnp.sqrt((c * c).mean(-1, keepdims=True) + 1e-5) * s + b

    def vjp(f):
        out, pullback = jax.vjp(f, x, scale, bias)
        return out, pullback(cot)

    (ours, ours_grads), (ref, ref_grads) = vjp(layer_norm_fn), vjp(plain_ln)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    for a, b in zip(ours_grads, ref_grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gelu(x), jax.nn.gelu(x, approximate=False), atol=1e-6)
    np.testing.assert_allclose(
        jax.grad(lambda v: jnp.sum(gelu(v) * cot))(x),
        jax.grad(lambda v: jnp.sum(jax.nn.gelu(v, approximate=False) * cot))(x),
        rtol=1e-5,
        atol=1e-6,
    )
