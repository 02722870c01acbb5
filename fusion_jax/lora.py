"""LoRA adapters in PEFT's layout: read as models, and extracted from fine-tunes.

A PEFT adapter folder holds `adapter_config.json` (r, lora_alpha, use_rslora, fan_in_fan_out,
target_modules, ...) and `adapter_model.safetensors` with, per adapted module M (e.g.
`model.layers.0.self_attn.q_proj`), `base_model.model.M.lora_A.weight` `[r, in]` and
`base_model.model.M.lora_B.weight` `[out, r]`. The adapted weight of M is
W + s · B @ A, with s = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora; r is the
module's own rank, read from A), transposed where `fan_in_fan_out` (GPT-2's Conv1D stores
`[in, out]`). That is what peft's `merge_and_unload` computes; `scripts/check_peft_adapter.py`
(dev-only) checks it against peft itself.

* `LoraReader(adapter, base_reader)` reads an adapter as the fine-tuned model, tensor by tensor
  (and row block by row block): the interface of `hf_checkpoint.TensorReader`, so an adapter
  stands wherever lm_merge's streaming merge takes a model.
* `extract(base, fine_tune, out_dir, rank)` writes a rank-r adapter from a fine-tune's task
  vector by truncated SVD (B = U_r S_r, A = V_r^T, lora_alpha = r so s = 1).
"""

import math
import os

import numpy as np
from absl import logging
from safetensors.numpy import save_file

from fusion_jax import files
from fusion_jax import hf_checkpoint as hc
from fusion_jax.errors import UserError

CONFIG_FILE = hc.ADAPTER_CONFIG
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# GPT2LMHeadModel's module path of the blocks, which PEFT's keys carry.
GPT2_MODULE_PREFIX = "transformer."


is_adapter = hc.is_adapter


def _refuse(directory: str, why: str):
    raise UserError(f"{directory}: {why}; supported: LoRA adapters (PEFT) on linear layers")


class LoraReader:
    """The fine-tuned model of a LoRA adapter over `base` (a tensor reader of its base model),
    read lazily: each adapted tensor is the base's plus s · B @ A, computed in float32 and
    stored in the base's dtype (as a fine-tune merged into a full checkpoint would be)."""

    def __init__(self, directory: str, base):
        config = hc.read_json(os.path.join(directory, CONFIG_FILE), keys=("r", "lora_alpha"))
        if config.get("peft_type", "LORA") != "LORA":
            _refuse(directory, f"peft_type {config['peft_type']!r}")
        if config.get("use_dora"):
            _refuse(directory, "a DoRA adapter (use_dora) rescales the base's columns")
        if config.get("bias", "none") != "none" or config.get("lora_bias"):
            _refuse(directory, "the adapter trains biases")
        if config.get("alpha_pattern"):
            _refuse(directory, "per-module lora_alpha (alpha_pattern)")
        if config.get("modules_to_save"):
            _refuse(directory, f"whole modules saved beside it ({config['modules_to_save']})")
        self.directory, self.base, self.files = directory, base, base.files
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        alpha, rslora = float(config["lora_alpha"]), bool(config.get("use_rslora", False))
        factors = hc.read_safetensors(os.path.join(directory, WEIGHTS_FILE))  # small: whole
        self.factors = {}  # base tensor name -> (B * s [out, r], A [r, in]), float32
        for key in sorted(factors):
            if not key.endswith(".lora_A.weight"):
                a_key = key.removesuffix("lora_B.weight") + "lora_A.weight"
                if not key.endswith(".lora_B.weight") or a_key not in factors:
                    _refuse(directory, f"tensor {key!r} is not half of a LoRA factor pair")
                continue
            module = key.removesuffix(".lora_A.weight").removeprefix(PREFIX)
            b_key = key.removesuffix("lora_A.weight") + "lora_B.weight"
            if b_key not in factors:
                _refuse(directory, f"{key!r} has no {b_key!r}")
            a, b = factors[key].astype(np.float32), factors[b_key].astype(np.float32)
            name = module + ".weight"
            if name not in base.files:  # the original GPT-2 files name no `transformer.`
                name = name.removeprefix(GPT2_MODULE_PREFIX)
            if name not in base.files:
                raise UserError(f"{directory}: adapts {name!r}, which the base model lacks")
            r = a.shape[0]
            out_in = (b.shape[0], a.shape[1])
            want = base.shape_dtype(name)[0]
            if (out_in[::-1] if self.fan_in_fan_out else out_in) != tuple(want) or b.shape[1] != r:
                raise UserError(
                    f"{directory}: factors of {name!r} make a {list(out_in)} update; the base's "
                    f"tensor is {list(want)}"
                )
            scale = alpha / (math.sqrt(r) if rslora else r)
            self.factors[name] = (b * np.float32(scale), a)
        if not self.factors:
            _refuse(directory, "no LoRA factors in it")

    def shape_dtype(self, name: str):
        return self.base.shape_dtype(name)

    def get_dtype(self, name: str) -> np.dtype:
        return self.base.get_dtype(name)

    def _delta(self, name: str, rows: slice | None):
        b, a = self.factors[name]
        if self.fan_in_fan_out:  # stored [in, out]: rows of (B A)^T = A^T[rows] B^T
            return (a.T if rows is None else a.T[rows]) @ b.T
        return (b if rows is None else b[rows]) @ a

    def _adapted(self, name: str, x: np.ndarray, rows: slice | None) -> np.ndarray:
        if name not in self.factors:
            return x
        return (x.astype(np.float32) + self._delta(name, rows)).astype(x.dtype)

    def get(self, name: str) -> np.ndarray:
        return self._adapted(name, self.base.get(name), None)

    def get_rows(self, name: str, rows: slice) -> np.ndarray:
        return self._adapted(name, self.base.get_rows(name, rows), rows)


