"""The reference decoder Transformer with PyTorch numerics and initialisation.

Post-LayerNorm blocks (`x = LN(x + attn(x))`, `x = LN(x + mlp(x))`), exact GELU, LayerNorm eps
1e-5, N(0, 1) embeddings, Linear layers U(+-1/sqrt(fan_in)), Xavier-uniform attention input
projection with zero bias. The answer is read at the last position only, so by default the last
block computes its queries, MLP, final norm and head at that position alone: identical logits
at about two thirds of the reference's FLOPs for the baseline (see BUILD_NOTES.md).
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

LN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of one Transformer; validated on construction."""

    vocab_size: int
    num_classes: int
    num_layers: int = 2
    dim: int = 128
    num_heads: int = 4
    mlp_ratio: int = 4
    max_len: int = 5
    # Compute the last block's query side, final LN and head at the last position only.
    last_position_only: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "num_classes", "num_layers", "dim", "num_heads", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}.")
        if self.dim % self.num_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} does not divide model.dim={self.dim}; "
                "choose a width that is a multiple of the head count."
            )


def torch_linear_init(key, shape, dtype=jnp.float32):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for a kernel `[in, out]` (torch.nn.Linear's default)."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class TorchDense(nn.Module):
    """Dense layer initialised as torch.nn.Linear (kernel and bias both U(+-1/sqrt(fan_in)))."""

    features: int
    zero_bias: bool = False

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        kernel = self.param("kernel", torch_linear_init, (fan_in, self.features))
        bound = 1.0 / math.sqrt(fan_in)
        bias_init = (
            nn.initializers.zeros
            if self.zero_bias
            else (lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -bound, bound))
        )
        bias = self.param("bias", bias_init, (self.features,))
        return matmul(x, kernel) + bias


# LayerNorm and exact GELU carry hand-written derivatives: the functions are the usual ones, but
# XLA:CPU runs autodiff's backward graphs of them slowly (together about 40 % of a baseline
# update on 2 cores; see BUILD_NOTES.md). tests/test_model.py checks both against autodiff.
@jax.custom_vjp
def layer_norm_fn(x, scale, bias):
    """LayerNorm over the last axis with torch's two-pass variance and eps 1e-5."""
    return _layer_norm_fwd(x, scale, bias)[0]


def _layer_norm_fwd(x, scale, bias):
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + LN_EPS)
    normed = centred * rstd
    return normed * scale + bias, (normed, rstd, scale)


def _layer_norm_bwd(res, g):
    normed, rstd, scale = res
    batch_axes = tuple(range(g.ndim - 1))
    gn = g * scale
    dx = rstd * (
        gn
        - jnp.mean(gn, axis=-1, keepdims=True)
        - normed * jnp.mean(gn * normed, axis=-1, keepdims=True)
    )
    return dx, jnp.sum(g * normed, axis=batch_axes), jnp.sum(g, axis=batch_axes)


layer_norm_fn.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@jax.custom_vjp
def gelu(x):
    """Exact (erf) GELU, torch.nn.GELU()'s default."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * _SQRT_HALF))


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, g):
    cdf = 0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF))
    return (g * (cdf + x * _INV_SQRT_2PI * jnp.exp(-0.5 * x * x)),)


_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
gelu.defvjp(_gelu_fwd, _gelu_bwd)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm(dim): params `scale` (ones) and `bias` (zeros), as Flax names them."""

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        return layer_norm_fn(x, scale, bias)


def matmul(x, kernel):
    """`x [..., in] @ kernel [in, out]` as one 2-D matmul.

    XLA:CPU runs the backward of a 3-D `[B, L, in] @ [in, out]` dot markedly slower than the same
    product on `[B * L, in]` (kernel gradient contracted over two axes); see BUILD_NOTES.md.
    """
    return (x.reshape(-1, x.shape[-1]) @ kernel).reshape(x.shape[:-1] + kernel.shape[-1:])


def layer_norm(name: str) -> LayerNorm:
    return LayerNorm(name=name)


class CausalSelfAttention(nn.Module):
    """torch.nn.MultiheadAttention with a causal mask, input `[B, L, D]`.

    With `last_query_only`, queries (and the output) exist for the last position alone while keys
    and values still cover every position: output `[B, 1, D]`.
    """

    dim: int
    num_heads: int
    last_query_only: bool = False

    @nn.compact
    def __call__(self, x):
        b, length, d = x.shape
        h, dh = self.num_heads, self.dim // self.num_heads
        kernel = self.param("kernel", nn.initializers.xavier_uniform(), (d, 3 * self.dim))
        bias = self.param("bias", nn.initializers.zeros, (3 * self.dim,))
        if self.last_query_only:
            kv = matmul(x, kernel[:, self.dim :]) + bias[self.dim :]
            k, v = jnp.split(kv.reshape(b, length, 2 * h, dh), 2, axis=2)
            q = matmul(x[:, -1:], kernel[:, : self.dim]) + bias[: self.dim]
            q = q.reshape(b, 1, h, dh)
        else:
            q, k, v = jnp.split((matmul(x, kernel) + bias).reshape(b, length, 3 * h, dh), 3, 2)
        num_q = q.shape[1]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
        q_pos = jnp.arange(length - num_q, length)[:, None]
        scores = jnp.where(q_pos >= jnp.arange(length)[None, :], scores, -jnp.inf)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        return TorchDense(self.dim, zero_bias=True, name="out")(out.reshape(b, num_q, self.dim))


class DecoderBlock(nn.Module):
    """Post-LN block; with `last_query_only` it maps `[B, L, D]` to `[B, 1, D]`."""

    config: TransformerConfig
    last_query_only: bool = False

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        attn = CausalSelfAttention(cfg.dim, cfg.num_heads, self.last_query_only, name="attn")(x)
        x = x[:, -1:] if self.last_query_only else x
        x = layer_norm("attn_norm")(x + attn)
        y = TorchDense(cfg.mlp_ratio * cfg.dim, name="mlp_in")(x)
        y = TorchDense(cfg.dim, name="mlp_out")(gelu(y))
        return layer_norm("mlp_norm")(x + y)


class Transformer(nn.Module):
    """Decoder Transformer; `tokens [B, L] -> logits [B, num_classes]` at the last position."""

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        embed_init = nn.initializers.normal(stddev=1.0)
        self.token_embed = nn.Embed(cfg.vocab_size, cfg.dim, embedding_init=embed_init)
        self.pos_embed = nn.Embed(cfg.max_len, cfg.dim, embedding_init=embed_init)
        last = cfg.num_layers - 1
        self.blocks = [
            DecoderBlock(cfg, last_query_only=cfg.last_position_only and i == last)
            for i in range(cfg.num_layers)
        ]
        self.final_norm = layer_norm("final_norm")
        self.head = TorchDense(cfg.num_classes)

    def features(self, tokens):
        """Final hidden states `[B, L', D]`: L' = 1 (last position) or L (all positions)."""
        if tokens.shape[-1] > self.config.max_len:
            raise ValueError(f"Sequence length {tokens.shape[-1]} exceeds model.max_len.")
        x = self.token_embed(tokens) + self.pos_embed(jnp.arange(tokens.shape[-1]))
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)

    def logits(self, hidden):
        """Head on hidden states `[..., D] -> [..., num_classes]`."""
        return self.head(hidden)

    def __call__(self, tokens):
        return self.logits(self.features(tokens)[:, -1])
