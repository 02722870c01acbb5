"""What every config field may hold, and which fields a bound workdir lets change.

A config's kind is its `config.experiment` (None: grokking training, configs/baseline.py and
configs/dyn_fusion.py). Each kind has one table `RULES[kind]`, dotted field -> `Rule`, and a list
of cross-field rules `CROSS_RULES[kind]`. `validate` checks every leaf of a config against its
table, so a field without a rule is refused rather than left unchecked, then the cross-field
rules. Every message is one line: `config.<field>=<value>: must be <allowed values>`.

`SAFE_CHANGES[kind]` lists the fields a workdir's config may change between runs because they do
not change results, and `unused_fields` the fields a config's run never reads (an lm_merge of one
method reads no other method's hyper-parameters); fusion_jax/workdir.py refuses every other
difference.
"""

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax

from fusion_jax import gguf_checkpoint, hf_checkpoint, merging, models, pretrained
from fusion_jax.data import domains, text
from fusion_jax.data import tasks as tasks_lib
from fusion_jax.errors import UserError
from fusion_jax.merging import dam
from fusion_jax.models import fusion, lm_fusion
from fusion_jax.models.lm import LMConfig


@dataclasses.dataclass(frozen=True)
class Rule:
    """One field's allowed values: `ok(value)`, and words that complete "must be ..."."""

    ok: Callable[[Any], bool]
    allowed: str
    # Optional fields exist in some configs of a kind only (the fusion model's fields).
    required: bool = True


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def integer(low: int, required: bool = True) -> Rule:
    return Rule(lambda v: _is_int(v) and v >= low, f"an integer >= {low}", required)


def number(
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    required: bool = True,
) -> Rule:
    """A finite int or float, at least `low` (if given) and at most `high` (only with a `low`),
    each bound open or closed."""

    def ok(v):
        if not _is_number(v):
            return False
        above = low is None or (v > low if low_open else v >= low)
        below = high is None or (v < high if high_open else v <= high)
        return above and below

    if low is None:
        text = "a finite number"
    elif high is None:
        text = f"a number {'>' if low_open else '>='} {low:g}"
    else:
        text = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return Rule(ok, text, required)


def choice(*options, required: bool = True) -> Rule:
    return Rule(lambda v: v in options, "one of " + ", ".join(map(repr, options)), required)


def numbers(each: Rule) -> Rule:
    """A non-empty tuple (a list once read back from config.json) of values passing `each`."""
    return Rule(
        lambda v: isinstance(v, list | tuple) and len(v) > 0 and all(each.ok(x) for x in v),
        f"a non-empty tuple, each {each.allowed}",
    )


def split_list(value: str) -> list[str]:
    """The items of a comma-separated config field, stripped, empty ones dropped."""
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _task_list(v) -> bool:
    if not isinstance(v, str):
        return False
    names = split_list(v)
    return bool(names) and len(set(names)) == len(names) and set(names) <= set(tasks_lib.TASKS)


def _is_checkpoint(path: str) -> bool:
    """An existing checkpoint directory or GGUF file."""
    return os.path.isdir(path) or (path.endswith(".gguf") and os.path.isfile(path))


def _directories(minimum: int) -> Rule:
    def ok(v):
        paths = split_list(v) if isinstance(v, str) else []
        return len(paths) >= minimum and all(map(_is_checkpoint, paths))

    return Rule(
        ok, f"{minimum} or more existing checkpoint directories or .gguf files, comma-separated"
    )


def _tokenizer(v) -> bool:
    return isinstance(v, str) and (v in ("model", "bytes") or os.path.isfile(v))


def _shard_size(v) -> bool:
    if _is_int(v):
        return v >= 1
    try:
        return isinstance(v, str) and hf_checkpoint.parse_size(v) >= 1
    except ValueError:
        return False


def _weights(v) -> bool:
    try:
        return isinstance(v, str) and all(math.isfinite(float(w)) for w in split_list(v))
    except ValueError:
        return False


