"""The language-model study's configs (configs/lm_study.py): the kind "lm_study"."""

from fusion_jax import hf_checkpoint, pretrained, schema
from fusion_jax.data import domains
from fusion_jax.merging import dam
from fusion_jax.models import lm_fusion
from fusion_jax.models.lm import LMConfig

LM_STUDY = {
    "experiment": schema.choice("lm_study"),
    "seed": schema.SEED,
    "num_seeds": schema.integer(1),
    "data.domains": schema.NAME,
    "data.split_seed": schema.SEED,
    "data.val_fraction": schema.FRACTION,
    "data.holdout_fraction": schema.FRACTION,
    "data.max_train_windows": schema.integer(0),
    "data.max_eval_windows": schema.integer(0),
    "data.capped_windows": schema.choice("spread", "first"),
    "data.tfds_dir": schema.TEXT,
    "data.expert_domains": schema.TEXT,
    "model.base": schema.TEXT,
    "model.num_layers": schema.integer(1),
    "model.dim": schema.integer(1),
    "model.num_heads": schema.integer(1),
    "model.num_kv_heads": schema.integer(1),
    "model.mlp_dim": schema.integer(1),
    "model.seq_len": schema.integer(2),
    "model.compute_dtype": schema.COMPUTE_DTYPE,
    "model.matmul_precision": schema.MATMUL_PRECISION,
    "train.batch_size": schema.integer(1),
    "train.learning_rate": schema.POSITIVE,
    "train.base_steps": schema.integer(1),
    "train.expert_steps": schema.integer(1),
    "train.expert_learning_rate": schema.POSITIVE,
    "train.experts_in_sequence": schema.FLAG,
    "train.fusion_steps": schema.integer(1),
    "train.fusion_learning_rate": schema.POSITIVE,
    "train.log_every": schema.integer(1),
    "train.checkpoint_every_secs": schema.NON_NEGATIVE,
    "train.require_accelerator": schema.FLAG,
    "fusion.gate_dim": schema.integer(1),
    "fusion.balance_weight": schema.NON_NEGATIVE,
    "fusion.mix": schema.choice(*lm_fusion.MIXES),
    "fusion.train_head": schema.FLAG,
    "fusion.head_decay": schema.NON_NEGATIVE,
    "fusion.select_windows": schema.integer(0),
    "fusion.e2e_batch_size": schema.integer(0),
    "fusion.e2e_expert_learning_rate": schema.NON_NEGATIVE,
    "dam.num_steps": schema.integer(1),
    "dam.batch_size": schema.integer(1),
    "dam.learning_rate": schema.POSITIVE,
    "dam.inits": schema.Rule(
        lambda v: (
            isinstance(v, str)
            and bool(schema.split_list(v))
            and set(schema.split_list(v)) <= set(dam.INITS)
            and len(set(schema.split_list(v))) == len(schema.split_list(v))
        ),
        f"distinct comma-separated DAM starts among {', '.join(dam.INITS)}",
    ),
    **schema.MERGE_GRIDS,
    "eval.batch_size": schema.integer(1),
    "eval.sample_tokens": schema.integer(0),
    **{f"eval.prompts.{d}": schema.TEXT for d in domains.DOMAINS},
}


def _lm_study_heads(config, devices) -> schema.Problem:
    m = config.model
    if m.dim % m.num_heads:
        return "model.num_heads", f"a divisor of config.model.dim={m.dim}"
    if m.num_heads % m.num_kv_heads:
        return "model.num_kv_heads", f"a divisor of config.model.num_heads={m.num_heads}"
    return None


def _lm_study_domains(config, devices) -> schema.Problem:
    # Resolved before the workdir is bound (`devices` given: about to train), so a typo or a
    # missing package fails at once.
    if devices is None:
        return None
    names = [name for name, _, _ in domains.parse_domains(config.data.domains)]
    if len(names) < 2:
        return "data.domains", "2 or more distinct domains (one expert is trained per domain)"
    experts = schema.split_list(config.data.expert_domains)
    if experts and (len(experts) < 2 or not set(experts) <= set(names)):
        return "data.expert_domains", "'' or 2 or more of the names in config.data.domains"
    return None


def _lm_study_base(config, devices) -> schema.Problem:
    # A pretrained base is fetched or read before the workdir is bound (`devices` given): a
    # missing file fails at once, and the windows must fit its positions.
    if devices is None or not config.model.base:
        return None
    base = pretrained.resolve(config.model.base)
    lm_config = LMConfig.from_hf(hf_checkpoint.read_config(base))
    if config.model.seq_len > lm_config.max_len:
        return "model.seq_len", f"at most the base's {lm_config.max_len} positions"
    return None


SPEC = schema.Spec(
    kind="lm_study",
    config_files="configs/lm_study.py",
    rules=LM_STUDY,
    cross_rules=(_lm_study_heads, _lm_study_domains, _lm_study_base),
    safe_changes={
        "train.log_every": "any",
        "train.checkpoint_every_secs": "any",
        "data.tfds_dir": "any",
        "train.require_accelerator": "any",
        # Only the samples table, generated anew by every run.
        "eval.sample_tokens": "any",
        **{f"eval.prompts.{d}": "any" for d in domains.DOMAINS},
    },
    added_fields={
        "train.require_accelerator": False,
        "train.checkpoint_every_secs": 0.0,
        "model.compute_dtype": "float32",
        "model.matmul_precision": "default",
        "data.capped_windows": "first",
        "data.expert_domains": "",
        "model.base": "",
        "train.experts_in_sequence": False,
        "fusion.mix": "states",
        "fusion.train_head": True,
        "fusion.head_decay": 0.0,
        "fusion.select_windows": 0,
        "fusion.e2e_batch_size": 0,
        "fusion.e2e_expert_learning_rate": 0.0,
        "dam.inits": "repository",
        "eval.sample_tokens": 0,
        **{f"eval.prompts.{d}": "" for d in domains.DOMAINS},
    },
    module="fusion_jax/specs/lm_study.py",
)  # fmt: skip
