"""lm_fuse configs (configs/lm_fuse.py): the kind "lm_fuse"."""

from fusion_jax import mesh, schema
from fusion_jax.data import text
from fusion_jax.specs import checkpoints

LM_FUSE = {
    "experiment": schema.choice("lm_fuse"),
    "models": checkpoints.directories(2),
    "seed": schema.SEED,
    "compute_dtype": schema.COMPUTE_DTYPE,
    "matmul_precision": schema.MATMUL_PRECISION,
    "data.sources": schema.TEXT,
    "data.record_separator": schema.TEXT,
    "data.tokenizer": checkpoints.TOKENIZER,
    "data.special_tokens": schema.FLAG,
    "data.seq_len": schema.integer(1),
    "data.val_fraction": schema.FRACTION,
    "fusion.gate_dim": schema.integer(1),
    "fusion.temperature": schema.POSITIVE,
    "fusion.top_k": schema.integer(0),
    "fusion.balance_weight": schema.NON_NEGATIVE,
    "fusion.entropy_weight": schema.number(),
    "train.end_to_end": schema.FLAG,
    "train.num_steps": schema.integer(1),
    "train.batch_size": schema.integer(1),
    "train.num_devices": schema.integer(0),
    "train.mesh": mesh.MESH,
    "train.learning_rate": schema.POSITIVE,
    "train.weight_decay": schema.NON_NEGATIVE,
    "train.log_every": schema.integer(1),
    "train.checkpoint_every": schema.integer(1),
    "train.require_accelerator": schema.FLAG,
    "generate.prompt": schema.TEXT,
    "generate.max_new_tokens": schema.integer(1),
    "generate.temperature": schema.NON_NEGATIVE,
    "generate.seed": schema.SEED,
}


def _lm_fuse_top_k(config, devices) -> schema.Problem:
    n = len(schema.split_list(config.models))
    if config.fusion.top_k > n:
        return "fusion.top_k", f"<= the {n} experts in config.models (0 = all experts)"
    return None


def _two_documents(config, devices) -> schema.Problem:
    # The training and the validation split need a document each: without a record separator
    # each file is one; with one, the records are counted (the text is read here, before the
    # workdir is bound). Only before training (`devices` given): generating from a workdir
    # needs no text. Empty and binary sources are refused here too, by name.
    if devices is None:
        return None
    paths = text.text_files(config.data.sources)
    separator = config.data.record_separator
    if not separator and len(paths) < 2:
        return "data.sources", (
            "2 or more files (one document each: a training and a validation split need one "
            "each), or files split into records by config.data.record_separator"
        )
    if separator and (n := len(text.read_documents(paths, separator))) < 2:
        return "data.sources", (
            f"text of 2 or more records split by config.data.record_separator={separator!r} "
            f"(it holds {n}): a training and a validation split need one each"
        )
    return None


SPEC = schema.Spec(
    kind="lm_fuse",
    config_files="configs/lm_fuse.py",
    rules=LM_FUSE,
    cross_rules=(_lm_fuse_top_k, checkpoints.compatible_checkpoints,
                 checkpoints.data_parallel("train"), checkpoints.within_positions("data.seq_len"),
                 _two_documents),
    safe_changes={
        "train.num_steps": "increase",
        "train.num_devices": "any",  # the same sums, added in another order
        "train.mesh": "any",  # a resume reshards the checkpoint onto the new mesh
        "train.log_every": "any",
        "train.checkpoint_every": "any",
        "train.require_accelerator": "any",
        "generate.prompt": "any",
        "generate.max_new_tokens": "any",
        "generate.temperature": "any",
        "generate.seed": "any",
    },
    added_fields={
        "train.require_accelerator": False,
        "matmul_precision": "default",
        "data.special_tokens": False,
        "train.num_devices": 1,
        "train.mesh": "auto",
    },
    module="fusion_jax/specs/lm_fuse.py",
)  # fmt: skip
