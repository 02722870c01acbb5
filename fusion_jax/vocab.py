"""Merging models whose vocabularies differ by added tokens or padded rows (mergekit's
`tokenizer_source`).

With `tokenizer_source` "base", "union" or one input's path, the output's tokens are that
tokenizer's; "union" is the base's (else the first model's) with every other input's added tokens
appended, in input order. Each input's embedding and output-head rows are put in the output's
token order, matched by token string; rows past an input's tokenizer (padding) are dropped. A
token an input lacks takes a default row, as mergekit's PermutedEmbeddings sets it: the row of
the one input that has it, else the base's where the base has it, else the mean over the inputs
that have it (zeros if none has it). The merge then runs on these rows like on any tensor.
Tokenizers that differ in anything but their added tokens are refused, naming the first
difference.
"""

import copy
import dataclasses
import json
import os

import numpy as np
from tokenizers import Tokenizer

from fusion_jax import files
from fusion_jax import hf_checkpoint as hc
from fusion_jax.errors import UserError

SOURCES = ("base", "union")  # or the path of one input
# The Flax paths of the tensors with one row per token (hf_checkpoint's layouts).
VOCAB_PATHS = ("embed_tokens/embedding", "wte/embedding", "lm_head/kernel")


@dataclasses.dataclass
class Plan:
    """Where each output token's rows come from."""

    tokenizer: dict  # the output's tokenizer.json tree
    source: str  # the input whose tokenizer (and side files) the output takes
    rows: dict[str, np.ndarray]  # input -> `[V]`: its row of each output token, -1 if absent

    @property
    def size(self) -> int:
        return len(next(iter(self.rows.values())))


def _vocab(tree: dict) -> dict[str, int]:
    return Tokenizer.from_str(json.dumps(tree)).get_vocab(with_added_tokens=True)


def plan(models: list[str], base: str | None, source: str, num_rows: dict[str, int]) -> Plan:
    """The output vocabulary of `source` over the inputs (`num_rows`: each input's rows)."""
    paths = ([base] if base else []) + models
    # A LoRA adapter reads its base's tokens.
    trees = {p: hc.tokenizer_content(base if hc.is_adapter(p) else p) for p in paths}
    for path, tree in trees.items():
        if tree is None:
            raise UserError(f"{path} has no tokenizer.json: config.tokenizer_source needs each "
                            "input's tokenizer")  # fmt: skip
    first = base or models[0]
    strip = lambda tree: {k: v for k, v in tree.items() if k != "added_tokens"}  # noqa: E731
    for path in paths:
        if (where := hc.first_difference(strip(trees[first]), strip(trees[path]))) is not None:
            raise UserError(
                f"tokenizers differ beyond their added tokens, first at {where.lstrip('.')!r}: "
                f"{first} and {path}; config.tokenizer_source merges only vocabularies that "
                "differ by added tokens or padded rows"
            )
    if source == "union":
        out, tree = first, copy.deepcopy(trees[first])
        known = set(_vocab(tree))
        for path in paths:
            for token in trees[path].get("added_tokens", []):
                if token["content"] not in known:
                    tree["added_tokens"].append({**token, "id": len(known)})
                    known.add(token["content"])
    else:
        # An adapter's tokens are its base's (and its folder holds no model's side files).
        out = base if source == "base" or hc.is_adapter(source) else source
        tree = trees[out]
    vocab = _vocab(tree)
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise UserError(f"{out}: its tokenizer's ids are not 0..{len(vocab) - 1} without gaps")
    tokens = sorted(vocab, key=vocab.get)
    rows = {}
    for path in paths:
        own = _vocab(trees[path])
        ids = np.array([own.get(t, -1) for t in tokens], np.int64)
        rows[path] = np.where(ids < num_rows[path], ids, -1)
    return Plan(tree, out, rows)


def permute(p: Plan, tensors: dict[str, np.ndarray], base: str | None) -> dict[str, np.ndarray]:
    """Each input's `[rows, D]` tensor (`tensors`, by input) in the output's token order."""
    paths = list(tensors)
    present = np.stack([p.rows[path] >= 0 for path in paths])  # [inputs, V]
    first = next(iter(tensors.values()))
    wide = np.promote_types(first.dtype, np.float32)
    default = np.zeros((p.size, first.shape[1]), wide)
    counts = present.sum(0)
    for i, path in enumerate(paths):
        have = present[i]
        default[have] += tensors[path][p.rows[path][have]].astype(wide)
    default /= np.maximum(counts, 1)[:, None]
    if base is not None:  # tokens in several inputs, the base among them: the base's row
        take = (counts > 1) & present[paths.index(base)]
        default[take] = tensors[base][p.rows[base][take]]
    # (a token in one input only: the mean above is that input's row)
    out = {}
    for i, path in enumerate(paths):
        x = default.astype(tensors[path].dtype)  # each input keeps its own dtype
        have = present[i]
        x[have] = tensors[path][p.rows[path][have]]
        out[path] = x
    return out


def write_tokenizer(p: Plan, directory: str) -> None:
    """The output's tokenizer.json, and tokenizer_config.json's added tokens to match (when the
    copied side files hold one)."""
    files.write_json(os.path.join(directory, "tokenizer.json"), p.tokenizer)
    config_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config_path):
        config = hc.read_json(config_path)
        if "added_tokens_decoder" in config:
            config["added_tokens_decoder"] = {
                str(t["id"]): {k: v for k, v in t.items() if k != "id"}
                for t in p.tokenizer.get("added_tokens", [])
            }
            files.write_json(config_path, config)
