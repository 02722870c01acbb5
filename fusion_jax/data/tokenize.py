"""Tokenizers for the language models: bytes, or a Hugging Face `tokenizers` tokenizer read from
a tokenizer.json (or a folder holding one) or from a GGUF file's metadata.

Bytes are the default tokens: no tokenizer to train, and bits per byte compares directly across
domains. `load_tokenizer(spec)` gives either.
"""

import json
import os
from collections.abc import Iterable

import numpy as np

from fusion_jax import gguf_checkpoint
from fusion_jax.errors import UserError


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; the special tokens follow them."""

    vocab_size = 259
    pad_id = 256
    bos_id = 257
    eos_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    # Byte-level models are trained from scratch here: documents are separated by `pack`'s
    # end-of-sequence token only, and a prompt is its bytes.
    encode_document = encode_prompt = encode

    def decode(self, ids: Iterable[int]) -> str:
        """Drops special (and any out-of-range) ids; invalid UTF-8 becomes U+FFFD."""
        data = bytes(i for i in map(int, ids) if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        """`[V]` UTF-8 bytes that each token id stands for: 1 for a byte, 0 for a special."""
        return (np.arange(self.vocab_size) < 256).astype(np.int32)


def _config_eos_token(directory: str) -> str | None:
    """The "eos_token" of a tokenizer_config.json in `directory`, if there is one."""
    config_path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(config_path):
        return None
    with open(config_path, encoding="utf-8") as f:
        eos = json.load(f).get("eos_token")
    # transformers writes either the plain string or a serialised AddedToken.
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer read from a local tokenizer.json.

    Attributes:
      vocab_size: including added tokens (the model's embedding rows must cover every id).
      eos_id: id of the end-of-sequence token, or None when the tokenizer names none.
      pad_id: eos_id (padding is masked out of the loss), or 0 without an eos token.
    """

    def __init__(self, path: str, eos_token: str | None = None):
        from tokenizers import Tokenizer  # Imported here: the byte tokenizer does not need it.

        if gguf_checkpoint.is_gguf(path):  # the tokenizer its metadata describes
            source = gguf_checkpoint.open_gguf(path)
            self._tokenizer = source.tokenizer()
            eos_token = eos_token or source.special_token("eos_token_id")
        else:
            file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
            if not os.path.isfile(file):
                raise FileNotFoundError(f"no tokenizer.json at {path!r}")
            self._tokenizer = Tokenizer.from_file(file)
            if eos_token is None:
                eos_token = _config_eos_token(os.path.dirname(os.path.abspath(file)))
        self.vocab_size = self._tokenizer.get_vocab_size()
        self.eos_id = None
        if eos_token is not None:
            self.eos_id = self._tokenizer.token_to_id(eos_token)
            if self.eos_id is None:
                raise UserError(f"eos token {eos_token!r} is not in the vocabulary of {path!r}")
        self.pad_id = 0 if self.eos_id is None else self.eos_id

    def encode(self, text: str) -> list[int]:
        """The text's own tokens, without special tokens."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt as transformers' tokenizer gives it: with the special tokens its
        post-processor adds (Llama's begin-of-sequence token; none for GPT-2 or Qwen2)."""
        return self._tokenizer.encode(text).ids

    def encode_document(self, text: str) -> list[int]:
        """A training document as `encode_prompt` gives it, so that pretrained experts see text
        as they were trained on it, less an end-of-sequence token the post-processor appends
        (`add_eos_token`): `pack` closes every document with exactly one."""
        encoding = self._tokenizer.encode(text)
        ids = encoding.ids
        if ids and ids[-1] == self.eos_id and encoding.special_tokens_mask[-1]:
            ids = ids[:-1]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Drops special tokens, as `ByteTokenizer.decode` does."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_bytes(self) -> np.ndarray:
        """`[V]` UTF-8 bytes that each token id stands for (0 for special tokens)."""
        return gguf_checkpoint.token_bytes(self._tokenizer)


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """ "bytes" gives `ByteTokenizer()`; anything else is a tokenizer.json file or its folder."""
    if spec == "bytes":
        return ByteTokenizer()
    return HFTokenizer(spec)
