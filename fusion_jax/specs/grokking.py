"""Grokking training configs (configs/baseline.py, configs/dyn_fusion.py): the kind None."""

import math
import re

import jax

from fusion_jax import models
from fusion_jax.data import tasks as tasks_lib
from fusion_jax.models import fusion
from fusion_jax.schema import (
    COMPUTE_DTYPE,
    FLAG,
    FRACTION,
    MATMUL_PRECISION,
    NAME,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    TEXT,
    Problem,
    Rule,
    Spec,
    choice,
    integer,
    lookup,
    number,
    split_list,
)


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _task_list(v) -> bool:
    if not isinstance(v, str):
        return False
    names = split_list(v)
    return bool(names) and len(set(names)) == len(names) and set(names) <= set(tasks_lib.TASKS)


TASKS = Rule(
    _task_list, "distinct comma-separated task names from " + ", ".join(sorted(tasks_lib.TASKS))
)

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


def heads_divide_width(config, devices) -> Problem:
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


def prime_modulus(config, devices) -> Problem:
    if "x_div_y" in split_list(config.tasks) and not _is_prime(config.data.p):
        return (
            "data.p",
            "a prime for task x_div_y (b^(p-2) is the inverse of b mod p only when p is prime)",
        )
    return None


def train_pairs(config, name: str) -> tuple[int, int]:
    """(all pairs, training pairs) of task `name` under the config's p and frac_train."""
    n = tasks_lib.get_task(name, tasks_lib.size_for(name, config.data.p)).num_pairs
    return n, int(n * config.data.frac_train)


def both_splits(config, devices) -> Problem:
    for name in split_list(config.tasks):
        n, n_train = train_pairs(config, name)
        if not 1 <= n_train <= n - 1:
            return (
                "data.frac_train",
                f"a fraction that leaves training and validation pairs among the {n} pairs of "
                f"{name}",
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


# Fields a workdir's config may change, because they do not change results: "any" change,
# "increase" only (a longer run continues the shorter one exactly; a shorter one would leave
# results past its end), or "reorder" (the same comma-separated items in another order).
SAFE_CHANGES = {
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
}

# Fields added after workdirs were written, with the value that reproduces what the code did
# before the field existed: a config.json without them reads as if it had these values.
GROKKING_ADDED = {
    "model.matmul_precision": "default",  # JAX's default, which nothing overrode before
    "model.compute_dtype": "float32",
    "train.checkpoint_every_secs": 0.0,
    "train.require_accelerator": False,
    "train.num_processes": 1,
    "train.coordinator_address": "",
    "train.process_id": 0,
}

SPEC = Spec(
    kind=None,
    config_files="configs/baseline.py, configs/dyn_fusion.py",
    rules=GROKKING,
    cross_rules=(heads_divide_width, _fusion_fields, prime_modulus, both_splits, _intervals,
                 _devices, _processes),
    safe_changes=SAFE_CHANGES,
    added_fields=GROKKING_ADDED,
    module="fusion_jax/specs/grokking.py",
)  # fmt: skip
