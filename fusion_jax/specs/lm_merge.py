"""lm_merge configs (configs/lm_merge.py): the kind "lm_merge"."""

import math
import os
from collections.abc import Mapping

from fusion_jax import files, gguf_checkpoint, hf_checkpoint, lora, merging, mesh, schema, vocab
from fusion_jax.data import text
from fusion_jax.merging import dam
from fusion_jax.specs import checkpoints


def _shard_size(v) -> bool:
    if schema.is_int(v):
        return v >= 1
    try:
        return isinstance(v, str) and hf_checkpoint.parse_size(v) >= 1
    except ValueError:
        return False


def _weights(v) -> bool:
    try:
        return isinstance(v, str) and all(math.isfinite(float(w)) for w in schema.split_list(v))
    except ValueError:
        return False


def _value(text: str):
    """An override's value: an int, else a float, else the word (combine's "ties")."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_overrides(text: str) -> list[tuple[str, dict]]:
    """`config.overrides`, e.g. "self_attn:t=0.3;mlp:t=0.7,lam=0.5", as [(filter, {field:
    value})] in order. A tensor takes the values of the first filter that is a substring of
    its Hugging Face name (mergekit's `filter`), the config's fields elsewhere. Raises
    ValueError naming the entry that is not `FILTER:field=value[,field=value]`."""
    out = []
    for entry in (e.strip() for e in text.split(";")):
        if not entry:
            continue
        where, _, settings = entry.partition(":")
        pairs = [item.partition("=") for item in settings.split(",")]
        if not where.strip() or not all(eq and name.strip() and v.strip() for name, eq, v in pairs):
            raise ValueError(f"{entry!r} is not FILTER:field=value[,field=value]")
        out.append((where.strip(), {n.strip(): _value(v.strip()) for n, _, v in pairs}))
    return out


def _overrides_syntax(v) -> bool:
    try:
        return isinstance(v, str) and (parse_overrides(v) is not None)
    except ValueError:
        return False


DAM_GROUPS = dam.GROUPS

LM_MERGE = {
    "experiment": schema.choice("lm_merge"),
    "base": schema.Rule(
        lambda v: isinstance(v, str) and (v == "" or checkpoints.is_checkpoint(v)),
        "'' or an existing checkpoint directory or .gguf file",
    ),
    "models": checkpoints.directories(1),
    # Read when checked, so a method registered in merging.MERGES after import is offered too.
    "method": schema.Rule(
        lambda v: v == "dam" or v in merging.MERGES,
        "one of " + ", ".join(map(repr, [*merging.MERGES, "dam"])),
    ),
    "weights": schema.Rule(_weights, "'' (uniform) or comma-separated numbers, one per model"),
    "lam": schema.number(),
    "density": schema.number(0, 1, low_open=True),
    "drop_rate": schema.number(0, 1, high_open=True),
    "combine": schema.choice("linear", "ties"),
    "t": schema.number(0, 1),
    "gamma": schema.number(0, 1, high_open=True),
    "epsilon": schema.number(0, 1, high_open=True),
    "select_topk": schema.number(0, 1, low_open=True),
    "max_iter": schema.integer(1),
    "tol": schema.POSITIVE,
    "overrides": schema.Rule(
        _overrides_syntax,
        "'' or FILTER:field=value[,field=value] entries separated by ';' "
        "(e.g. 'self_attn:t=0.3;mlp:t=0.7')",
    ),
    "lora_rank": schema.integer(1),
    "tokenizer_source": schema.Rule(
        lambda v: isinstance(v, str) and (v in ("", *vocab.SOURCES) or os.path.exists(v)),
        "'', 'base', 'union' or the path of one of the inputs",
    ),
    "seed": schema.SEED,
    "dtype": schema.choice("", *hf_checkpoint.DTYPES),
    "max_shard_size": schema.Rule(_shard_size, "a size like '2GB', '500MB', '100KB' or bytes >= 1"),
    "output_format": schema.choice("safetensors", "gguf", "both"),
    "gguf_type": schema.choice("", *gguf_checkpoint.WRITE_TYPES),
    "dam.data": schema.TEXT,
    "dam.tokenizer": checkpoints.TOKENIZER,
    "dam.special_tokens": schema.FLAG,
    "dam.seq_len": schema.integer(1),
    "dam.batch_size": schema.integer(1),
    "dam.num_devices": schema.integer(0),
    "dam.mesh": mesh.MESH,
    "dam.num_steps": schema.integer(0),
    "dam.learning_rate": schema.POSITIVE,
    "dam.temperature": schema.POSITIVE,
    "dam.similarity": schema.choice(*merging.SIMILARITIES),
    "dam.similarity_weight": schema.NON_NEGATIVE,
    "dam.l1_weight": schema.NON_NEGATIVE,
    "dam.l2_weight": schema.NON_NEGATIVE,
    "dam.nonlinearity": schema.choice(*merging.NONLINEARITIES),
    "dam.train": schema.Rule(
        lambda v: (
            isinstance(v, str)
            and bool(schema.split_list(v))
            and set(schema.split_list(v)) <= set(DAM_GROUPS)
        ),
        "comma-separated groups from " + ", ".join(DAM_GROUPS),
    ),
    "dam.compute_dtype": schema.COMPUTE_DTYPE,
    "dam.matmul_precision": schema.MATMUL_PRECISION,
    "dam.log_every": schema.integer(1),
    "dam.checkpoint_every": schema.integer(1),
}


def _lm_merge_inputs(config, devices) -> schema.Problem:
    n = len(schema.split_list(config.models))
    hparams = merging.hyperparameters(config.method) if config.method in merging.MERGES else ()
    if config.method in merging.MERGES and merging.needs_base(config.method) and not config.base:
        return "base", f"a checkpoint directory for config.method={config.method!r}"
    if config.method == "slerp" and n != 2:
        return "models", "exactly 2 checkpoint directories for config.method='slerp'"
    weights = schema.split_list(config.weights)
    if "weights" in hparams and len(weights) not in (0, n):
        return "weights", f"'' or {n} comma-separated numbers (one per model)"
    if math.fsum(float(w) for w in weights) == 0 and config.weights.strip():
        return "weights", "numbers whose sum is not 0 (they are divided by their sum)"
    source = config.tokenizer_source
    if source and config.method == "dam":
        return "tokenizer_source", "'' for config.method='dam' (it runs the models whole)"
    if source == "base" and not config.base:
        return "tokenizer_source", "'union' or an input's path when config.base is ''"
    if source and source not in (*vocab.SOURCES, config.base, *schema.split_list(config.models)):
        return "tokenizer_source", "'', 'base', 'union' or the path of one of the inputs"
    for _, values in parse_overrides(config.overrides):
        for field, value in values.items():
            fields = [h for h in hparams if h in LM_MERGE and h != "weights"]
            if field not in fields:
                scalars = ", ".join(fields) or "it has none"
                return "overrides", (
                    f"fields of config.method={config.method!r} per tensor ({scalars}), "
                    f"not {field!r}"
                )
            if not LM_MERGE[field].ok(value):
                allowed = LM_MERGE[field].allowed
                return "overrides", f"{field} values that are {allowed} (got {field}={value!r})"
    sources = [s for s in config.dam.data.split(";") if s.strip()]
    if config.method == "dam" and len(sources) != n:
        return "dam.data", f"{n} text sources separated by ';' (one per model)"
    if config.method == "dam" and devices is not None:  # about to train: read before binding
        for source in sources:
            text.text_files(source)
    return None


def _lm_merge_checkpoints(config, devices) -> schema.Problem:
    """`checkpoints.compatible_checkpoints` where LoRA adapters may stand as models: they need
    their base (config.base) and a static merge (DAM runs the experts whole)."""
    models = schema.split_list(config.models)
    adapters = [m for m in models if lora.is_adapter(m)]
    if adapters and config.method == "dam":
        return "models", (f"full checkpoints ({adapters[0]} is a LoRA adapter, which the "
                          "static merges take)")  # fmt: skip
    if adapters and not config.base:
        return "base", f"the base model of the LoRA adapter {adapters[0]}"
    if devices is not None:  # as compatible_checkpoints: before the workdir is bound
        per_token = vocab.VOCAB_PATHS if config.tokenizer_source else ()
        lora.check_compatible(models, config.base or None, per_token)
    return None


def _lm_merge_outputs(config, workdir: str) -> None:
    # The folders lm_merge replaces: merged/, and merged.partial/ and merged.old/ beside it.
    inputs = [p for p in [config.base, *schema.split_list(config.models)] if p]
    for suffix in ("", ".partial", ".old"):
        files.check_apart(os.path.join(workdir, "merged" + suffix), inputs, workdir)


# lm_merge's hyper-parameter fields, each named as the argument of the merge functions that take it.
_LM_MERGE_HPARAMS = (
    "weights", "lam", "density", "drop_rate", "combine", "t", "gamma", "epsilon", "select_topk",
    "max_iter", "tol", "overrides",
)  # fmt: skip


def _lm_merge_unused(config: Mapping) -> set[str]:
    """The fields a merge with `config["method"]` never reads (a static merge reads no `dam.*`
    field, and only a merge that draws (DARE) its seed; DAM reads no static hyper-parameter)."""
    method = config["method"]
    if method == "dam":
        return set(_LM_MERGE_HPARAMS) | {"lora_rank", "tokenizer_source"}
    unused = set(_LM_MERGE_HPARAMS) - set(merging.hyperparameters(method)) - {"overrides"}
    unused |= {f for f in schema.flatten(config) if f.startswith("dam.")}
    unused |= {"lora_rank"}  # read by --mode=extract_lora only, whose outputs say their rank
    return unused | (set() if merging.needs_rng(method) else {"seed"})


SPEC = schema.Spec(
    kind="lm_merge",
    config_files="configs/lm_merge.py",
    rules=LM_MERGE,
    cross_rules=(_lm_merge_inputs, _lm_merge_checkpoints,
                 checkpoints.within_positions("dam.seq_len"),
                 checkpoints.data_parallel("dam", lambda config: config.method == "dam")),
    safe_changes={
        "max_shard_size": "any",
        "dam.log_every": "any",
        "dam.checkpoint_every": "any",
        "dam.num_devices": "any",  # the same sums, added in another order
        "dam.mesh": "any",  # a resume reshards the checkpoint onto the new mesh
    },
    added_fields={
        "output_format": "safetensors",
        "gguf_type": "",
        "dam.matmul_precision": "default",
        "dam.special_tokens": False,
        "dam.num_devices": 1,
        "dam.mesh": "auto",
        # Hyper-parameters of merges added later; no earlier method reads them.
        "gamma": 0.01,
        "epsilon": 0.15,
        "select_topk": 1.0,
        "max_iter": 10,
        "tol": 1e-5,
        "overrides": "",
        "lora_rank": 16,
        "tokenizer_source": "",
    },
    unused=_lm_merge_unused,
    outputs=_lm_merge_outputs,
    module="fusion_jax/specs/lm_merge.py",
)  # fmt: skip
