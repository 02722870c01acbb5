"""GGUF files (llama.cpp's format) as checkpoints: read, dequantize, build the tokenizer, write.

A `.gguf` path is accepted wherever a Hugging Face checkpoint directory is: `GGUFFile` shows the
file the way fusion_jax/hf_checkpoint.py shows a folder.
* `hf_config()`: a config.json dict made from the `<architecture>.*` metadata;
* tensors under their Hugging Face names in torch layout (`[out, in]`, as the `gguf` reader
  already hands them over), dequantized to float32 by `gguf.quants.dequantize`, with
  llama.cpp's rotary row permutation of the query and key weights undone;
* `tokenizer()`: a `tokenizers.Tokenizer` built from `tokenizer.ggml.*`, plus the
  tokenizer_config.json / generation_config.json a transformers folder carries.
`write_gguf` goes the other way: a checkpoint streamed tensor by tensor into a GGUF file in
F32, F16, BF16 or Q8_0, through `gguf.GGUFWriter` and `gguf.quants.quantize`.

Facts matched (read from llama.cpp's convert_hf_to_gguf.py and gguf-py, and transformers' GGUF
loader): tensor names (`token_embd`, `blk.N.attn_q`, ..., `output`, absent when the head is
tied); Q and K rows permuted per head as `reshape(heads, 2, rows / heads / 2, in)` with the two
middle axes swapped (K by its key/value head count); 1-D tensors kept in F32.
"""

import dataclasses
import functools
import json
import os
import re

import gguf
import numpy as np

from fusion_jax import errors
from fusion_jax.errors import UserError

