"""Grokking training configs (configs/baseline.py, configs/dyn_fusion.py): the kind None."""

import math
import re

import jax

from fusion_jax import models, schema
from fusion_jax.data import tasks as tasks_lib
from fusion_jax.models import fusion


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _task_list(v) -> bool:
    if not isinstance(v, str):
        return False
    names = schema.split_list(v)
    return bool(names) and len(set(names)) == len(names) and set(names) <= set(tasks_lib.TASKS)


TASKS = schema.Rule(
    _task_list, "distinct comma-separated task names from " + ", ".join(sorted(tasks_lib.TASKS))
)

# The grokking training configs (configs/baseline.py, configs/dyn_fusion.py).
GROKKING = {
    "name": schema.NAME,
    # A run key of reference/seed_runs.json for comparison tables, or None.
    "reference_run": schema.Rule(lambda v: v is None or isinstance(v, str), "None or a string"),
    "tasks": TASKS,
    "num_steps": schema.integer(1),
    "num_seeds": schema.integer(1),
    "seed": schema.SEED,
    "data.p": schema.integer(2),
    "data.frac_train": schema.FRACTION,
    "data.source": schema.choice("tfds", "algebra"),
    "data.tfds_dir": schema.NAME,
    "model.name": schema.choice(*models.MODELS),
    "model.num_layers": schema.integer(1),
    "model.dim": schema.integer(1),
    "model.num_heads": schema.integer(1),
    "model.mlp_ratio": schema.integer(1),
    "model.last_position_only": schema.FLAG,
    "model.freeze_experts": schema.FLAG,
    "model.matmul_precision": schema.MATMUL_PRECISION,
    "model.compute_dtype": schema.COMPUTE_DTYPE,
    # The fusion model's fields (configs/dyn_fusion.py).
    "model.num_experts": schema.integer(1, required=False),
    "model.fusion_context": schema.choice(*fusion.CONTEXTS, required=False),
    "model.gate_dim": schema.integer(1, required=False),
    "model.temperature": schema.number(0, low_open=True, required=False),
    "model.top_k": schema.integer(0, required=False),
    "model.balance_weight": schema.number(0, required=False),
    "model.entropy_weight": schema.number(required=False),
    "opt.learning_rate": schema.POSITIVE,
    "opt.b1": schema.number(0, 1, high_open=True),
    "opt.b2": schema.number(0, 1, high_open=True),
    "opt.eps": schema.POSITIVE,
    "opt.weight_decay": schema.NON_NEGATIVE,
    "opt.warmup_steps": schema.integer(0),
    "train.batch_size": schema.integer(1),
    "train.eval_every": schema.integer(1),
    "train.log_every": schema.integer(1),
    "train.checkpoint_every": schema.integer(1),
    "train.max_to_keep": schema.integer(1),
    "train.num_devices": schema.integer(0),
    "train.checkpoint_every_secs": schema.NON_NEGATIVE,
    "train.require_accelerator": schema.FLAG,
    "train.num_processes": schema.integer(0),
    "train.coordinator_address": schema.TEXT,
    "train.process_id": schema.integer(0),
    "eval.mode": schema.choice("exact", "sampled"),
    "eval.num_batches": schema.integer(1),
    "eval.batch_size": schema.integer(1),
    "eval.acc_threshold": schema.number(0, 1),
}
FUSION_MODEL_FIELDS = tuple(f for f, rule in GROKKING.items() if not rule.required)


def heads_divide_width(config, devices) -> schema.Problem:
    m = config.model
    if m.dim % m.num_heads:
        return "model.num_heads", f"a divisor of config.model.dim={m.dim}"
    return None


def _fusion_fields(config, devices) -> schema.Problem:
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


def prime_modulus(config, devices) -> schema.Problem:
    if "x_div_y" in schema.split_list(config.tasks) and not _is_prime(config.data.p):
        return (
            "data.p",
            "a prime for task x_div_y (b^(p-2) is the inverse of b mod p only when p is prime)",
        )
    return None


def train_pairs(config, name: str) -> tuple[int, int]:
    """(all pairs, training pairs) of task `name` under the config's p and frac_train."""
    n = tasks_lib.get_task(name, tasks_lib.size_for(name, config.data.p)).num_pairs
    return n, int(n * config.data.frac_train)


def both_splits(config, devices) -> schema.Problem:
    for name in schema.split_list(config.tasks):
        n, n_train = train_pairs(config, name)
        if not 1 <= n_train <= n - 1:
            return (
                "data.frac_train",
                f"a fraction that leaves training and validation pairs among the {n} pairs of "
                f"{name}",
            )
    return None


def _intervals(config, devices) -> schema.Problem:
    t = config.train
    if t.log_every % t.eval_every:
        return "train.log_every", f"a multiple of config.train.eval_every={t.eval_every}"
    if t.checkpoint_every % t.log_every:
        return "train.checkpoint_every", f"a multiple of config.train.log_every={t.log_every}"
    if config.num_steps % t.eval_every:
        return "num_steps", f"a multiple of config.train.eval_every={t.eval_every}"
    return None


def _devices(config, devices) -> schema.Problem:
    if devices is None:
        return None
    if config.train.num_devices > devices:
        return "train.num_devices", f"an integer in [0, {devices}] (the local devices; 0 = all)"
    # The batch is split over the devices of every process of a multi-process run.
    n = (config.train.num_devices or devices) * jax.process_count()
    for field in ("train.batch_size", "eval.batch_size"):
        if schema.lookup(config, field) % n:
            return (
                field,
                f"divisible by the {n} devices used for data parallelism (or set "
                "config.train.num_devices)",
            )
    return None


def _processes(config, devices) -> schema.Problem:
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

SPEC = schema.Spec(
    kind=None,
    config_files="configs/baseline.py, configs/dyn_fusion.py",
    rules=GROKKING,
    cross_rules=(heads_divide_width, _fusion_fields, prime_modulus, both_splits, _intervals,
                 _devices, _processes),
    safe_changes=SAFE_CHANGES,
    added_fields=GROKKING_ADDED,
    module="fusion_jax/specs/grokking.py",
)  # fmt: skip
