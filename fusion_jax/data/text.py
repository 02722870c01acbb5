"""Local text files to fixed-length token arrays for language-model training and evaluation.

The pipeline is `expand_sources` (paths, directories, globs) -> `read_documents` (one document per
file, or fortune-style records) -> `split_documents` (deterministic, by document) -> a tokenizer
(data/tokenize.py) -> `pack` into windows of `seq_len + 1` tokens. Everything is plain numpy so
that a TFDS builder can sit on top of it. `bits_per_byte` turns a summed loss into the metric
that compares byte and BPE models.
"""

import glob
import itertools
import math
import os
from collections.abc import Iterable, Sequence

import numpy as np

from fusion_jax.errors import UserError

# fortune(6) writes a binary `.dat` index beside every text file; it is never text.
_SKIPPED_SUFFIXES = (".dat",)


def _is_text_candidate(path: str) -> bool:
    return os.path.isfile(path) and not path.endswith(_SKIPPED_SUFFIXES)


def _files_under(directory: str) -> list[str]:
    """All regular, non-symlink, non-`.dat` files below `directory`, sorted."""
    found = []
    for root, dirs, files in os.walk(directory):
        # Sorting `dirs` in place is not needed for the result (it is sorted at the end) but keeps
        # the walk itself reproducible.
        dirs.sort()
        for name in files:
            path = os.path.join(root, name)
            # Links are skipped because data folders use them as aliases (fortune's `.u8` links
            # point at the file beside them), which would count a document twice.
            if not os.path.islink(path) and _is_text_candidate(path):
                found.append(path)
    return sorted(found)


def _expand_item(item: str) -> list[str]:
    if os.path.isdir(item):
        return _files_under(item)
    if os.path.isfile(item):
        return [item] if _is_text_candidate(item) else []
    matches = []
    for match in sorted(glob.glob(item, recursive=True)):
        if os.path.isdir(match):
            matches.extend(_files_under(match))
        elif _is_text_candidate(match):
            matches.append(match)
    return sorted(matches)


def expand_sources(sources: str | Sequence[str]) -> list[str]:
    """Expands files, directories and globs into a list of text files.

    Args:
      sources: a comma-separated string, or a sequence of strings (taken whole, so paths may hold
        commas). Each item is a file, a directory (every regular file below it, recursively) or a
        `glob.glob(..., recursive=True)` pattern.

    Returns:
      File paths, sorted within each item, items in the given order. A file reached twice (also
      through a link) is kept once, at its first position, so no document can land in both splits.

    Raises:
      FileNotFoundError: an item matches no file (`.dat` files and, under directories, symlinks
        are skipped).
    """
    if isinstance(sources, str):
        items = [s.strip() for s in sources.split(",")]
    else:
        items = [str(s).strip() for s in sources]
    items = [s for s in items if s]
    if not items:
        raise UserError(f"no text sources given: {sources!r}")
    paths, seen = [], set()
    for item in items:
        matched = _expand_item(item)
        if not matched:
            raise FileNotFoundError(f"no text files match {item!r}")
        for path in matched:
            key = os.path.realpath(path)
            if key not in seen:
                seen.add(key)
                paths.append(path)
    return paths


def text_files(source: str) -> list[str]:
    """`expand_sources(source)`, refusing binary files (NUL bytes in their first 64 KiB) and a
    source whose files are all empty, by name: either would train on nothing, or on noise."""
    paths = expand_sources(source)
    for path in paths:
        with open(path, "rb") as f:
            if b"\0" in f.read(1 << 16):
                raise UserError(f"{path} is not a text file (it holds NUL bytes); name text only")
    if all(os.path.getsize(p) == 0 for p in paths):
        what = paths[0] if len(paths) == 1 else f"every file of {source!r}"
        raise UserError(f"{what} is empty: a text source needs text")
    return paths


def _split_records(text: str, separator: str) -> list[str]:
    """Splits at lines equal to `separator`; drops blank edge lines and empty records."""
    records, lines = [], []
    # A trailing "\r" is ignored so that files with Windows line ends split the same way; the
    # appended separator closes the last record.
    for line in text.split("\n") + [separator]:
        if line.rstrip("\r") != separator:
            lines.append(line)
            continue
        while lines and not lines[0].strip():
            lines.pop(0)
        while lines and not lines[-1].strip():
            lines.pop()
        if lines:
            records.append("\n".join(lines))
        lines = []
    return records


