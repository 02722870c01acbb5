"""Rules shared by the configs that read Hugging Face or GGUF checkpoints (lm_merge, lm_fuse)."""

import os
from collections.abc import Callable
from typing import Any

from fusion_jax import hf_checkpoint, mesh, schema
from fusion_jax.models.lm import LMConfig


def is_checkpoint(path: str) -> bool:
    """An existing checkpoint directory or GGUF file."""
    return os.path.isdir(path) or (path.endswith(".gguf") and os.path.isfile(path))


def directories(minimum: int) -> schema.Rule:
    def ok(v):
        paths = schema.split_list(v) if isinstance(v, str) else []
        return len(paths) >= minimum and all(map(is_checkpoint, paths))

    return schema.Rule(
        ok, f"{minimum} or more existing checkpoint directories or .gguf files, comma-separated"
    )


def _tokenizer(v) -> bool:
    return isinstance(v, str) and (v in ("model", "bytes") or os.path.isfile(v))


TOKENIZER = schema.Rule(_tokenizer, "'model', 'bytes' or an existing tokenizer.json file")


def within_positions(seq_len_field: str):
    """A cross rule: windows of `seq_len_field` tokens fit GPT-2's learned positions (past them
    its position embeddings do not exist, and the outputs are NaN; RoPE models take any)."""

    def rule(config, devices) -> schema.Problem:
        del devices
        if seq_len_field.startswith("dam.") and config.method != "dam":
            return None
        first = schema.split_list(config.models)[0]
        lm_config = LMConfig.from_hf(hf_checkpoint.read_config(first))
        if lm_config.family == "gpt2" and schema.lookup(config, seq_len_field) > lm_config.max_len:
            return seq_len_field, (
                f"at most the models' n_positions={lm_config.max_len} (GPT-2 learns one "
                "embedding per position)"
            )
        return None

    return rule


def compatible_checkpoints(config, devices) -> schema.Problem:
    # Before the workdir is bound (`devices` given: about to run), so that a run refused for
    # mismatched inputs leaves no workdir behind and the fixed command may reuse it. The error
    # is check_compatible's own line, naming the first field or tensor that differs.
    if devices is not None:
        base = [config.base] if config.get("base") else []
        hf_checkpoint.check_compatible(base + schema.split_list(config.models))
    return None


def data_parallel(section: str, only_if: Callable[[Any], bool] = lambda config: True):
    """Cross rule: `<section>.num_devices` within the local devices and dividing
    `<section>.batch_size`; or, where the section has an explicit `mesh`, its devices within
    the local ones and its data axis dividing the batch."""

    def rule(config, devices) -> schema.Problem:
        if devices is None or not only_if(config):
            return None
        spec = schema.lookup(config, f"{section}.mesh") if "mesh" in config[section] else "auto"
        if spec != "auto":
            shape = mesh.sizes(spec, devices)
            if shape["data"] * shape["model"] > devices:
                return f"{section}.mesh", f"at most {devices} devices in all (the local devices)"
            if schema.lookup(config, f"{section}.batch_size") % shape["data"]:
                return (
                    f"{section}.batch_size",
                    f"divisible by the mesh's data axis ({shape['data']}, config.{section}.mesh)",
                )
            return None
        wanted = schema.lookup(config, f"{section}.num_devices")
        if wanted > devices:
            return (
                f"{section}.num_devices",
                f"an integer in [0, {devices}] (the local devices; 0 = all)",
            )
        n = wanted or devices
        if schema.lookup(config, f"{section}.batch_size") % n:
            return (
                f"{section}.batch_size",
                f"divisible by the {n} devices used for data parallelism (or set "
                f"config.{section}.num_devices)",
            )
        return None

    return rule
