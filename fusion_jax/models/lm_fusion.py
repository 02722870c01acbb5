"""Dynamic fusion of K language models: one vmapped module, a per-token gate over the experts.

The K experts (same architecture and tokenizer) are `nn.vmap(LanguageModel)`, so their
parameters are one tree with leaves `[K, ...]`, exactly what the checkpoint loader stacks and the
merges consume. At every token, `GatedFusionAttention` (shared with the grokking fusion model)
weighs the experts by the context (the mean expert state). What it weighs is `mix`:
* "states": the experts' final hidden states, mixed and gated with the context, then read by a
  fusion head `[D, V]`. `init_from_experts` starts the head as the mean of the experts' heads
  and the context projection as the identity: before training, the mean state through the mean
  head.
* "probs": the experts' next-token distributions, each from its own head (a mixture of experts
  per token, as DEMix mixes domain experts): log p = logsumexp_k(log w_k + log p_k), returned as
  the logits. The gate alone trains over frozen experts; with uniform weights it is the
  probability ensemble, and a gate that picks one expert gives that expert exactly.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.models.fusion import FusionConfig, GatedFusionAttention
from fusion_jax.models.lm import LanguageModel, LMConfig, init_cache, traced_at

# FusionConfig has no precision of its own: the gate and the head take the experts', so the
# fused program runs at one precision.
_experts_precision = traced_at(lambda module: module.config.expert.matmul_precision)


class LMFusion(nn.Module):
    """`tokens [B, T] -> logits [B, T, V]` (and the stacked cache when one is passed)."""

    config: FusionConfig  # config.expert is an LMConfig
    mix: str = "states"  # see the module docstring; "probs" needs config.force_gate

    def setup(self):
        cfg = self.config
        if self.mix not in MIXES:
            raise ValueError(f"mix must be one of {MIXES}, got {self.mix!r}")
        if self.mix == "probs" and not cfg.force_gate:
            raise ValueError("mix='probs' weighs distributions: build it with force_gate=True")
        self.experts = nn.vmap(
            LanguageModel,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(None, 0, None),
            out_axes=0,
            axis_size=cfg.num_experts,
            methods=["features", "features_and_logits"],
        )(cfg.expert, name="experts")
        self.fusion = GatedFusionAttention(cfg, name="fusion")
        if self.mix == "states":
            self.head = nn.Dense(
                cfg.expert.vocab_size, use_bias=False, dtype=cfg.expert.dtype, name="head"
            )

    @_experts_precision
    def fused(self, tokens, cache=None, index=0):
        """(gate weights `[B, T, K]`, fused state `[B, T, D]`, cache `[K, ...]` or None)."""
        hidden, cache = self.experts.features(tokens, cache, index)
        weights, mixed = self.fusion(hidden, jnp.mean(hidden, axis=0))
        return weights, mixed, cache

    @_experts_precision
    def __call__(self, tokens, cache=None, index=0):
        if self.mix == "states":
            _, mixed, new_cache = self.fused(tokens, cache, index)
            logits = self.head(mixed).astype(jnp.float32)
        else:
            hidden, expert_logits, new_cache = self.experts.features_and_logits(
                tokens, cache, index
            )
            weights, _ = self.fusion(hidden, jnp.mean(hidden, axis=0))
            log_p = jax.nn.log_softmax(expert_logits, axis=-1)  # [K, B, T, V]
            log_w = jnp.log(jnp.maximum(jnp.moveaxis(weights, -1, 0), 1e-30))[..., None]
            logits = jax.nn.logsumexp(log_w + log_p, axis=0)
        return logits if cache is None else (logits, new_cache)


MIXES = ("states", "probs")


def fusion_config(expert: LMConfig, num_experts: int, **gate) -> FusionConfig:
    """The fusion config for K experts; `gate` sets gate_dim, temperature, top_k, ..."""
    return FusionConfig(expert=expert, num_experts=num_experts, **gate)


def expert_head(config: LMConfig, params) -> np.ndarray:
    """One expert's output projection `[D, V]` (the embedding's transpose when tied)."""
    if config.tie_embeddings:
        embed = params["wte" if config.family == "gpt2" else "embed_tokens"]["embedding"]
        return jnp.asarray(embed).T
    return jnp.asarray(params["lm_head"]["kernel"])


def mean_head(config: LMConfig, stacked) -> jnp.ndarray:
    """The mean of K stacked experts' output projections `[D, V]`, in float32 whatever their
    dtype (the fusion head it starts trains)."""
    heads = jax.vmap(lambda p: expert_head(config, p))(stacked)
    return jnp.mean(heads.astype(jnp.float32), 0)


def init_gate(model: LMFusion, rng, head=None) -> dict:
    """The fusion's own params: a fresh gate (its context projection the identity) and, for
    mix "states", the head `head [D, V]` (`mean_head` of the experts)."""
    cfg = model.config
    gate_init = GatedFusionAttention(cfg).init(
        rng, jnp.zeros((cfg.num_experts, 1, 1, cfg.expert.dim)), jnp.zeros((1, 1, cfg.expert.dim))
    )["params"]
    if "context_proj" in gate_init:
        d = cfg.expert.dim
        gate_init["context_proj"] = {"kernel": jnp.eye(d), "bias": jnp.zeros((d,))}
    if model.mix == "probs":
        return {"fusion": gate_init}
    return {"fusion": gate_init, "head": {"kernel": head}}


def init_from_experts(model: LMFusion, rng, expert_params) -> dict:
    """Fusion params around the experts' params (a list of K trees, or one stacked tree
    `[K, ...]`): the stacked experts and `init_gate`'s. With mix "states" the experts' own heads
    are left out: the fusion head replaces them."""
    cfg = model.config
    if isinstance(expert_params, list | tuple):
        if len(expert_params) != cfg.num_experts:
            raise ValueError(
                f"expected {cfg.num_experts} experts' params, got {len(expert_params)}"
            )
        stacked = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *expert_params)
    else:
        stacked = expert_params
    fresh = jax.eval_shape(model.init, rng, jnp.zeros((1, 1), jnp.int32))["params"]
    if model.mix == "probs":
        params = {"experts": stacked, **init_gate(model, rng)}
    else:
        bodies = {k: v for k, v in stacked.items() if k != "lm_head"}
        params = {"experts": bodies, **init_gate(model, rng, mean_head(cfg.expert, stacked))}
    if jax.tree.structure(params) != jax.tree.structure(fresh):
        raise ValueError("the experts' params do not match the fusion model's expert architecture")
    return params


def init_fusion_cache(config: FusionConfig, batch: int, length: int):
    """A stacked cache `[K, ...]` for the experts."""
    cache = init_cache(config.expert, batch, length)
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (config.num_experts, *x.shape)), cache)
