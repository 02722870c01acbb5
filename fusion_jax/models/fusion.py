"""Dynamic fusion: K expert Transformers as one vmapped module, and gated fusion attention.

`ExpertEnsemble` lifts `Transformer` with `nn.vmap`, so the K experts' parameters are ONE
pytree whose leaves carry a leading expert axis `[K, ...]` (what the merging room consumes).

`GatedFusionAttention` attends over the experts at every position: a query from the input
context, keys from each expert's hidden state (plus a learned expert embedding, so the gate can
tell experts apart even when their states look alike), values = the expert states themselves.
The weighted state is mixed with the context through a learned sigmoid gate before the head.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from fusion_jax.models.transformer import TorchDense, Transformer, TransformerConfig, layer_norm

CONTEXTS = ("experts", "tokens")


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    """Hyper-parameters of the fusion model; validated on construction."""

    # The expert's config: a TransformerConfig, or an LMConfig for language models.
    expert: TransformerConfig
    num_experts: int = 3
    # Query source: "experts" (mean of the experts' states) or "tokens" (own context encoder).
    context: str = "experts"
    # Width of the gate's query/key space.
    gate_dim: int = 64
    # Softmax temperature over experts (lower = sharper).
    temperature: float = 1.0
    # Keep only the top-k experts per position (0 = all).
    top_k: int = 0
    # Switch-style load-balancing loss weight: alpha * K * sum_k f_k * P_k.
    balance_weight: float = 0.0
    # Weight of the mean gate entropy added to the loss (> 0 sharpens the gate).
    entropy_weight: float = 0.0
    # Fix the mixing gate at 1 (pure fused state); used to check K=1 against a plain expert.
    force_gate: bool = False

    def __post_init__(self):
        if self.num_experts < 1:
            raise ValueError(f"model.num_experts must be >= 1, got {self.num_experts}.")
        if self.context not in CONTEXTS:
            raise ValueError(
                f"model.fusion_context must be one of {CONTEXTS}, got {self.context!r}."
            )
        if not 0 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"model.top_k={self.top_k} must be in [0, model.num_experts={self.num_experts}]."
            )
        if self.temperature <= 0:
            raise ValueError(f"model.temperature must be > 0, got {self.temperature}.")
        if self.gate_dim < 1:
            raise ValueError(f"model.gate_dim must be >= 1, got {self.gate_dim}.")


class ExpertEnsemble(nn.Module):
    """K Transformers in one module: `tokens [B, L] -> hidden [K, B, L', D]`, params `[K, ...]`."""

    config: TransformerConfig
    num_experts: int

    @nn.compact
    def __call__(self, tokens):
        experts = nn.vmap(
            Transformer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=None,
            out_axes=0,
            axis_size=self.num_experts,
            methods=["features", "logits"],
        )(self.config, name="experts")
        return experts.features(tokens)


class ContextEncoder(nn.Module):
    """Causal bag of tokens: at each position, the mean embedding of the tokens so far."""

    vocab_size: int
    dim: int

    @nn.compact
    def __call__(self, tokens, num_positions):
        x = nn.Embed(self.vocab_size, self.dim, embedding_init=nn.initializers.normal(1.0))(tokens)
        x = x + nn.Embed(tokens.shape[-1], self.dim, name="pos")(jnp.arange(tokens.shape[-1]))
        x = jnp.cumsum(x, axis=1) / jnp.arange(1, tokens.shape[-1] + 1)[:, None]
        return layer_norm("norm")(x[:, tokens.shape[-1] - num_positions :])


class GatedFusionAttention(nn.Module):
    """Weights `[B, L', K]` over experts and the fused, gated state `[B, L', D]`."""

    config: FusionConfig

    @nn.compact
    def __call__(self, hidden, context):
        """`hidden [K, B, L', D]` expert states, `context [B, L', C]` the query source."""
        cfg = self.config
        k_experts, d = hidden.shape[0], hidden.shape[-1]
        query = nn.Dense(cfg.gate_dim, name="query")(context)
        expert_embed = self.param(
            "expert_embed", nn.initializers.normal(0.02), (k_experts, cfg.gate_dim)
        )
        keys = nn.Dense(cfg.gate_dim, name="key")(hidden) + expert_embed[:, None, None]
        scores = jnp.einsum("blg,kblg->blk", query, keys) / (
            math.sqrt(cfg.gate_dim) * cfg.temperature
        )
        if cfg.top_k and cfg.top_k < k_experts:
            kth = jax.lax.top_k(scores, cfg.top_k)[0][..., -1:]
            scores = jnp.where(scores >= kth, scores, -jnp.inf)
        weights = jax.nn.softmax(scores, axis=-1)
        fused = jnp.einsum("blk,kbld->bld", weights, hidden)
        if cfg.force_gate:
            mixed = fused
        else:
            base = nn.Dense(d, name="context_proj")(context)
            gate = nn.sigmoid(nn.Dense(d, name="mix_gate")(jnp.concatenate([fused, base], -1)))
            mixed = gate * fused + (1.0 - gate) * base
        self.sow("intermediates", "gate_weights", weights)
        self._regularise(weights)
        return weights, mixed

    def _regularise(self, weights):
        cfg = self.config
        k_experts = weights.shape[-1]
        if cfg.balance_weight:
            top1 = jax.nn.one_hot(jnp.argmax(weights, -1), k_experts)
            frac = jnp.mean(top1.reshape(-1, k_experts), axis=0)  # f_k: share routed to k
            prob = jnp.mean(weights.reshape(-1, k_experts), axis=0)  # P_k: mean gate prob
            self.sow("aux_loss", "balance", cfg.balance_weight * k_experts * jnp.sum(frac * prob))
        if cfg.entropy_weight:
            self.sow("aux_loss", "entropy", cfg.entropy_weight * jnp.mean(gate_entropy(weights)))


def gate_entropy(weights):
    """Entropy (nats) of gate distributions over the last axis; 0 * log 0 counts as 0."""
    return -jnp.sum(jnp.where(weights > 0, weights * jnp.log(jnp.maximum(weights, 1e-30)), 0), -1)


class FusionTransformer(nn.Module):
    """All experts run; the gate fuses their states; a fusion head reads the last position."""

    config: FusionConfig

    def setup(self):
        cfg = self.config
        self.ensemble = ExpertEnsemble(cfg.expert, cfg.num_experts)
        if cfg.context == "tokens":
            self.context_encoder = ContextEncoder(cfg.expert.vocab_size, cfg.gate_dim)
        self.fusion = GatedFusionAttention(cfg)
        self.head = TorchDense(cfg.expert.num_classes)

    def fused_features(self, tokens):
        """`(gate weights [B, L', K], fused states [B, L', D])`."""
        hidden = self.ensemble(tokens)
        if self.config.context == "tokens":
            context = self.context_encoder(tokens, hidden.shape[2])
        else:
            context = jnp.mean(hidden, axis=0)
        return self.fusion(hidden, context)

    def __call__(self, tokens):
        return self.head(self.fused_features(tokens)[1][:, -1])
