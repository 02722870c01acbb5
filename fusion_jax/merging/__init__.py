"""Merging room: static merges and DAM as pure functions on stacked expert parameter trees."""

from fusion_jax.merging import dam
from fusion_jax.merging.dam import NONLINEARITIES, SIMILARITIES, dam_loss, init_coefficients
from fusion_jax.merging.dam import merge as dam_merge
from fusion_jax.merging.static import (
    BLOCKWISE,
    GRID_FIELDS,
    MERGES,
    ROWS,
    Row,
    dare,
    hyperparameters,
    merge,
    needs_base,
    needs_rng,
    num_experts,
    slerp,
    task_arithmetic,
    ties,
    weight_average,
)

__all__ = [
    "BLOCKWISE",
    "GRID_FIELDS",
    "MERGES",
    "ROWS",
    "Row",
    "NONLINEARITIES",
    "SIMILARITIES",
    "dam",
    "dam_loss",
    "dam_merge",
    "dare",
    "hyperparameters",
    "init_coefficients",
    "merge",
    "needs_base",
    "needs_rng",
    "num_experts",
    "slerp",
    "task_arithmetic",
    "ties",
    "weight_average",
]