TEXT = Rule(lambda v: isinstance(v, str), "a string")
NAME = Rule(lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string")
FLAG = Rule(lambda v: isinstance(v, bool), "True or False")
POSITIVE = number(0, low_open=True)
NON_NEGATIVE = number(0)
FRACTION = number(0, 1, low_open=True, high_open=True)
SEED = integer(0)
TASKS = Rule(
    _task_list, "distinct comma-separated task names from " + ", ".join(sorted(tasks_lib.TASKS))
)

# Names accepted by jax.default_matmul_precision, from the most to the least exact.
MATMUL_PRECISION = choice("highest", "high", "default")
COMPUTE_DTYPE = choice("float32", "bfloat16")

# The grokking training configs (configs/baseline.py, configs/dyn_fusion.py).
GROKKING = {
    "name": NAME,
    # A run key of reference/seed_runs.json for comparison tables, or None.
    "reference_run": Rule(lambda v: v is None or isinstance(v, str), "None or a string"),
    "tasks": TASKS,
    "num_steps": integer(1),
    "num_seeds": integer(1),
    "seed": SEED,
    "data.p": integer(2),
    "data.frac_train": FRACTION,
    "data.source": choice("tfds", "algebra"),
    "data.tfds_dir": NAME,
    "model.name": choice(*models.MODELS),
    "model.num_layers": integer(1),
    "model.dim": integer(1),
    "model.num_heads": integer(1),
    "model.mlp_ratio": integer(1),
    "model.last_position_only": FLAG,
    "model.freeze_experts": FLAG,
    "model.matmul_precision": MATMUL_PRECISION,
    "model.compute_dtype": COMPUTE_DTYPE,
    # The fusion model's fields (configs/dyn_fusion.py).
    "model.num_experts": integer(1, required=False),
    "model.fusion_context": choice(*fusion.CONTEXTS, required=False),
    "model.gate_dim": integer(1, required=False),
    "model.temperature": number(0, low_open=True, required=False),
    "model.top_k": integer(0, required=False),
    "model.balance_weight": number(0, required=False),
    "model.entropy_weight": number(required=False),
    "opt.learning_rate": POSITIVE,
    "opt.b1": number(0, 1, high_open=True),
    "opt.b2": number(0, 1, high_open=True),
    "opt.eps": POSITIVE,
    "opt.weight_decay": NON_NEGATIVE,
    "opt.warmup_steps": integer(0),
    "train.batch_size": integer(1),
    "train.eval_every": integer(1),
    "train.log_every": integer(1),
    "train.checkpoint_every": integer(1),
    "train.max_to_keep": integer(1),
    "train.num_devices": integer(0),
    "train.checkpoint_every_secs": NON_NEGATIVE,
    "train.require_accelerator": FLAG,
    "train.num_processes": integer(0),
    "train.coordinator_address": TEXT,
    "train.process_id": integer(0),
    "eval.mode": choice("exact", "sampled"),
    "eval.num_batches": integer(1),
    "eval.batch_size": integer(1),
    "eval.acc_threshold": number(0, 1),
}
FUSION_MODEL_FIELDS = tuple(f for f, rule in GROKKING.items() if not rule.required)

MERGE_GRIDS = {
    "grid.lams": numbers(number()),
    "grid.densities": numbers(number(0, 1, low_open=True)),
    "grid.drop_rates": numbers(number(0, 1, high_open=True)),
    "grid.slerp_ts": numbers(number(0, 1)),
}

# configs/compare.py: the grokking fields (its fusion models have their own section) plus the
# merging pipeline's stages and grids.
# The training loop's fields that the merging pipeline has no use for: it runs in one process
# on one device and saves its training by time (configs/compare.py deletes them).
NOT_IN_MERGE_COMPARE = (
    "train.num_processes", "train.coordinator_address", "train.process_id",
    "train.checkpoint_every", "train.max_to_keep", "train.num_devices",
)  # fmt: skip
MERGE_COMPARE = {
    **{
        f: rule
        for f, rule in GROKKING.items()
        if f not in FUSION_MODEL_FIELDS and f not in NOT_IN_MERGE_COMPARE
    },
    "experiment": choice("merge_compare"),
    # Runs of the whole pipeline (seed + r), trained as one vmapped program.
    "num_seeds": integer(1),
    "data.holdout_frac": FRACTION,
    "base.num_steps": integer(1),
    "experts.num_steps": integer(1),
    **MERGE_GRIDS,
    "dam.num_steps": integer(1),
    "dam.learning_rate": POSITIVE,
    "dam.batch_size": integer(1),
    "dam.temperature": POSITIVE,
    "dam.similarity_weight": NON_NEGATIVE,
    "dam.l1_weight": NON_NEGATIVE,
    "dam.l2_weight": NON_NEGATIVE,
    "dam.nonlinearity": choice(*merging.NONLINEARITIES),
    "fusion.num_steps": integer(1),
    "fusion.gate_dim": integer(1),
    "fusion.balance_weight": NON_NEGATIVE,
}

DAM_GROUPS = dam.GROUPS
TOKENIZER = Rule(_tokenizer, "'model', 'bytes' or an existing tokenizer.json file")

# configs/lm_merge.py.
LM_MERGE = {
    "experiment": choice("lm_merge"),
    "base": Rule(
        lambda v: isinstance(v, str) and (v == "" or _is_checkpoint(v)),
        "'' or an existing checkpoint directory or .gguf file",
    ),
    "models": _directories(1),
    # Read when checked, so a method registered in merging.MERGES after import is offered too.
    "method": Rule(
        lambda v: v == "dam" or v in merging.MERGES,
        "one of " + ", ".join(map(repr, [*merging.MERGES, "dam"])),
    ),
    "weights": Rule(_weights, "'' (uniform) or comma-separated numbers, one per model"),
    "lam": number(),
    "density": number(0, 1, low_open=True),
    "drop_rate": number(0, 1, high_open=True),
    "combine": choice("linear", "ties"),
    "t": number(0, 1),
    "seed": SEED,
    "dtype": choice("", *hf_checkpoint.DTYPES),
    "max_shard_size": Rule(_shard_size, "a size like '2GB', '500MB', '100KB' or bytes >= 1"),
    "output_format": choice("safetensors", "gguf", "both"),
    "gguf_type": choice("", *gguf_checkpoint.WRITE_TYPES),
    "dam.data": TEXT,
    "dam.tokenizer": TOKENIZER,
    "dam.special_tokens": FLAG,
    "dam.seq_len": integer(1),
    "dam.batch_size": integer(1),
    "dam.num_devices": integer(0),
    "dam.num_steps": integer(0),
    "dam.learning_rate": POSITIVE,
    "dam.temperature": POSITIVE,
    "dam.similarity": choice(*merging.SIMILARITIES),
    "dam.similarity_weight": NON_NEGATIVE,
    "dam.l1_weight": NON_NEGATIVE,
    "dam.l2_weight": NON_NEGATIVE,
    "dam.nonlinearity": choice(*merging.NONLINEARITIES),
    "dam.train": Rule(
        lambda v: (
            isinstance(v, str) and bool(split_list(v)) and set(split_list(v)) <= set(DAM_GROUPS)
        ),
        "comma-separated groups from " + ", ".join(DAM_GROUPS),
    ),
    "dam.compute_dtype": COMPUTE_DTYPE,
    "dam.matmul_precision": MATMUL_PRECISION,
    "dam.log_every": integer(1),
    "dam.checkpoint_every": integer(1),
}

# configs/lm_fuse.py.
LM_FUSE = {
    "experiment": choice("lm_fuse"),
    "models": _directories(2),
    "seed": SEED,
    "compute_dtype": COMPUTE_DTYPE,
    "matmul_precision": MATMUL_PRECISION,
    "data.sources": TEXT,
    "data.record_separator": TEXT,
    "data.tokenizer": TOKENIZER,
    "data.special_tokens": FLAG,
    "data.seq_len": integer(1),
    "data.val_fraction": FRACTION,
    "fusion.gate_dim": integer(1),
    "fusion.temperature": POSITIVE,
    "fusion.top_k": integer(0),
    "fusion.balance_weight": NON_NEGATIVE,
    "fusion.entropy_weight": number(),
    "train.end_to_end": FLAG,
    "train.num_steps": integer(1),
    "train.batch_size": integer(1),
    "train.num_devices": integer(0),
    "train.learning_rate": POSITIVE,
    "train.weight_decay": NON_NEGATIVE,
    "train.log_every": integer(1),
    "train.checkpoint_every": integer(1),
    "train.require_accelerator": FLAG,
    "generate.prompt": TEXT,
    "generate.max_new_tokens": integer(1),
    "generate.temperature": NON_NEGATIVE,
    "generate.seed": SEED,
}

# configs/lm_study.py (the language-model study).
LM_STUDY = {
    "experiment": choice("lm_study"),
    "seed": SEED,
    "num_seeds": integer(1),
    "data.domains": NAME,
    "data.split_seed": SEED,
    "data.val_fraction": FRACTION,
    "data.holdout_fraction": FRACTION,
    "data.max_train_windows": integer(0),
    "data.max_eval_windows": integer(0),
    "data.capped_windows": choice("spread", "first"),
    "data.tfds_dir": TEXT,
    "data.expert_domains": TEXT,
    "model.base": TEXT,
    "model.num_layers": integer(1),
    "model.dim": integer(1),
    "model.num_heads": integer(1),
    "model.num_kv_heads": integer(1),
    "model.mlp_dim": integer(1),
    "model.seq_len": integer(2),
    "model.compute_dtype": COMPUTE_DTYPE,
    "model.matmul_precision": MATMUL_PRECISION,
    "train.batch_size": integer(1),
    "train.learning_rate": POSITIVE,
    "train.base_steps": integer(1),
    "train.expert_steps": integer(1),
    "train.expert_learning_rate": POSITIVE,
    "train.experts_in_sequence": FLAG,
    "train.fusion_steps": integer(1),
    "train.fusion_learning_rate": POSITIVE,
    "train.log_every": integer(1),
    "train.checkpoint_every_secs": NON_NEGATIVE,
    "train.require_accelerator": FLAG,
    "fusion.gate_dim": integer(1),
    "fusion.balance_weight": NON_NEGATIVE,
    "fusion.mix": choice(*lm_fusion.MIXES),
    "fusion.train_head": FLAG,
    "fusion.head_decay": NON_NEGATIVE,
    "fusion.select_windows": integer(0),
    "fusion.e2e_batch_size": integer(0),
    "fusion.e2e_expert_learning_rate": NON_NEGATIVE,
    "dam.num_steps": integer(1),
    "dam.batch_size": integer(1),
    "dam.learning_rate": POSITIVE,
    "dam.inits": Rule(
        lambda v: (
            isinstance(v, str)
            and bool(split_list(v))
            and set(split_list(v)) <= set(dam.INITS)
            and len(set(split_list(v))) == len(split_list(v))
        ),
        f"distinct comma-separated DAM starts among {', '.join(dam.INITS)}",
    ),
    **MERGE_GRIDS,
    "eval.batch_size": integer(1),
    "eval.sample_tokens": integer(0),
    **{f"eval.prompts.{d}": TEXT for d in domains.DOMAINS},
}

RULES: dict[str | None, dict[str, Rule]] = {
    None: GROKKING,
    "merge_compare": MERGE_COMPARE,
    "lm_merge": LM_MERGE,
    "lm_fuse": LM_FUSE,
    "lm_study": LM_STUDY,
}
# The config files of each kind, for messages that say which config to use.
CONFIG_FILES = {
    None: "configs/baseline.py, configs/dyn_fusion.py",
    "merge_compare": "configs/compare.py",
    "lm_merge": "configs/lm_merge.py",
    "lm_fuse": "configs/lm_fuse.py",
    "lm_study": "configs/lm_study.py",
}

# A cross-field rule returns None, or (field, allowed values) for the first field it refuses.
# `devices` is the local device count when the config is about to train with pmap, else None.
Problem = tuple[str, str] | None


def _heads_divide_width(config, devices) -> Problem:
    m = config.model
    if m.dim % m.num_heads:
        return "model.num_heads", f"a divisor of config.model.dim={m.dim}"
    return None


def _fusion_fields(config, devices) -> Problem:
    m = config.model
    has_fields = all(f.split(".")[1] in m for f in FUSION_MODEL_FIELDS)
    if m.name == "fusion" and not has_fields:
        return (
            "model.name",
            "'transformer' unless the config has the fusion model's fields (configs/dyn_fusion.py)",
        )
    if m.freeze_experts and m.name != "fusion":
        return (
            "model.freeze_experts",
            "False unless config.model.name='fusion' (a model with experts to freeze)",
        )
    if has_fields and m.top_k > m.num_experts:
        return "model.top_k", f"<= config.model.num_experts={m.num_experts} (0 = all experts)"
    return None


def _prime_modulus(config, devices) -> Problem:
    if "x_div_y" in split_list(config.tasks) and not _is_prime(config.data.p):
        return (
            "data.p",
            "a prime for task x_div_y (b^(p-2) is the inverse of b mod p only when p is prime)",
        )
    return None


def _train_pairs(config, name: str) -> tuple[int, int]:
    """(all pairs, training pairs) of task `name` under the config's p and frac_train."""
    n = tasks_lib.get_task(name, tasks_lib.size_for(name, config.data.p)).num_pairs
    return n, int(n * config.data.frac_train)


def _both_splits(config, devices) -> Problem:
    for name in split_list(config.tasks):
        n, n_train = _train_pairs(config, name)
        if not 1 <= n_train <= n - 1:
            return (
                "data.frac_train",
                f"a fraction that leaves training and validation pairs among the {n} pairs of "
                f"{name}",
            )
    return None


def _holdout(config, devices) -> Problem:
    for name in split_list(config.tasks):
        _, n_train = _train_pairs(config, name)
        if not 1 <= int(n_train * config.data.holdout_frac) <= n_train - 1:
            return (
                "data.holdout_frac",
                f"a fraction that leaves fitting and held-out pairs among the {n_train} "
                f"training pairs of {name}",
            )
    return None


def _intervals(config, devices) -> Problem:
    t = config.train
    if t.log_every % t.eval_every:
        return "train.log_every", f"a multiple of config.train.eval_every={t.eval_every}"
    if t.checkpoint_every % t.log_every:
        return "train.checkpoint_every", f"a multiple of config.train.log_every={t.log_every}"
    if config.num_steps % t.eval_every:
        return "num_steps", f"a multiple of config.train.eval_every={t.eval_every}"
    return None


def _devices(config, devices) -> Problem:
    if devices is None:
        return None
    if config.train.num_devices > devices:
        return "train.num_devices", f"an integer in [0, {devices}] (the local devices; 0 = all)"
    # The batch is split over the devices of every process of a multi-process run.
    n = (config.train.num_devices or devices) * jax.process_count()
    for field in ("train.batch_size", "eval.batch_size"):
        if lookup(config, field) % n:
            return (
                field,
                f"divisible by the {n} devices used for data parallelism (or set "
                "config.train.num_devices)",
            )
    return None


def _processes(config, devices) -> Problem:
    t = config.train
    if t.num_processes > 1 and not re.fullmatch(r"[^:\s]+:\d+", t.coordinator_address):
        return (
            "train.coordinator_address",
            f"'host:port' of process 0 when config.train.num_processes={t.num_processes}",
        )
    if t.num_processes > 1 and t.process_id >= t.num_processes:
        return "train.process_id", f"an integer in [0, {t.num_processes - 1}]"
    return None


def _lm_merge_inputs(config, devices) -> Problem:
    n = len(split_list(config.models))
    if config.method in ("task_arithmetic", "ties", "dare") and not config.base:
        return "base", f"a checkpoint directory for config.method={config.method!r}"
    if config.method == "slerp" and n != 2:
        return "models", "exactly 2 checkpoint directories for config.method='slerp'"
    if config.method == "weight_average" and len(split_list(config.weights)) not in (0, n):
        return "weights", f"'' or {n} comma-separated numbers (one per model)"
    if math.fsum(float(w) for w in split_list(config.weights)) == 0 and config.weights.strip():
        return "weights", "numbers whose sum is not 0 (they are divided by their sum)"
    sources = [s for s in config.dam.data.split(";") if s.strip()]
    if config.method == "dam" and len(sources) != n:
        return "dam.data", f"{n} text sources separated by ';' (one per model)"
    if config.method == "dam" and devices is not None:  # about to train: read before binding
        for source in sources:
            text.text_files(source)
    return None


def _lm_study_heads(config, devices) -> Problem:
    m = config.model
    if m.dim % m.num_heads:
        return "model.num_heads", f"a divisor of config.model.dim={m.dim}"
    if m.num_heads % m.num_kv_heads:
        return "model.num_kv_heads", f"a divisor of config.model.num_heads={m.num_heads}"
    return None


def _within_positions(seq_len_field: str):
    """A cross rule: windows of `seq_len_field` tokens fit GPT-2's learned positions (past them
    its position embeddings do not exist, and the outputs are NaN; RoPE models take any)."""

    def rule(config, devices) -> Problem:
        del devices
        if seq_len_field.startswith("dam.") and config.method != "dam":
            return None
        first = split_list(config.models)[0]
        lm_config = LMConfig.from_hf(hf_checkpoint.read_config(first))
        if lm_config.family == "gpt2" and lookup(config, seq_len_field) > lm_config.max_len:
            return seq_len_field, (
                f"at most the models' n_positions={lm_config.max_len} (GPT-2 learns one "
                "embedding per position)"
            )
        return None

    return rule


def _compatible_checkpoints(config, devices) -> Problem:
    # Before the workdir is bound (`devices` given: about to run), so that a run refused for
    # mismatched inputs leaves no workdir behind and the fixed command may reuse it. The error
    # is check_compatible's own line, naming the first field or tensor that differs.
    if devices is not None:
        base = [config.base] if config.get("base") else []
        hf_checkpoint.check_compatible(base + split_list(config.models))
    return None


def _two_documents(config, devices) -> Problem:
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


def _lm_study_domains(config, devices) -> Problem:
    # Resolved before the workdir is bound (`devices` given: about to train), so a typo or a
    # missing package fails at once.
    if devices is None:
        return None
    names = [name for name, _, _ in domains.parse_domains(config.data.domains)]
    if len(names) < 2:
        return "data.domains", "2 or more distinct domains (one expert is trained per domain)"
    experts = split_list(config.data.expert_domains)
    if experts and (len(experts) < 2 or not set(experts) <= set(names)):
        return "data.expert_domains", "'' or 2 or more of the names in config.data.domains"
    return None


def _lm_study_base(config, devices) -> Problem:
    # A pretrained base is fetched or read before the workdir is bound (`devices` given): a
    # missing file fails at once, and the windows must fit its positions.
    if devices is None or not config.model.base:
        return None
    base = pretrained.resolve(config.model.base)
    lm_config = LMConfig.from_hf(hf_checkpoint.read_config(base))
    if config.model.seq_len > lm_config.max_len:
        return "model.seq_len", f"at most the base's {lm_config.max_len} positions"
    return None


def _data_parallel(section: str, only_if: Callable[[Any], bool] = lambda config: True):
    """Cross rule: `<section>.num_devices` within the local devices and dividing
    `<section>.batch_size`."""

    def rule(config, devices) -> Problem:
        if devices is None or not only_if(config):
            return None
        wanted = lookup(config, f"{section}.num_devices")
        if wanted > devices:
            return (
                f"{section}.num_devices",
                f"an integer in [0, {devices}] (the local devices; 0 = all)",
            )
        n = wanted or devices
        if lookup(config, f"{section}.batch_size") % n:
            return (
                f"{section}.batch_size",
                f"divisible by the {n} devices used for data parallelism (or set "
                f"config.{section}.num_devices)",
            )
        return None

    return rule


def _lm_fuse_top_k(config, devices) -> Problem:
    n = len(split_list(config.models))
    if config.fusion.top_k > n:
        return "fusion.top_k", f"<= the {n} experts in config.models (0 = all experts)"
    return None


CROSS_RULES: dict[str | None, tuple[Callable[..., Problem], ...]] = {
    None: (_heads_divide_width, _fusion_fields, _prime_modulus, _both_splits, _intervals,
           _devices, _processes),
    "merge_compare": (_heads_divide_width, _prime_modulus, _both_splits, _holdout),
    "lm_merge": (_lm_merge_inputs, _compatible_checkpoints, _within_positions("dam.seq_len"),
                 _data_parallel("dam", lambda config: config.method == "dam")),
    "lm_fuse": (_lm_fuse_top_k, _compatible_checkpoints, _data_parallel("train"),
                _within_positions("data.seq_len"), _two_documents),
    "lm_study": (_lm_study_heads, _lm_study_domains, _lm_study_base),
}  # fmt: skip


def _inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies inside it (links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def check_apart(output: str, inputs: list[str], workdir: str | None = None) -> None:
    """Refuses an `output` path that is an input, contains one or lies inside one (writing it
    would replace, delete or add to a model that the run reads and the user keeps), and a
    `workdir` inside an input."""
    for path in inputs:
        if _inside(output, path) or _inside(path, output) or (workdir and _inside(workdir, path)):
            raise UserError(
                f"the output {workdir or output} overlaps the input {path} (the same path, or "
                "one inside the other); choose a --workdir apart from every input"
            )


def _lm_merge_outputs(config, workdir: str) -> None:
    # The folders lm_merge replaces: merged/, and merged.partial/ and merged.old/ beside it.
    inputs = [p for p in [config.base, *split_list(config.models)] if p]
    for suffix in ("", ".partial", ".old"):
        check_apart(os.path.join(workdir, "merged" + suffix), inputs, workdir)


# Checks of the workdir's place against a config's inputs, run before the workdir is bound.
OUTPUT_RULES: dict[str | None, Callable[[Any, str], None]] = {"lm_merge": _lm_merge_outputs}


# Fields a workdir's config may change, because they do not change results: "any" change,
# "increase" only (a longer run continues the shorter one exactly; a shorter one would leave
# results past its end), or "reorder" (the same comma-separated items in another order).
# Everything else is refused by fusion_jax/workdir.py.
SAFE_CHANGES: dict[str | None, dict[str, str]] = {
    None: {
        "name": "any",  # a title in plots and tables
        "num_steps": "increase",
        "tasks": "reorder",  # each task trains on its own: the order is only the schedule
        # Chunking, progress lines and checkpoint I/O only.
        "train.log_every": "any",
        "train.checkpoint_every": "any",
        "train.max_to_keep": "any",
        # Data parallelism: equal to rounding (tests/test_multidevice.py), in one process or
        # several (tests/test_multihost.py).
        "train.num_devices": "any",
        "train.num_processes": "any",
        "train.coordinator_address": "any",
        "train.process_id": "any",
        # When to save, and a start-up check, only.
        "train.checkpoint_every_secs": "any",
        "train.require_accelerator": "any",
        # The same tables from TFDS or from the algebra (tests/test_data.py).
        "data.source": "any",
        "data.tfds_dir": "any",
    },
    "merge_compare": {
        "name": "any",
        "data.source": "any",
        "data.tfds_dir": "any",
        # Stages are saved per seed: more seeds train only the new ones, the rest are restored.
        "num_seeds": "increase",
        # When unfinished training is saved (chunks end at the same steps whatever it is).
        "train.checkpoint_every_secs": "any",
        "train.require_accelerator": "any",
    },
    "lm_merge": {
        "max_shard_size": "any",
        "dam.log_every": "any",
        "dam.checkpoint_every": "any",
        "dam.num_devices": "any",  # the same sums, added in another order
    },
    # Steps per compiled chunk, when unfinished training is saved, the place of the packed
    # datasets and a start-up check only.
    "lm_study": {
        "train.log_every": "any",
        "train.checkpoint_every_secs": "any",
        "data.tfds_dir": "any",
        "train.require_accelerator": "any",
        # Only the samples table, generated anew by every run.
        "eval.sample_tokens": "any",
        **{f"eval.prompts.{d}": "any" for d in domains.DOMAINS},
    },
    "lm_fuse": {
        "train.num_steps": "increase",
        "train.num_devices": "any",  # the same sums, added in another order
        "train.log_every": "any",
        "train.checkpoint_every": "any",
        "train.require_accelerator": "any",
        "generate.prompt": "any",
        "generate.max_new_tokens": "any",
        "generate.temperature": "any",
        "generate.seed": "any",
    },
}


# lm_merge's hyper-parameter fields, each named as the argument of the merge functions that take it.
_LM_MERGE_HPARAMS = ("weights", "lam", "density", "drop_rate", "combine", "t")


def _lm_merge_unused(config: Mapping) -> set[str]:
    """The fields a merge with `config["method"]` never reads (a static merge reads no `dam.*`
    field, and only a merge that draws (DARE) its seed; DAM reads no static hyper-parameter)."""
    method = config["method"]
    if method == "dam":
        return set(_LM_MERGE_HPARAMS)
    unused = set(_LM_MERGE_HPARAMS) - set(merging.hyperparameters(method))
    unused |= {f for f in flatten(config) if f.startswith("dam.")}
    return unused | (set() if merging.needs_rng(method) else {"seed"})


# Per kind, the fields a config's run never reads: a workdir's config may change them freely.
_UNUSED_FIELDS: dict[str | None, Callable[[Mapping], set[str]]] = {"lm_merge": _lm_merge_unused}


def unused_fields(config: Mapping) -> set[str]:
    """The dotted fields that `config` (a dict or a ConfigDict) never reads."""
    unused = _UNUSED_FIELDS.get(config.get("experiment"))
    return unused(config) if unused else set()


# Fields added after workdirs were written, with the value that reproduces what the code did
# before the field existed: a config.json without them reads as if it had these values.
_GROKKING_ADDED = {
    "model.matmul_precision": "default",  # JAX's default, which nothing overrode before
    "model.compute_dtype": "float32",
    "train.checkpoint_every_secs": 0.0,
    "train.require_accelerator": False,
    "train.num_processes": 1,
    "train.coordinator_address": "",
    "train.process_id": 0,
}
ADDED_FIELDS: dict[str | None, dict[str, Any]] = {
    None: _GROKKING_ADDED,
    "merge_compare": {f: v for f, v in _GROKKING_ADDED.items() if f not in NOT_IN_MERGE_COMPARE},
    "lm_merge": {
        "output_format": "safetensors",
        "gguf_type": "",
        "dam.matmul_precision": "default",
        "dam.special_tokens": False,
        "dam.num_devices": 1,
    },
    "lm_fuse": {
        "train.require_accelerator": False,
        "matmul_precision": "default",
        "data.special_tokens": False,
        "train.num_devices": 1,
    },
    "lm_study": {
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
}


def upgrade(stored: dict) -> dict:
    """A config.json dict with the fields added since it was written (ADDED_FIELDS) filled in."""
    out = json.loads(json.dumps(stored))
    for field, value in ADDED_FIELDS.get(stored.get("experiment"), {}).items():
        *parents, leaf = field.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node.setdefault(leaf, value)
    return out


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` (a dict or a ConfigDict) -> `{"a.b": 1}`."""
    out = {}
    for key, value in tree.items():
        if hasattr(value, "items"):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def lookup(config, field: str):
    for part in field.split("."):
        config = config[part]
    return config


def kind_of(config) -> str | None:
    """The config's kind (`config.experiment`, None for grokking training); refuses unknown ones."""
    kind = config.get("experiment")
    if kind not in RULES:
        raise UserError(
            f"config.experiment={kind!r}: must be one of "
            + ", ".join(repr(k) for k in RULES if k is not None)
        )
    return kind


def validate(config, devices: int | None = None) -> None:
    """Raises a one-line UserError for the first field (or field combination) out of range.

    `devices`: the local device count when the config is about to train (checks data
    parallelism), None when it only reads a workdir.
    """
    kind = kind_of(config)
    rules = RULES[kind]
    values = flatten(config)
    for field, value in values.items():
        if field not in rules:
            raise UserError(
                f"config.{field}={value!r}: not a field of {CONFIG_FILES[kind]} configs "
                "(every field needs a rule in fusion_jax/config_rules.py)"
            )
        if not rules[field].ok(value):
            raise UserError(f"config.{field}={value!r}: must be {rules[field].allowed}")
    for field, rule in rules.items():
        if rule.required and field not in values:
            raise UserError(f"config.{field} is missing: {CONFIG_FILES[kind]} configs need it")
    for cross_rule in CROSS_RULES[kind]:
        if problem := cross_rule(config, devices):
            field, allowed = problem
            raise UserError(f"config.{field}={lookup(config, field)!r}: must be {allowed}")