def read_documents(paths: Iterable[str], record_separator: str | None = None) -> list[str]:
    """Reads text files as UTF-8 (undecodable bytes become U+FFFD).

    Args:
      paths: files, as from `expand_sources`.
      record_separator: None makes each file one document; otherwise a file is split into records
        at lines that consist of exactly this string (fortune files use "%").

    Returns:
      The documents, in file order and, within a file, record order.
    """
    docs = []
    for path in paths:
        # newline="" keeps "\r\n" intact, so a document's bytes are the file's bytes.
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            text = f.read()
        if record_separator is None:
            docs.append(text)
        else:
            docs.extend(_split_records(text, record_separator))
    return docs


def split_documents(docs: list[str], seed: int, val_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic document-level train/validation split.

    The first `round(val_fraction * n)` documents of `default_rng(seed).permutation(n)` are
    validation: at least one when n >= 2 and val_fraction > 0, and at most n - 1 so that
    training keeps a document. Both splits keep the documents' original relative order.

    Returns:
      (train_docs, val_docs).
    """
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    n = len(docs)
    num_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        num_val = max(num_val, 1)
    num_val = min(num_val, max(n - 1, 0))
    perm = np.random.default_rng(seed).permutation(n)
    is_val = np.zeros(n, dtype=bool)
    is_val[perm[:num_val]] = True
    train = [d for d, v in zip(docs, is_val, strict=True) if not v]
    val = [d for d, v in zip(docs, is_val, strict=True) if v]
    return train, val


def pack(
    token_docs: list[list[int]], seq_len: int, eos_id: int | None, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Packs documents into overlapping windows for next-token prediction.

    The documents, each followed by `eos_id` (unless None), form one stream that is cut into
    windows of seq_len + 1 tokens at stride seq_len: consecutive windows share one token, so each
    token after the first is a target exactly once. The last window is padded with `pad_id`.

    Returns:
      tokens: int32 [N, seq_len + 1]; inputs are tokens[:, :-1], targets tokens[:, 1:].
      mask: float32 [N, seq_len]; 1 where the target tokens[:, t + 1] is real, 0 on padding.
    """
    if seq_len < 1:
        raise UserError(f"seq_len must be >= 1, got {seq_len!r}")
    suffix = [] if eos_id is None else [eos_id]
    length = sum(len(d) + len(suffix) for d in token_docs)
    if length < 2:
        raise UserError(
            f"no text to pack: the token stream has {length} token(s), at least 2 are needed"
        )
    stream = np.fromiter(
        itertools.chain.from_iterable(itertools.chain(d, suffix) for d in token_docs),
        dtype=np.int32,
        count=length,
    )
    num_windows = -(-(length - 1) // seq_len)  # ceil: every one of the length - 1 targets
    padded = np.full(num_windows * seq_len + 1, pad_id, dtype=np.int32)
    padded[:length] = stream
    index = np.arange(num_windows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    tokens = padded[index]
    # Masking by position rather than by value: pad_id may equal eos_id, a real target.
    mask = (index[:, 1:] < length).astype(np.float32)
    return tokens, mask


def load_text(
    sources: str | Sequence[str],
    tokenizer,
    seq_len: int,
    record_separator: str | None = None,
    special_tokens: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Files -> documents -> token ids (`tokenizer.encode_document`, or `encode` without special
    tokens; data/tokenize.py) -> `pack`.

    Returns:
      tokens: int32 [N, seq_len + 1] and mask: float32 [N, seq_len], as `pack` describes.
    """
    docs = read_documents(expand_sources(sources), record_separator)
    encode = tokenizer.encode_document if special_tokens else tokenizer.encode
    token_docs = [encode(d) for d in docs]
    return pack(token_docs, seq_len, tokenizer.eos_id, tokenizer.pad_id)


def bits_per_byte(nll_nats_sum: float, num_bytes: int) -> float:
    """Summed negative log-likelihood in nats -> bits per byte of text."""
    if num_bytes <= 0:
        raise UserError(f"num_bytes must be positive, got {num_bytes!r}")
    return float(nll_nats_sum) / math.log(2) / num_bytes
