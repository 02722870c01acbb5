"""Models: the reference Transformer, the vmapped expert ensemble and gated fusion.

`build_model(model_config, task)` picks a model by `model_config.name` from `MODELS`.
"""

from collections.abc import Callable

import flax.linen as nn
import ml_collections

from fusion_jax.data.tasks import SEQ_LEN, Task
from fusion_jax.errors import UserError
from fusion_jax.models import fusion, transformer


def transformer_config(model_config, task: Task) -> transformer.TransformerConfig:
    """The typed, validated Transformer config for a task's vocabulary and classes.

    `task` is anything with `vocab_size` and `num_classes` (a `Task` or a `MultiTask`).
    """
    return transformer.TransformerConfig(
        vocab_size=task.vocab_size,
        num_classes=task.num_classes,
        num_layers=model_config.num_layers,
        dim=model_config.dim,
        num_heads=model_config.num_heads,
        mlp_ratio=model_config.mlp_ratio,
        max_len=SEQ_LEN + 1,  # The reference's position table has 5 rows for 4 input tokens.
        last_position_only=model_config.last_position_only,
    )


def _build_transformer(model_config, task: Task) -> nn.Module:
    return transformer.Transformer(transformer_config(model_config, task))


def fusion_config(model_config, task: Task) -> fusion.FusionConfig:
    return fusion.FusionConfig(
        expert=transformer_config(model_config, task),
        num_experts=model_config.num_experts,
        context=model_config.fusion_context,
        gate_dim=model_config.gate_dim,
        temperature=model_config.temperature,
        top_k=model_config.top_k,
        balance_weight=model_config.balance_weight,
        entropy_weight=model_config.entropy_weight,
    )


def _build_fusion(model_config, task: Task) -> nn.Module:
    return fusion.FusionTransformer(fusion_config(model_config, task))


MODELS: dict[str, Callable[[ml_collections.ConfigDict, Task], nn.Module]] = {
    "transformer": _build_transformer,
    "fusion": _build_fusion,
}


def build_model(model_config, task: Task) -> nn.Module:
    if model_config.name not in MODELS:
        raise UserError(
            f"Unknown config.model.name {model_config.name!r}; "
            f"known models: {', '.join(sorted(MODELS))}."
        )
    return MODELS[model_config.name](model_config, task)
