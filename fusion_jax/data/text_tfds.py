"""TFDS builder that packs one text domain into fixed-length token windows (array_record, no
TensorFlow needed to read or write).

One builder config per domain and packing recipe; its name carries a hash of the recipe and of
the source files (paths, sizes, modification times), so a changed source or setting is packed
anew instead of silently reused. Documents are split train/holdout/validation by a fixed seed
(holdout: a slice of the training documents for choosing hyper-parameters, never validation).
"""

import dataclasses
import hashlib
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from fusion_jax.data import text, tokenize
from fusion_jax.errors import UserError

SPLITS = ("train", "holdout", "validation")


@dataclasses.dataclass
class WindowsConfig(tfds.core.BuilderConfig):
    files: tuple = ()
    record_separator: str | None = None
    tokenizer: str = "bytes"
    seq_len: int = 256
    split_seed: int = 0
    val_fraction: float = 0.1
    holdout_fraction: float = 0.1


def windows_config(domain: str, files, record_separator, tokenizer, seq_len, split_seed,
                   val_fraction, holdout_fraction) -> WindowsConfig:  # fmt: skip
    recipe = {
        "files": [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files],
        "record_separator": record_separator,
        "tokenizer": tokenizer,
        "tokenizer_sha": _file_sha(tokenizer),
        "seq_len": seq_len,
        "split_seed": split_seed,
        "val_fraction": val_fraction,
        "holdout_fraction": holdout_fraction,
    }
    if tokenizer != "bytes":
        # Documents carry the tokenizer's special tokens (`encode_document`); byte windows were
        # always built this way, so their caches keep their names.
        recipe["documents"] = "encode_document"
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return WindowsConfig(
        name=f"{domain}_{digest}",
        files=tuple(files),
        record_separator=record_separator,
        tokenizer=tokenizer,
        seq_len=seq_len,
        split_seed=split_seed,
        val_fraction=val_fraction,
        holdout_fraction=holdout_fraction,
    )


def _file_sha(spec: str) -> str | None:
    """sha256 of a tokenizer.json (or of the GGUF file whose metadata holds the tokenizer)."""
    path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def split_docs(docs, seed, val_fraction, holdout_fraction) -> dict[str, list[str]]:
    """Document-level split: validation first, then a holdout slice of the training documents."""
    train, val = text.split_documents(docs, seed, val_fraction)
    train, holdout = text.split_documents(train, seed + 1, holdout_fraction)
    return {"train": train, "holdout": holdout, "validation": val}


class TextWindows(tfds.core.GeneratorBasedBuilder):
    """Token windows `[seq_len + 1]` with target masks `[seq_len]` of one text domain."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Packed windows of local text documents."}

    def _info(self) -> tfds.core.DatasetInfo:
        n = self.builder_config.seq_len
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local text documents packed into fixed-length token windows.",
            features=tfds.features.FeaturesDict(
                {
                    "index": tfds.features.Scalar(dtype=np.int32),
                    "tokens": tfds.features.Tensor(shape=(n + 1,), dtype=np.int32),
                    "mask": tfds.features.Tensor(shape=(n,), dtype=np.float32),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Local files only: nothing to download.
        c = self.builder_config
        docs = text.read_documents(c.files, c.record_separator)
        parts = split_docs(docs, c.split_seed, c.val_fraction, c.holdout_fraction)
        for split in SPLITS:
            if not parts[split]:
                domain = c.name.rsplit("_", 1)[0]
                raise UserError(
                    f"domain {domain!r} has {len(docs)} document(s), none left for its {split} "
                    "split: give it 3 or more (files, for a name=glob domain)"
                )
        return {name: self._generate_examples(parts[name]) for name in SPLITS}

    def _generate_examples(self, docs):
        c = self.builder_config
        tokenizer = tokenize.load_tokenizer(c.tokenizer)
        eos = getattr(tokenizer, "eos_id", None)
        tokens, mask = text.pack(
            [tokenizer.encode_document(d) for d in docs], c.seq_len, eos, tokenizer.pad_id
        )
        for i in range(len(tokens)):
            yield i, {"index": i, "tokens": tokens[i], "mask": mask[i]}


def load_windows(config: WindowsConfig, data_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Prepares (once) and reads every split: {split: (tokens [N, L+1], mask [N, L])}, in order."""
    # TFDS logs the whole custom config (every file name) and draws progress bars: keep the
    # console to our own progress lines.
    tfds.disable_progress_bar()
    # The absl logger's own level is put back, not the verbosity it reports: with absl's
    # flags unparsed that is the effective level, and setting it would pin INFO off for good.
    absl_logger = logging.get_absl_logger()
    level = absl_logger.level
    absl_logger.setLevel(logging.converter.STANDARD_ERROR)
    try:
        builder = TextWindows(config=config, data_dir=data_dir, file_format="array_record")
        builder.download_and_prepare()
    finally:
        absl_logger.setLevel(level)
    out = {}
    for split in SPLITS:
        source = builder.as_data_source(split=split)
        records = source.__getitems__(range(len(source)))
        order = np.argsort([r["index"] for r in records])
        tokens = np.stack([records[i]["tokens"] for i in order]).astype(np.int32)
        mask = np.stack([records[i]["mask"] for i in order]).astype(np.float32)
        out[split] = (tokens, mask)
    return out
