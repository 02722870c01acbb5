"""Decoder language models that load Hugging Face checkpoints: the Llama family and GPT-2.

`LMConfig.from_hf(config_json)` reads a checkpoint's config.json (transformers 4.x and 5.x
spellings) and picks the architecture by `model_type` from `ARCHITECTURES`;
`LanguageModel(config)` is the Flax module. Leaf names follow the rest of the code
(`kernel` [in, out], `embedding`, `scale`, `bias`), so stacked trees, every merge, DAM and the
fusion ensemble work on LMs unchanged. Module names mirror the Hugging Face tensor names
(`layers_0/self_attn/q_proj/kernel` is `model.layers.0.self_attn.q_proj.weight` transposed), which
keeps the checkpoint table one line per tensor (fusion_jax/hf_checkpoint.py).

Numerics follow transformers' own code: RMSNorm in float32 with the weight applied after casting
back; rotary cos/sin computed in float32 in the rotate-half convention; softmax in float32;
GPT-2's gelu_new is the tanh approximation. Every matmul runs at `LMConfig.matmul_precision`
("highest": full float32, as PyTorch computes it; a TPU's "default" takes one bfloat16 pass).

Decoding uses an explicit key/value cache (a list of `{"k", "v"}` arrays `[B, S, KVH, hd]`, one per
layer) passed in and returned, so the same pure function serves training, prefill and one-token
steps, and `nn.vmap` over experts stacks caches like parameters.
"""

import dataclasses
import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fusion_jax.errors import UserError

# Large negative instead of -inf: a fully masked row (padding) stays finite.
_MASK_VALUE = -1e30