def open_input(path: str, base_reader):
    """The tensor reader of a merge input: a LoRA adapter over `base_reader` (there is one:
    `check_compatible` refuses an adapter without a base), or a checkpoint."""
    return LoraReader(path, base_reader) if is_adapter(path) else hc.open_tensors(path)


def check_compatible(paths: list[str], base: str | None, vocab_tensors: tuple[str, ...] = ()):
    """`hf_checkpoint.check_compatible` of the full checkpoints among `base` + `paths`, and each
    adapter's factors against `base`'s tensors. Returns its (config, config.json, names)."""
    full = ([base] if base else []) + [p for p in paths if not is_adapter(p)]
    adapters = [p for p in paths if is_adapter(p)]
    if adapters and not base:
        raise UserError(f"{adapters[0]} is a LoRA adapter: give its base model as config.base")
    out = hc.check_compatible(full, vocab_tensors)
    if adapters:
        reader = hc.open_tensors(base)
        for path in adapters:
            LoraReader(path, reader)
    return out


# The 2-D tensors that are not linear layers: embeddings, positions, the output head.
NOT_LINEAR = {"embed_tokens", "wte", "wpe", "lm_head"}


def extract(base: str, fine_tune: str, out_dir: str, rank: int) -> dict:
    """Writes the rank-`rank` LoRA adapter (PEFT's layout) of `fine_tune` against `base`: per
    linear layer (not the embeddings or the output head), the truncated SVD of its task vector.
    Returns a summary: the adapted tensors, and per tensor the fraction of the task vector's
    squared norm the adapter keeps; the tensors that differ but no adapter can carry (norms,
    embeddings) are counted and named in the log."""
    config, _, names = hc.parameter_names(base)
    hc.check_compatible([base, fine_tune])
    base_reader, tuned = hc.open_tensors(base), hc.open_tensors(fine_tune)
    gpt2 = config.family == "gpt2"  # Conv1D weights, stored [in, out]: fan_in_fan_out
    tensors, kept, modules, left_out = {}, {}, set(), []
    for name, _ in sorted(names.values()):
        delta = tuned.get(name).astype(np.float32) - base_reader.get(name).astype(np.float32)
        if delta.ndim != 2 or name.split(".")[-2] in NOT_LINEAR:
            if np.any(delta):
                left_out.append(name)
            continue
        delta = delta.T if gpt2 else delta  # [out, in]
        u, s, vt = np.linalg.svd(delta, full_matrices=False)
        r = min(rank, len(s))
        # Rank `rank` everywhere (zero rows past a matrix's smaller side): the config's r is
        # every module's, and the scale lora_alpha / r must be 1 for each.
        a, b = np.zeros((rank, delta.shape[1]), np.float32), np.zeros((delta.shape[0], rank),
                                                                       np.float32)  # fmt: skip
        a[:r], b[:, :r] = vt[:r], u[:, :r] * s[:r]
        module = name.removesuffix(".weight")
        if gpt2 and not module.startswith(GPT2_MODULE_PREFIX):
            module = GPT2_MODULE_PREFIX + module
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b
        total = float(np.sum(s.astype(np.float64) ** 2))
        kept[name] = 1.0 if total == 0 else float(np.sum(s[:r].astype(np.float64) ** 2) / total)
        modules.add(module.rsplit(".", 1)[-1])
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    files.write_json(os.path.join(out_dir, CONFIG_FILE), {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
        "use_rslora": False, "use_dora": False, "fan_in_fan_out": gpt2,
        "bias": "none", "lora_dropout": 0.0, "target_modules": sorted(modules),
        "base_model_name_or_path": os.path.abspath(base), "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
    })  # fmt: skip
    if left_out:
        logging.warning("[extract_lora] %s: %d tensors differ from the base but are not linear "
                        "layers, so the adapter leaves them out: %s", fine_tune, len(left_out),
                        ", ".join(left_out[:5]))  # fmt: skip
    return {"rank": rank, "tensors": len(kept), "energy_kept": kept, "left_out": left_out}