SUFFIX = ".gguf"
Q = gguf.GGMLQuantizationType
# Quant types the `gguf` package dequantizes (F32/F16 directly, the rest by its block codecs).
READABLE_TYPES = tuple(
    sorted([Q.F32, Q.F16, *gguf.quants._type_traits], key=lambda q: q.value)  # noqa: SLF001
)
# Output types of `write_gguf`: name -> (type of 2-D weights, type of 1-D tensors).
WRITE_TYPES = {
    "float32": (Q.F32, Q.F32),
    "float16": (Q.F16, Q.F32),
    "bfloat16": (Q.BF16, Q.F32),
    "q8_0": (Q.Q8_0, Q.F32),
}
_FILE_TYPES = {
    "float32": gguf.LlamaFileType.ALL_F32,
    "float16": gguf.LlamaFileType.MOSTLY_F16,
    "bfloat16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
ARCHITECTURES = ("llama",)
# transformers' names of the special tokens and the `tokenizer.ggml.*` keys of their ids.
_SPECIAL_IDS = (
    ("bos_token", "bos_token_id"),
    ("eos_token", "eos_token_id"),
    ("unk_token", "unknown_token_id"),
    ("pad_token", "padding_token_id"),
)

# Per-layer tensors: GGUF name inside `blk.N.` -> Hugging Face name inside `model.layers.N.`.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_GGUF_NAME = re.compile(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


def is_gguf(path) -> bool:
    return isinstance(path, str) and path.endswith(SUFFIX)


def hf_name(name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor name, or None for one outside the table."""
    m = _GGUF_NAME.fullmatch(name)
    if not m:
        return None
    layer, base, kind = m.groups()
    if layer is None:
        return f"{_GLOBAL_NAMES[base]}.{kind}" if base in _GLOBAL_NAMES else None
    return f"model.layers.{layer}.{_LAYER_NAMES[base]}.{kind}" if base in _LAYER_NAMES else None


def gguf_name(name: str) -> str:
    """The GGUF name of a Hugging Face tensor name (the inverse of `hf_name`)."""
    m = _HF_LAYER.fullmatch(name)
    if m:
        layer, inner, kind = m.groups()
        inverse = {v: k for k, v in _LAYER_NAMES.items()}
        if inner in inverse:
            return f"blk.{layer}.{inverse[inner]}.{kind}"
    stem, _, kind = name.rpartition(".")
    for g, h in _GLOBAL_NAMES.items():
        if stem == h:
            return f"{g}.{kind}"
    raise UserError(f"tensor {name!r} has no GGUF name (supported architectures: llama)")


def rope_rows_to_hf(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's permutation of a query/key weight's rows (`[out, in]` or `[out]`)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_rows_to_gguf(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's permutation of a query/key weight's rows (the inverse of `rope_rows_to_hf`)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclasses.dataclass(frozen=True)
class _Tensor:
    name: str  # the GGUF name
    qtype: Q
    shape: tuple  # NumPy order: [out, in] for a linear layer
    data: np.ndarray  # memory-mapped, still quantized


class GGUFFile:
    """One GGUF model file, read lazily (the `gguf` reader memory-maps it)."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file not found: {path}")
        self.path = path
        try:
            self._reader = gguf.GGUFReader(path)
        except Exception as e:  # a truncated or foreign file: gguf raises ValueError and others
            raise UserError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from e
        self.architecture = self.field("general.architecture")
        if self.architecture not in ARCHITECTURES:
            raise UserError(
                f"{path}: unsupported GGUF architecture {self.architecture!r}; supported: "
                + ", ".join(ARCHITECTURES)
            )
        self.tensors, unknown = {}, []
        for t in self._reader.tensors:
            name = hf_name(t.name)
            if name is None:
                unknown.append(t.name)
                continue
            if t.tensor_type not in READABLE_TYPES:
                raise UserError(
                    f"{path}: tensor {t.name} has quant type {t.tensor_type.name}, which cannot "
                    "be dequantized; supported: " + ", ".join(q.name for q in READABLE_TYPES)
                )
            shape = tuple(int(n) for n in reversed(t.shape))
            self.tensors[name] = _Tensor(t.name, t.tensor_type, shape, t.data)
        if unknown:
            raise UserError(f"{path}: unsupported tensors {unknown[:3]} (llama tensors only)")

    def field(self, key: str, default=None):
        f = self._reader.fields.get(key)
        return default if f is None else f.contents()

    def arch(self, key: str, default=None):
        return self.field(f"{self.architecture}.{key}", default)

    # -- the model ---------------------------------------------------------------------------

    def hf_config(self) -> dict:
        """config.json of the model, as transformers writes it for a LlamaForCausalLM."""
        heads = self.arch("attention.head_count")
        dim = self.arch("embedding_length")
        scaling = self.arch("rope.scaling.type", "none")
        names = {t.name for t in self._reader.tensors}
        if scaling != "none" or "rope_freqs.weight" in names:
            raise UserError(f"{self.path}: unsupported rope scaling {scaling!r}; supported: none")
        vocab = self.arch("vocab_size") or len(self.field("tokenizer.ggml.tokens", ()))
        config = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": dim,
            "intermediate_size": self.arch("feed_forward_length"),
            "num_hidden_layers": self.arch("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self.arch("attention.head_count_kv", heads),
            "head_dim": self.arch("attention.key_length", dim // heads),
            "max_position_embeddings": self.arch("context_length"),
            "rms_norm_eps": _short(self.arch("attention.layer_norm_rms_epsilon")),
            "rope_theta": _short(self.arch("rope.freq_base", 10000.0)),
            "vocab_size": vocab,
            "tie_word_embeddings": "lm_head.weight" not in self.tensors,
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self.tensors,
            "mlp_bias": False,
            "torch_dtype": "float32",
        }
        for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
            value = self.field(f"tokenizer.ggml.{key}")
            if value is not None:
                config[key.replace("padding", "pad")] = int(value)
        if config["head_dim"] != self.arch("rope.dimension_count", config["head_dim"]):
            raise UserError(f"{self.path}: partial rotary embeddings are not supported")
        return config

    # The reader interface of hf_checkpoint.TensorReader: names, shapes, dequantized tensors.

    @property
    def files(self) -> dict[str, str]:
        return dict.fromkeys(self.tensors, self.path)

    def quant_type(self, name: str) -> str:
        return self.tensors[name].qtype.name

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        return self.tensors[name].shape, "F32"

    def get_dtype(self, name: str) -> np.dtype:
        return np.dtype(np.float32)

    def get(self, name: str) -> np.ndarray:
        """The float32 tensor of a Hugging Face name, in torch layout."""
        t = self.tensors[name]
        x = np.array(gguf.quants.dequantize(t.data, t.qtype), np.float32).reshape(t.shape)
        heads = {
            "self_attn.q_proj": self.arch("attention.head_count"),
            "self_attn.k_proj": self.arch("attention.head_count_kv"),
        }
        for module, n in heads.items():
            if f".{module}." in name:
                x = rope_rows_to_hf(x, n)
        return x

    # -- the tokenizer -----------------------------------------------------------------------

    def tokenizer(self):
        """The `tokenizers.Tokenizer` this file describes."""
        return build_tokenizer(self._tokenizer_fields(), self.path)

    def _tokenizer_fields(self) -> dict:
        keys = ("model", "pre", "tokens", "token_type", "merges", "scores", "bos_token_id",
                "eos_token_id", "unknown_token_id", "padding_token_id", "add_bos_token",
                "add_eos_token", "add_space_prefix")  # fmt: skip
        out = {k: self.field(f"tokenizer.ggml.{k}") for k in keys}
        out["chat_template"] = self.field("tokenizer.chat_template")
        return {k: v for k, v in out.items() if v is not None}

    def special_token(self, key: str) -> str | None:
        """The token of `tokenizer.ggml.<key>` (e.g. "eos_token_id"), if the file names one."""
        i = self.field(f"tokenizer.ggml.{key}")
        return None if i is None else self.field("tokenizer.ggml.tokens")[int(i)]

    def side_files(self) -> dict[str, dict | str]:
        """File name -> contents of the tokenizer and generation files a transformers folder of
        this model carries (tokenizer.json as its serialised string)."""
        f = self._tokenizer_fields()
        tokens = f["tokens"]
        special = {name: tokens[f[key]] for name, key in _SPECIAL_IDS if key in f}
        tok_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": bool(f.get("add_bos_token", f["model"] == "llama")),
            "add_eos_token": bool(f.get("add_eos_token", False)),
            "model_max_length": self.arch("context_length"),
            "clean_up_tokenization_spaces": False,
            **special,
        }
        if "chat_template" in f:
            tok_config["chat_template"] = f["chat_template"]
        generation = {"_from_model_config": True}
        for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
            if key in f:
                generation[key.replace("padding", "pad")] = int(f[key])
        return {
            "tokenizer.json": self.tokenizer().to_str(),
            "tokenizer_config.json": tok_config,
            "special_tokens_map.json": special,
            "generation_config.json": generation,
        }


def _short(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999974e-06):
    the shortest decimal that rounds to the same float32."""
    return float(str(np.float32(value)))


@functools.lru_cache(maxsize=8)
def _open(path: str, mtime: float, size: int) -> GGUFFile:
    del mtime, size  # part of the cache key only: a rewritten file is read again
    return GGUFFile(path)


def open_gguf(path: str) -> GGUFFile:
    """The parsed file (parsing the metadata of a 49,152-token vocabulary takes about 2 s)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    st = os.stat(path)
    return _open(os.path.abspath(path), st.st_mtime, st.st_size)


# -- tokenizers ---------------------------------------------------------------------------------


def byte_alphabet() -> dict[int, str]:
    """Byte -> the printable character byte-level BPE vocabularies spell it with (GPT-2's
    scheme: printable Latin-1 bytes stand for themselves, the other 68 map to U+0100 on)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(0x100 + extra)
            extra += 1
    return out


# llama.cpp's pre-tokenizer types (`tokenizer.ggml.pre`) that a byte-level vocabulary may name,
# as the `tokenizers` pre-tokenizer each stands for. "smollm" splits digits one by one before
# GPT-2's regex (llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM; SmolLM2's own tokenizer.json agrees).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str, path: str):
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    table = {
        "default": lambda: byte_level,
        "gpt2": lambda: byte_level,
        "smollm": lambda: pt.Sequence([pt.Digits(individual_digits=True), byte_level]),
        "llama-bpe": lambda: pt.Sequence([
            pt.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pt.ByteLevel(add_prefix_space=False, use_regex=False),
        ]),
    }  # fmt: skip
    if pre not in table:
        raise UserError(
            f"{path}: unsupported tokenizer.ggml.pre {pre!r}; supported: {', '.join(table)}"
        )
    return table[pre]()


def _spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece BPE vocabulary (GGUF stores scores, not merges): every
    split of a token into two vocabulary tokens, the token with the higher score merging first."""
    ids = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, i in ids.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                merges.append((-scores[i], ids[left], ids[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def build_tokenizer(f: dict, path: str = "GGUF file"):
    """A `tokenizers.Tokenizer` from `tokenizer.ggml.*` fields (keys without the prefix):
    "gpt2" (byte-level BPE with its merges) or "llama" (SentencePiece BPE with byte fallback)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    kind, tokens = f.get("model"), list(f["tokens"])
    types = list(f.get("token_type") or [1] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = tokens[f["unknown_token_id"]] if "unknown_token_id" in f else None
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in f["merges"]]
        bad = [m for m in merges if len(m) != 2 or any(p not in vocab for p in (*m, "".join(m)))]
        if bad:  # `tokenizers` would abort the process on it
            raise UserError(
                f"{path}: tokenizer.ggml.merges has {len(bad)} merge(s) of tokens outside the "
                f"vocabulary, the first {' '.join(bad[0])!r}"
            )
        tok = Tokenizer(models.BPE(vocab, merges, unk_token=None, fuse_unk=False))
        tok.pre_tokenizer = _pre_tokenizer(f.get("pre", "default"), path)
        tok.decoder = decoders.ByteLevel()
        add_bos = bool(f.get("add_bos_token", False))
    elif kind == "llama":
        merges = _spm_merges(tokens, list(f["scores"]))
        tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
        prefix = [normalizers.Prepend("▁")] if f.get("add_space_prefix", True) else []
        tok.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", "▁")])
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        add_bos = bool(f.get("add_bos_token", True))
    else:
        raise UserError(
            f"{path}: unsupported tokenizer.ggml.model {kind!r}; supported: gpt2, llama"
        )
    # llama.cpp's token types: 3 control (special), 4 user-defined (matched whole, not special).
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types, strict=True) if ty == 3]  # fmt: skip
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types, strict=True) if ty == 4]  # fmt: skip
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    single, pairs = "$A", "$A $B"
    extra = []
    if add_bos and "bos_token_id" in f:
        bos = tokens[f["bos_token_id"]]
        single, pairs = f"{bos} $A", f"{bos} $A {bos} $B"
        extra.append((bos, f["bos_token_id"]))
    if f.get("add_eos_token") and "eos_token_id" in f:
        eos = tokens[f["eos_token_id"]]
        single, pairs = f"{single} {eos}", f"{pairs} {eos}"
        extra.append((eos, f["eos_token_id"]))
    steps = [processors.ByteLevel(trim_offsets=False)] if kind == "gpt2" else []
    steps.append(processors.TemplateProcessing(single=single, pair=pairs, special_tokens=extra))
    tok.post_processor = processors.Sequence(steps)
    return tok


def token_bytes(tokenizer) -> np.ndarray:
    """`[V]` UTF-8 bytes each token id stands for (0 for special tokens): the byte count of
    bits per byte. Byte-level BPE spells bytes with `byte_alphabet`; SentencePiece uses "▁" for
    a space and `<0xAB>` for a raw byte."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    out = np.zeros(max(vocab.values()) + 1, np.int32)
    decoder = type(tokenizer.decoder).__name__ if tokenizer.decoder else ""
    back = {c: b for b, c in byte_alphabet().items()}
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    for token, i in vocab.items():
        if token in special:
            continue
        if decoder == "ByteLevel" and all(c in back for c in token):
            out[i] = len(token)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            out[i] = 1
        else:
            out[i] = len(token.replace("▁", " ").encode("utf-8"))
    return out


# -- writing ------------------------------------------------------------------------------------


def _tokenizer_metadata(writer: "gguf.GGUFWriter", source) -> bool:
    """Copies the tokenizer fields of a GGUF `source` (a `GGUFFile`) into `writer`."""
    f = source._tokenizer_fields()  # noqa: SLF001 - the same module
    writer.add_tokenizer_model(f["model"])
    if "pre" in f:
        writer.add_tokenizer_pre(f["pre"])
    writer.add_token_list(list(f["tokens"]))
    if "token_type" in f:
        writer.add_token_types([int(t) for t in f["token_type"]])
    if "merges" in f:
        writer.add_token_merges(list(f["merges"]))
    if "scores" in f:
        writer.add_token_scores([float(s) for s in f["scores"]])
    for key, add in (("bos_token_id", writer.add_bos_token_id),
                     ("eos_token_id", writer.add_eos_token_id),
                     ("unknown_token_id", writer.add_unk_token_id),
                     ("padding_token_id", writer.add_pad_token_id)):  # fmt: skip
        if key in f:
            add(int(f[key]))
    for key, add in (("add_bos_token", writer.add_add_bos_token),
                     ("add_eos_token", writer.add_add_eos_token),
                     ("add_space_prefix", writer.add_add_space_prefix)):  # fmt: skip
        if key in f:
            add(bool(f[key]))
    if "chat_template" in f:
        writer.add_chat_template(f["chat_template"])
    return True


def _tokenizer_json_metadata(writer, tokenizer_json: str, tokenizer_config: dict) -> bool:
    """The `tokenizer.ggml.*` fields of a byte-level BPE tokenizer.json; False (nothing
    written) for any other kind of tokenizer."""
    spec = json.loads(tokenizer_json)
    model = spec.get("model", {})
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        return False
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, t in added.items():
        vocab.setdefault(content, t["id"])
    tokens = [None] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    types = [3 if t in added and added[t].get("special") else 4 if t in added else 1
             for t in tokens]  # fmt: skip
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = json.dumps(spec.get("pre_tokenizer"))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm" if '"Digits"' in pre else "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = {t: i for i, t in enumerate(tokens)}
    adders = {"bos_token_id": writer.add_bos_token_id, "eos_token_id": writer.add_eos_token_id,
              "unknown_token_id": writer.add_unk_token_id,
              "padding_token_id": writer.add_pad_token_id}  # fmt: skip
    for name, key in _SPECIAL_IDS:
        value = tokenizer_config.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if value in ids:
            adders[key](ids[value])
    writer.add_add_bos_token(bool(tokenizer_config.get("add_bos_token", False)))
    if tokenizer_config.get("chat_template"):
        writer.add_chat_template(tokenizer_config["chat_template"])
    return True


def _planned_type(shape, out_type: str) -> Q:
    weight_type, vector_type = WRITE_TYPES[out_type]
    qtype = vector_type if len(shape) == 1 else weight_type
    if qtype == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16
    return qtype


def _encode(x: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return x
    if qtype == Q.F16:
        return x.astype(np.float16)
    return gguf.quants.quantize(x, qtype)


def write_gguf(path: str, hf_config: dict, reader, out_type: str = "float32",
               tokenizer_source: str | None = None) -> dict:  # fmt: skip
    """Writes a Llama checkpoint as the GGUF file `path`, one tensor at a time.

    `reader` gives the Hugging Face tensors (`hf_checkpoint.open_tensors`: `files`, `shape_dtype`,
    `get` in torch layout). `out_type` is a key of `WRITE_TYPES`; a weight whose rows do not
    split into Q8_0's blocks of 32 is written F16, and 1-D tensors F32 (as llama.cpp does).
    `tokenizer_source` is a GGUF file or a checkpoint folder with a byte-level BPE
    tokenizer.json; without one the file holds no tokenizer. The file appears under its name
    only when complete. Returns {"tensors", "tokenizer": bool, "types": {type: count}}.
    """
    if hf_config.get("model_type") not in ("llama", "mistral"):
        raise UserError(
            f"GGUF output supports Llama-family checkpoints (llama, mistral), not "
            f"model_type {hf_config.get('model_type')!r}"
        )
    if out_type not in WRITE_TYPES:
        raise UserError(f"GGUF type {out_type!r} is not one of {', '.join(WRITE_TYPES)}")
    if hf_config.get("rope_scaling") or hf_config.get("sliding_window"):
        raise UserError("GGUF output supports plain rotary embeddings without sliding windows")
    heads = hf_config["num_attention_heads"]
    kv_heads = hf_config.get("num_key_value_heads") or heads
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // heads
    theta = (hf_config.get("rope_parameters") or {}).get("rope_theta", hf_config.get("rope_theta"))
    tmp = path + ".partial"
    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_name(os.path.splitext(os.path.basename(path))[0])
    writer.add_context_length(hf_config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hf_config["hidden_size"])
    writer.add_block_count(hf_config["num_hidden_layers"])
    writer.add_feed_forward_length(hf_config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(theta or 10000.0))
    writer.add_layer_norm_rms_eps(float(hf_config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(hf_config["vocab_size"])
    writer.add_file_type(_FILE_TYPES[out_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    has_tokenizer = False
    if tokenizer_source and is_gguf(tokenizer_source):
        has_tokenizer = _tokenizer_metadata(writer, open_gguf(tokenizer_source))
    elif tokenizer_source and os.path.isfile(os.path.join(tokenizer_source, "tokenizer.json")):
        with open(os.path.join(tokenizer_source, "tokenizer.json"), encoding="utf-8") as fh:
            tokenizer_json = fh.read()
        config_path = os.path.join(tokenizer_source, "tokenizer_config.json")
        tok_config = {}
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as fh:
                tok_config = json.load(fh)
        has_tokenizer = _tokenizer_json_metadata(writer, tokenizer_json, tok_config)

    # A tied checkpoint's head is its embedding: llama.cpp then writes no `output`.
    tied = hf_config.get("tie_word_embeddings", False)
    names = [n for n in reader.files if not (tied and n == "lm_head.weight")]
    # The header lists every tensor's shape and type before any data.
    counts = {}
    for hf in names:
        shape = tuple(reader.shape_dtype(hf)[0])
        qtype = _planned_type(shape, out_type)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
        if qtype in (Q.F32, Q.F16):
            dtype = np.dtype(np.float32 if qtype == Q.F32 else np.float16)
            nbytes = int(np.prod(shape)) * dtype.itemsize
            writer.add_tensor_info(gguf_name(hf), shape, dtype, nbytes)
        else:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(gguf_name(hf), byte_shape, np.dtype(np.uint8),
                                   int(np.prod(byte_shape)), raw_dtype=qtype)  # fmt: skip
    with errors.naming(path):
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for hf in names:
            x = np.asarray(reader.get(hf), np.float32)
            if ".self_attn.q_proj." in hf:
                x = rope_rows_to_gguf(x, heads)
            elif ".self_attn.k_proj." in hf:
                x = rope_rows_to_gguf(x, kv_heads)
            qtype = _planned_type(x.shape, out_type)
            # Q8_0 keeps one float16 scale per block of 32: max|x| / 127 must fit float16.
            limit = {Q.F16: 1.0, Q.Q8_0: 127.0}.get(qtype)
            with np.errstate(over="ignore"):  # an overflow is refused below, by name
                errors.check_finite(
                    x if limit is None else (x / limit).astype(np.float16),
                    f"tensor {hf} to be written to {path} as {qtype.name}",
                )
            writer.write_tensor_data(_encode(x, qtype))
        writer.close()
    os.replace(tmp, path)
    return {"tensors": len(names), "tokenizer": has_tokenizer, "types": counts}