class UnsupportedModelError(UserError):
    """config.json names an architecture or option this code does not implement."""


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Architecture of one decoder LM; built from config.json by `from_hf`."""

    model_type: str
    family: str  # "llama" (Llama, Mistral, Qwen2) or "gpt2": picks the block.
    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    max_len: int
    norm_eps: float
    tie_embeddings: bool
    rope_theta: float = 10000.0
    # None, or the llama3 frequency-scaling parameters as a tuple of (name, value) pairs.
    rope_scaling: tuple | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Per layer: None (full causal attention) or the window w (key j visible from i iff i-j < w).
    sliding_windows: tuple = ()
    # The checkpoint's stored dtype ("float32", "bfloat16", "float16").
    param_dtype: str = "float32"
    # Activations' dtype; float32 is exact against transformers, bfloat16 for speed.
    dtype: str = "float32"
    # jax.default_matmul_precision of every matmul (forward and backward): see `traced_at`. It
    # overrides any precision set around the call, so a model computes as its config says.
    matmul_precision: str = "highest"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if len(self.sliding_windows) != self.num_layers:
            raise ValueError("sliding_windows needs one entry per layer")

    @staticmethod
    def from_hf(hf: dict, dtype: str | None = None) -> "LMConfig":
        """The config for a parsed config.json; `dtype` overrides the activation dtype."""
        model_type = hf.get("model_type")
        if model_type not in ARCHITECTURES:
            supported = ", ".join(sorted(ARCHITECTURES))
            raise UnsupportedModelError(
                f"unsupported model_type {model_type!r}; supported: {supported}"
            )
        config = ARCHITECTURES[model_type](hf)
        return dataclasses.replace(config, dtype=dtype) if dtype else config


def traced_at(precision: Callable[[nn.Module], str]):
    """Decorates a module method to trace under `jax.default_matmul_precision(precision(self))`,
    so every dot inside it, and its transposes in the backward pass, carry that precision (flax's
    layers and jnp.einsum otherwise take the backend's default)."""

    def wrap(method):
        @functools.wraps(method)
        def traced(self, *args, **kwargs):
            with jax.default_matmul_precision(precision(self)):
                return method(self, *args, **kwargs)

        return traced

    return wrap


_own_precision = traced_at(lambda module: module.config.matmul_precision)


def _stored_dtype(hf: dict) -> str:
    # transformers 5 writes "dtype", 4.x "torch_dtype"; neither means float32.
    return str(hf.get("dtype") or hf.get("torch_dtype") or "float32")


def _rope(hf: dict) -> tuple[float, tuple | None]:
    """(rope_theta, llama3 scaling or None) from either config spelling."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    rope_type = rope_type or "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type == "llama3":
        source = params if params.get("rope_type") == "llama3" else scaling
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return float(theta), tuple((k, float(source[k])) for k in keys)
    raise UnsupportedModelError(f"unsupported rope_type {rope_type!r}; supported: default, llama3")


def _check_act(hf: dict, key: str, allowed: str) -> None:
    if hf.get(key, allowed) != allowed:
        raise UnsupportedModelError(f"unsupported {key}={hf[key]!r}; supported: {allowed!r}")


# transformers' max_position_embeddings when config.json leaves it out.
_DEFAULT_POSITIONS = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768}


def _llama_family(hf: dict) -> LMConfig:
    _check_act(hf, "hidden_act", "silu")
    model_type = hf["model_type"]
    num_layers = hf["num_hidden_layers"]
    num_heads = hf["num_attention_heads"]
    # A key missing from config.json takes transformers' default (MistralConfig, Qwen2Config);
    # Qwen2 uses its window only with use_sliding_window, also when layer_types name it.
    window = hf.get("sliding_window", 4096 if model_type in ("mistral", "qwen2") else None)
    if model_type == "qwen2" and not hf.get("use_sliding_window"):
        window = None
    if "layer_types" in hf and hf["layer_types"] is not None:
        windows = tuple(window if t == "sliding_attention" else None for t in hf["layer_types"])
    elif model_type == "mistral":
        windows = (window,) * num_layers
    elif model_type == "qwen2" and window is not None:
        first = hf.get("max_window_layers", 28)
        windows = tuple(window if i >= first else None for i in range(num_layers))
    else:
        windows = (None,) * num_layers
    theta, scaling = _rope(hf)
    attention_bias = bool(hf.get("attention_bias", False))
    return LMConfig(
        model_type=model_type,
        family="llama",
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        mlp_dim=hf["intermediate_size"],
        max_len=hf.get("max_position_embeddings", _DEFAULT_POSITIONS[model_type]),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_theta=theta,
        rope_scaling=scaling,
        # Qwen2 always has q/k/v biases and none on o_proj; Llama's are switched together.
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        sliding_windows=windows,
        param_dtype=_stored_dtype(hf),
    )


def _gpt2(hf: dict) -> LMConfig:
    _check_act(hf, "activation_function", "gelu_new")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise UnsupportedModelError(f"unsupported GPT-2 option {flag}=true")
    if not hf.get("scale_attn_weights", True):
        raise UnsupportedModelError("unsupported GPT-2 option scale_attn_weights=false")
    if not hf.get("tie_word_embeddings", True):  # GPT2LMHeadModel's own head, stored unprefixed
        raise UnsupportedModelError("unsupported GPT-2 option tie_word_embeddings=false")
    dim, heads = hf["n_embd"], hf["n_head"]
    return LMConfig(
        model_type="gpt2",
        family="gpt2",
        vocab_size=hf["vocab_size"],
        dim=dim,
        num_layers=hf["n_layer"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=dim // heads,
        mlp_dim=hf.get("n_inner") or 4 * dim,
        max_len=hf["n_positions"],
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=True,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        sliding_windows=(None,) * hf["n_layer"],
        param_dtype=_stored_dtype(hf),
    )


ARCHITECTURES: dict[str, Callable[[dict], LMConfig]] = {
    "llama": _llama_family,
    "mistral": _llama_family,
    "qwen2": _llama_family,
    "gpt2": _gpt2,
}


def rope_frequencies(config: LMConfig) -> np.ndarray:
    """Inverse frequencies `[head_dim / 2]` (float32), llama3 scaling applied when configured."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    if config.rope_scaling is None:
        return inv.astype(np.float32)
    s = dict(config.rope_scaling)
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x, positions, inv_freq):
    """Rotate `x [B, T, H, hd]` by `positions [B, T]` (rotate-half convention)."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    return x * cos + _rotate_half(x) * sin


class RMSNorm(nn.Module):
    eps: float
    dtype: str

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * x32.astype(self.dtype)


def _dense(features, use_bias, dtype, name):
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.normal(0.02),
        name=name,
    )


def attend(q, k, v, q_pos, k_pos, k_valid, window):
    """Grouped-query causal attention.

    q `[B, T, H, hd]`, k/v `[B, S, KVH, hd]`, q_pos `[B, T]`, k_pos `[S]`, k_valid `[B, S]`
    (False for cache slots not written yet); key j is visible from query i iff
    k_pos[j] <= q_pos[i] (and q_pos[i] - k_pos[j] < window with a sliding window).
    Returns `[B, T, H * hd]`.
    """
    b, t, h, hd = q.shape
    kvh = k.shape[2]
    q = q.reshape(b, t, kvh, h // kvh, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / math.sqrt(hd)
    delta = q_pos[:, :, None] - k_pos[None, None, :]
    visible = (delta >= 0) & k_valid[:, None, :]
    if window is not None:
        visible = visible & (delta < window)
    scores = jnp.where(visible[:, None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h * hd)


def _update_cache(cache, k, v, index):
    """Write k/v `[B, T, KVH, hd]` at slot `index`; returns (new cache, all keys, all values)."""
    if cache is None:
        return None, k, v
    k_all = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, index, 0, 0))
    v_all = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, index, 0, 0))
    return {"k": k_all, "v": v_all}, k_all, v_all


class LlamaAttention(nn.Module):
    config: LMConfig
    window: int | None

    @nn.compact
    def __call__(self, x, positions, k_pos, k_valid, cache, index):
        cfg = self.config
        b, t, _ = x.shape
        q = _dense(cfg.num_heads * cfg.head_dim, cfg.qkv_bias, cfg.dtype, "q_proj")(x)
        k = _dense(cfg.num_kv_heads * cfg.head_dim, cfg.qkv_bias, cfg.dtype, "k_proj")(x)
        v = _dense(cfg.num_kv_heads * cfg.head_dim, cfg.qkv_bias, cfg.dtype, "v_proj")(x)
        inv_freq = jnp.asarray(rope_frequencies(cfg))
        q = apply_rope(q.reshape(b, t, cfg.num_heads, cfg.head_dim), positions, inv_freq)
        k = apply_rope(k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim), positions, inv_freq)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        cache, k, v = _update_cache(cache, k, v, index)
        out = attend(q, k, v, positions, k_pos, k_valid, self.window)
        return _dense(cfg.dim, cfg.o_bias, cfg.dtype, "o_proj")(out), cache


class LlamaMLP(nn.Module):
    config: LMConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = _dense(cfg.mlp_dim, cfg.mlp_bias, cfg.dtype, "gate_proj")(x)
        up = _dense(cfg.mlp_dim, cfg.mlp_bias, cfg.dtype, "up_proj")(x)
        return _dense(cfg.dim, cfg.mlp_bias, cfg.dtype, "down_proj")(nn.silu(gate) * up)


class LlamaBlock(nn.Module):
    config: LMConfig
    window: int | None

    @nn.compact
    def __call__(self, x, positions, k_pos, k_valid, cache, index):
        cfg = self.config
        h = RMSNorm(cfg.norm_eps, cfg.dtype, name="input_layernorm")(x)
        h, cache = LlamaAttention(cfg, self.window, name="self_attn")(
            h, positions, k_pos, k_valid, cache, index
        )
        x = x + h
        h = RMSNorm(cfg.norm_eps, cfg.dtype, name="post_attention_layernorm")(x)
        return x + LlamaMLP(cfg, name="mlp")(h), cache


def _layer_norm(cfg: LMConfig, name: str):
    return nn.LayerNorm(epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=jnp.float32, name=name)


class GPT2Attention(nn.Module):
    config: LMConfig

    @nn.compact
    def __call__(self, x, positions, k_pos, k_valid, cache, index):
        cfg = self.config
        b, t, _ = x.shape
        qkv = _dense(3 * cfg.dim, True, cfg.dtype, "c_attn")(x)
        q, k, v = (a.reshape(b, t, cfg.num_heads, cfg.head_dim) for a in jnp.split(qkv, 3, -1))
        cache, k, v = _update_cache(cache, k, v, index)
        out = attend(q, k, v, positions, k_pos, k_valid, None)
        return _dense(cfg.dim, True, cfg.dtype, "c_proj")(out), cache


class GPT2MLP(nn.Module):
    config: LMConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = nn.gelu(_dense(cfg.mlp_dim, True, cfg.dtype, "c_fc")(x), approximate=True)
        return _dense(cfg.dim, True, cfg.dtype, "c_proj")(h)


class GPT2Block(nn.Module):
    config: LMConfig
    window: int | None = None

    @nn.compact
    def __call__(self, x, positions, k_pos, k_valid, cache, index):
        cfg = self.config
        h, cache = GPT2Attention(cfg, name="attn")(
            _layer_norm(cfg, "ln_1")(x), positions, k_pos, k_valid, cache, index
        )
        x = x + h
        return x + GPT2MLP(cfg, name="mlp")(_layer_norm(cfg, "ln_2")(x)), cache


# Per family: (block, token-embedding name, final-norm name, learned-position name or None).
_FAMILIES = {
    "llama": (LlamaBlock, "embed_tokens", "norm", None),
    "gpt2": (GPT2Block, "wte", "ln_f", "wpe"),
}


def init_cache(config: LMConfig, batch: int, length: int, dtype=None) -> list[dict]:
    """An empty key/value cache for `length` positions, one `{"k", "v"}` per layer."""
    shape = (batch, length, config.num_kv_heads, config.head_dim)
    dtype = dtype or config.dtype
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}] * config.num_layers


class LanguageModel(nn.Module):
    """`tokens [B, T] -> logits [B, T, V]`; with a cache, also returns the updated cache.

    Without a cache, positions are 0..T-1. With `cache` (from `init_cache`) and `index` (the slot
    of tokens[:, 0]; a traced int), the tokens sit at positions index..index+T-1 and attend to
    every slot written so far.
    """

    config: LMConfig

    def setup(self):
        cfg = self.config
        block, embed_name, norm_name, pos_name = _FAMILIES[cfg.family]
        init = nn.initializers.normal(0.02)
        self.embed = nn.Embed(cfg.vocab_size, cfg.dim, embedding_init=init, name=embed_name)
        if pos_name:
            self.pos_embed = nn.Embed(cfg.max_len, cfg.dim, embedding_init=init, name=pos_name)
        layer_name = "h" if cfg.family == "gpt2" else "layers"
        self.blocks = [
            block(cfg, w, name=f"{layer_name}_{i}") for i, w in enumerate(cfg.sliding_windows)
        ]
        if cfg.family == "gpt2":
            self.final_norm = _layer_norm(cfg, norm_name)
        else:
            self.final_norm = RMSNorm(cfg.norm_eps, cfg.dtype, name=norm_name)
        if not cfg.tie_embeddings:
            self.lm_head = _dense(cfg.vocab_size, False, cfg.dtype, "lm_head")

    @_own_precision
    def features(self, tokens, cache=None, index=0):
        """Final hidden states `[B, T, D]` (after the final norm) and the updated cache."""
        cfg = self.config
        b, t = tokens.shape
        positions = jnp.broadcast_to(index + jnp.arange(t), (b, t))
        x = self.embed(tokens).astype(cfg.dtype)
        if cfg.family == "gpt2":
            x = x + self.pos_embed(positions).astype(cfg.dtype)
        if cache is None:
            k_pos, k_valid = jnp.arange(t), jnp.ones((b, t), bool)
        else:
            slots = cache[0]["k"].shape[1]
            k_pos = jnp.arange(slots)
            k_valid = jnp.broadcast_to(k_pos < index + t, (b, slots))
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, c = block(x, positions, k_pos, k_valid, None if cache is None else cache[i], index)
            new_cache.append(c)
        return self.final_norm(x), (None if cache is None else new_cache)

    @_own_precision
    def logits(self, hidden):
        """`hidden [B, T, D] -> logits [B, T, V]` in float32."""
        if self.config.tie_embeddings:
            return self.embed.attend(hidden).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    def features_and_logits(self, tokens, cache=None, index=0):
        """(final hidden states `[B, T, D]`, logits `[B, T, V]`, the updated cache)."""
        hidden, new_cache = self.features(tokens, cache, index)
        return hidden, self.logits(hidden), new_cache

    def __call__(self, tokens, cache=None, index=0):
        _, logits, new_cache = self.features_and_logits(tokens, cache, index)
        return logits if cache is None else (logits, new_cache)


def next_token_nll(logits, tokens, mask):
    """(sum of the next-token cross-entropy in nats over `mask [B, L]`, the mask's sum) for the
    `logits` of `tokens[:, :-1]` (`tokens [B, L+1]`): the LM loss of every trainer and scorer,
    a mean within a batch (`mean_nll`) or sums over a split's batches."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return jnp.sum(nll * mask), jnp.sum(mask)


def mean_nll(logits, tokens, mask):
    total, count = next_token_nll(logits, tokens, mask)
    return total / jnp.maximum(count, 1.0)


def sown_losses(collections) -> jax.Array:
    """The sum of what a model sowed into its mutable collections (the gate's regularisers)."""
    return sum((jnp.sum(x) for x in jax.tree.leaves(collections)), jnp.zeros((), jnp.float32))
