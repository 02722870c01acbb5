"""The merging comparison's configs (configs/compare.py): the kind "merge_compare"."""

from fusion_jax import merging, schema
from fusion_jax.specs import grokking

# The training loop's fields that the merging pipeline has no use for: it runs in one process
# on one device and saves its training by time (configs/compare.py deletes them).
NOT_IN_MERGE_COMPARE = (
    "train.num_processes", "train.coordinator_address", "train.process_id",
    "train.checkpoint_every", "train.max_to_keep", "train.num_devices",
)  # fmt: skip
MERGE_COMPARE = {
    **{
        f: rule
        for f, rule in grokking.GROKKING.items()
        if f not in grokking.FUSION_MODEL_FIELDS and f not in NOT_IN_MERGE_COMPARE
    },
    "experiment": schema.choice("merge_compare"),
    # Runs of the whole pipeline (seed + r), trained as one vmapped program.
    "num_seeds": schema.integer(1),
    "data.holdout_frac": schema.FRACTION,
    "base.num_steps": schema.integer(1),
    "experts.num_steps": schema.integer(1),
    **schema.MERGE_GRIDS,
    "dam.num_steps": schema.integer(1),
    "dam.learning_rate": schema.POSITIVE,
    "dam.batch_size": schema.integer(1),
    "dam.temperature": schema.POSITIVE,
    "dam.similarity_weight": schema.NON_NEGATIVE,
    "dam.l1_weight": schema.NON_NEGATIVE,
    "dam.l2_weight": schema.NON_NEGATIVE,
    "dam.nonlinearity": schema.choice(*merging.NONLINEARITIES),
    "fusion.num_steps": schema.integer(1),
    "fusion.gate_dim": schema.integer(1),
    "fusion.balance_weight": schema.NON_NEGATIVE,
}


def _holdout(config, devices) -> schema.Problem:
    for name in schema.split_list(config.tasks):
        _, n_train = grokking.train_pairs(config, name)
        if not 1 <= int(n_train * config.data.holdout_frac) <= n_train - 1:
            return (
                "data.holdout_frac",
                f"a fraction that leaves fitting and held-out pairs among the {n_train} "
                f"training pairs of {name}",
            )
    return None


SPEC = schema.Spec(
    kind="merge_compare",
    config_files="configs/compare.py",
    rules=MERGE_COMPARE,
    cross_rules=(grokking.heads_divide_width, grokking.prime_modulus, grokking.both_splits,
                 _holdout),
    safe_changes={
        "name": "any",
        "data.source": "any",
        "data.tfds_dir": "any",
        # Stages are saved per seed: more seeds train only the new ones, the rest are restored.
        "num_seeds": "increase",
        # When unfinished training is saved (chunks end at the same steps whatever it is).
        "train.checkpoint_every_secs": "any",
        "train.require_accelerator": "any",
    },
    added_fields={
        f: v for f, v in grokking.GROKKING_ADDED.items() if f not in NOT_IN_MERGE_COMPARE
    },
    module="fusion_jax/specs/merge_compare.py",
)  # fmt: skip
