"""Hugging Face checkpoint I/O: local config.json + safetensors (single or sharded) <-> Flax trees.

One declarative table per architecture family maps each Hugging Face tensor name to its Flax
leaf path and layout (`linear`: torch `Linear.weight` is [out, in], transposed to a Flax
[in, out] kernel; `copy`: embeddings, norms, biases and GPT-2's Conv1D, already [in, out]). The
same table, read backwards, writes checkpoints out again. Tensors are read lazily with
`safe_open(..., framework="numpy")`, one at a time, so nothing here holds more than the tensors
asked for; writes go through `ShardWriter`, which plans shard boundaries up front and writes
`model.safetensors` or `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`
(replacing any such files already there). A folder holding both forms is read from
`model.safetensors`, as transformers reads it.

A `.gguf` file stands wherever a directory does (`read_config`, `open_tensors`, `load`,
`check_compatible`, `copy_side_files`, ...): fusion_jax/gguf_checkpoint.py presents it under the
same Hugging Face names and layouts, dequantized to float32.

Local paths only: nothing here reaches a model hub.
"""

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil

import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tokenizers import Tokenizer

from fusion_jax import errors, files, gguf_checkpoint
from fusion_jax.errors import UserError
from fusion_jax.models.lm import LanguageModel, LMConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# The weight files this module writes (and transformers reads first).
_SAFETENSORS_WEIGHTS = re.compile(
    r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
)
# Files that hold weights in some format; everything else in a checkpoint directory (tokenizer,
# generation config, ...) is copied next to a written checkpoint.
_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|msgpack|h5|ckpt|gguf)$|.*\.index\.json$")

DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}

_SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": DTYPES["float32"],
    "BF16": DTYPES["bfloat16"],
    "F16": DTYPES["float16"],
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(bool),
}

# (Hugging Face name template, Flax path template, layout). `{i}` is a layer number, `{x:a|b}`
# one of the listed words; both sides use the same placeholders.
_LLAMA_TABLE = (
    ("model.embed_tokens.weight", "embed_tokens/embedding", "copy"),
    ("model.layers.{i}.{n:input_layernorm|post_attention_layernorm}.weight",
     "layers_{i}/{n}/scale", "copy"),
    ("model.layers.{i}.{m:self_attn}.{p:q_proj|k_proj|v_proj|o_proj}.weight",
     "layers_{i}/{m}/{p}/kernel", "linear"),
    ("model.layers.{i}.{m:mlp}.{p:gate_proj|up_proj|down_proj}.weight",
     "layers_{i}/{m}/{p}/kernel", "linear"),
    ("model.layers.{i}.{m:self_attn|mlp}.{p:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj}.bias",
     "layers_{i}/{m}/{p}/bias", "copy"),
    ("model.norm.weight", "norm/scale", "copy"),
    ("lm_head.weight", "lm_head/kernel", "linear"),
)  # fmt: skip
_GPT2_TABLE = (
    ("wte.weight", "wte/embedding", "copy"),
    ("wpe.weight", "wpe/embedding", "copy"),
    ("h.{i}.{n:ln_1|ln_2}.weight", "h_{i}/{n}/scale", "copy"),
    ("h.{i}.{n:ln_1|ln_2}.bias", "h_{i}/{n}/bias", "copy"),
    # Conv1D stores [in, out] already: no transpose.
    ("h.{i}.{m:attn|mlp}.{p:c_attn|c_proj|c_fc}.weight", "h_{i}/{m}/{p}/kernel", "copy"),
    ("h.{i}.{m:attn|mlp}.{p:c_attn|c_proj|c_fc}.bias", "h_{i}/{m}/{p}/bias", "copy"),
    ("ln_f.weight", "ln_f/scale", "copy"),
    ("ln_f.bias", "ln_f/bias", "copy"),
)
# Stored tensors that are not parameters: GPT-2's causal-mask buffers, old Llama rotary buffers.
_IGNORED = re.compile(r"(.*\.attn\.(bias|masked_bias)|.*rotary_emb\.inv_freq)$")


_PLACEHOLDER = re.compile(r"\{(\w+)(?::([\w|]+))?\}")


def _compile(template: str, hf_template: str) -> re.Pattern:
    """A regex for `template`; each placeholder matches the words listed for it in the HF
    template (a layer number where none are listed)."""
    choices = {m.group(1): m.group(2) or r"\d+" for m in _PLACEHOLDER.finditer(hf_template)}
    out, pos = "", 0
    for m in _PLACEHOLDER.finditer(template):
        out += re.escape(template[pos : m.start()]) + f"(?P<{m.group(1)}>{choices[m.group(1)]})"
        pos = m.end()
    return re.compile(out + re.escape(template[pos:]) + "$")


def _fill(template: str, groups: dict) -> str:
    return _PLACEHOLDER.sub(lambda m: groups[m.group(1)], template)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a family's tensors are named: the table and a name prefix (GPT-2 saved by
    `GPT2LMHeadModel` prefixes `transformer.`; the original GPT-2 files do not)."""

    table: tuple
    prefix: str = ""

    def to_flax(self, hf_name: str) -> tuple[str, str] | None:
        """(Flax path, layout) for a Hugging Face tensor name, or None if it is not a parameter."""
        if not hf_name.startswith(self.prefix):
            return None
        name = hf_name[len(self.prefix) :]
        for hf_t, flax_t, kind in self.table:
            m = _compile(hf_t, hf_t).match(name)
            if m:
                return _fill(flax_t, m.groupdict()), kind
        return None

    def to_hf(self, flax_path: str) -> tuple[str, str]:
        """(Hugging Face name, layout) for a Flax leaf path."""
        for hf_t, flax_t, kind in self.table:
            m = _compile(flax_t, hf_t).match(flax_path)
            if m:
                return self.prefix + _fill(hf_t, m.groupdict()), kind
        raise KeyError(f"no Hugging Face name for Flax parameter {flax_path!r}")


_TABLES = {"llama": _LLAMA_TABLE, "gpt2": _GPT2_TABLE}


def layout_for(config: LMConfig, tensor_names=None) -> Layout:
    """The family's layout. GPT-2's prefix is read off stored names; for writing (no names) it is
    `transformer.`, as `GPT2LMHeadModel.save_pretrained` writes."""
    prefix = ""
    if config.family == "gpt2":
        if tensor_names is None or any(n.startswith("transformer.") for n in tensor_names):
            prefix = "transformer."
    return Layout(_TABLES[config.family], prefix)


def _need(path: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    return path


def read_json(path: str, keys: tuple[str, ...] = ()) -> dict:
    """A checkpoint's JSON file as a dict holding `keys`; a damaged or foreign file is a
    one-line UserError that names it."""
    with open(_need(path), "rb") as f:
        raw = f.read()
    try:
        content = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}): the file is damaged; replace it") from e
    if not isinstance(content, dict) or (missing := [k for k in keys if k not in content]):
        what = f"no {missing[0]!r}" if isinstance(content, dict) else "not a JSON object"
        raise UserError(f"{path} has {what}: the file is damaged or not a checkpoint's; replace it")
    return content


@contextlib.contextmanager
def _safetensors(path: str):
    """`safe_open` of one file; a damaged file is a one-line UserError that names it."""
    try:
        with safe_open(path, framework="numpy") as f:
            yield f
    except SafetensorError as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); replace it") from e


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file (a small one: a LoRA adapter's)."""
    with _safetensors(_need(path)) as f:
        return {key: f.get_tensor(key) for key in f.keys()}


# What marks a folder as a PEFT adapter (fusion_jax/lora.py reads them).
ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(path: str) -> bool:
    """A folder holding a PEFT adapter (its adapter_config.json) rather than a whole model."""
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def read_config(directory: str) -> dict:
    """The parsed config.json of a checkpoint directory (made from a GGUF file's metadata)."""
    if gguf_checkpoint.is_gguf(directory):
        return gguf_checkpoint.open_gguf(directory).hf_config()
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    if is_adapter(directory) and not os.path.exists(os.path.join(directory, "config.json")):
        raise UserError(
            f"{directory} is a LoRA adapter, not a whole model: lm_merge's static merges take "
            "adapters (with config.base); elsewhere merge it into its base first"
        )
    return read_json(os.path.join(directory, "config.json"))


def eos_token_ids(directory: str) -> tuple[int, ...]:
    """The end-of-sequence ids generation stops at: generation_config.json's, else config.json's
    (as transformers' generate reads them); an int or a list there, () when neither names one."""
    if gguf_checkpoint.is_gguf(directory):
        eos = read_config(directory).get("eos_token_id")
        return () if eos is None else (eos,)
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            with open(path) as f:
                eos = json.load(f).get("eos_token_id")
            if eos is not None:
                return tuple(eos) if isinstance(eos, list) else (eos,)
    return ()


def tensor_files(directory: str) -> dict[str, str]:
    """Tensor name -> safetensors file path, from the single file or else the index (the order
    in which transformers looks, so both read the same weights from a folder holding both)."""
    index = os.path.join(directory, INDEX_FILE)
    single = os.path.join(directory, SINGLE_FILE)
    if os.path.exists(single):
        with _safetensors(single) as f:
            return dict.fromkeys(f.keys(), single)
    if not os.path.exists(index):
        raise FileNotFoundError(
            f"checkpoint file not found: {single} (nor a sharded index {index})"
        )
    weight_map = read_json(index, keys=("weight_map",))["weight_map"]
    return {name: _need(os.path.join(directory, file)) for name, file in weight_map.items()}


class TensorReader:
    """Lazy reads of one checkpoint's tensors.

    Each read opens the tensor's file and closes it again: safetensors memory-maps the file, and
    a handle kept open for a whole merge leaves every page read so far in the process's resident
    memory (about one checkpoint per input by the end), while reopening costs one small header.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.files = tensor_files(directory)
        # Every tensor's shape and dtype, from one read of each file's header: a merge asks
        # for them several times per tensor, and a file opened costs its header's parse.
        self._meta = {}
        for path in sorted(set(self.files.values())):
            with _safetensors(path) as f:
                for name in f.keys():
                    s = f.get_slice(name)
                    self._meta[name] = (tuple(s.get_shape()), s.get_dtype())
        for name, path in self.files.items():
            if name not in self._meta:
                raise UserError(f"{path} lacks tensor {name!r}, which {INDEX_FILE} places "
                                "there: the checkpoint is damaged; replace it")  # fmt: skip

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        return self._meta[name]

    def get_dtype(self, name: str) -> np.dtype:
        return _SAFETENSORS_DTYPES[self._meta[name][1]]

    def get(self, name: str) -> np.ndarray:
        with _safetensors(self.files[name]) as f:
            return f.get_tensor(name)

    def get_rows(self, name: str, rows: slice) -> np.ndarray:
        """Rows `rows` of tensor `name`, read alone (a large tensor merged a block at a time)."""
        with _safetensors(self.files[name]) as f:
            return f.get_slice(name)[rows]


def open_tensors(path: str):
    """The lazy tensor reader of a checkpoint directory (`TensorReader`) or GGUF file (its
    `GGUFFile`, which reads the same way)."""
    if gguf_checkpoint.is_gguf(path):
        return gguf_checkpoint.open_gguf(path)
    return TensorReader(path)


def sha256_files(directory: str) -> dict[str, str]:
    """sha256 of every regular file directly in `directory` (or of the file `directory`), by
    file name."""
    out = {}
    is_file = os.path.isfile(directory)
    names = [os.path.basename(directory)] if is_file else sorted(os.listdir(directory))
    for name in names:
        path = directory if is_file else os.path.join(directory, name)
        if os.path.isfile(path):
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
            out[name] = h.hexdigest()
    return out


def input_records(directories: list[str]) -> list[dict]:
    """`{"path", "sha256"}` of each checkpoint directory (or file: a GGUF checkpoint, a text
    file): how a workdir records its inputs."""
    return [{"path": os.path.abspath(d), "sha256": sha256_files(d)} for d in directories]


def check_inputs(record: str, now: list[dict], what: str = "expert checkpoints") -> None:
    """Writes the `input_records` `now` to `record` (a JSON file) on first use; later, refuses
    inputs (checkpoints, text files) that changed since: a resumed run would mix old and new."""
    if not os.path.exists(record):
        os.makedirs(os.path.dirname(record), exist_ok=True)
        files.write_json(record, now)
        return
    with open(record) as f:
        before = json.load(f)
    for i, new in enumerate(now + [None]):
        old = before[i] if i < len(before) else None
        if (old and old["sha256"]) != (new and new["sha256"]):
            path = (new or old)["path"]
            raise UserError(
                f"the {what} differ from those this workdir was trained with (first "
                f"difference: {path}); use a new --workdir"
            )


def flatten(params) -> dict[str, object]:
    """{"a/b/kernel": leaf} for a nested parameter dict."""
    return {
        jax.tree_util.keystr(p, simple=True, separator="/"): leaf
        for p, leaf in jax.tree.leaves_with_path(params)
    }


def unflatten(flat: dict) -> dict:
    """The nested parameter dict of `flatten`'s output."""
    tree = {}
    for path, leaf in flat.items():
        node = tree
        *parents, last = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    return tree


@functools.lru_cache(maxsize=8)
def abstract_params(config: LMConfig) -> dict:
    """Flax path -> expected `ShapeDtypeStruct` of every parameter (nothing allocated); traced
    once per config (0.4 s each for the bench's 98M Llama: K + 1 inputs share one)."""
    shapes = jax.eval_shape(
        lambda: LanguageModel(config).init(jax.random.key(0), np.zeros((1, 1), np.int32))
    )
    return flatten(shapes["params"])


def parameter_names(directory: str) -> tuple[LMConfig, Layout, dict[str, tuple[str, str]]]:
    """(config, layout, Flax path -> (HF name, layout kind)) after checking names and shapes.

    Every problem (missing, unexpected, wrong shape) is collected and reported in one error.
    """
    config = LMConfig.from_hf(read_config(directory))
    reader = open_tensors(directory)
    layout = layout_for(config, reader.files)
    expected = abstract_params(config)
    found, errors = {}, []
    for name in reader.files:
        if _IGNORED.match(name) or (name == "lm_head.weight" and config.tie_embeddings):
            continue  # buffers, or a redundant copy of the tied embedding
        mapped = layout.to_flax(name)
        if mapped is None:
            errors.append(f"unexpected tensor {name!r}")
            continue
        path, kind = mapped
        if path not in expected:
            errors.append(f"unexpected tensor {name!r}")
            continue
        shape, _ = reader.shape_dtype(name)
        want = expected[path].shape
        want = want[::-1] if kind == "linear" else want
        if shape != tuple(want):
            errors.append(f"tensor {name!r} has shape {list(shape)}, expected {list(want)}")
        found[path] = (name, kind)
    for path in expected:
        if path not in found:
            errors.append(f"missing tensor {layout.to_hf(path)[0]!r}")
    if errors:
        raise UserError(
            f"checkpoint {directory} does not match its config.json: " + "; ".join(errors)
        )
    return config, layout, found


def load(directory: str, dtype: str | None = None) -> tuple[LMConfig, dict]:
    """(config, params) of a checkpoint directory; params as NumPy arrays in the stored dtype,
    or cast to `dtype` ("float32", "bfloat16", "float16")."""
    config, _, names = parameter_names(directory)
    reader = open_tensors(directory)
    flat = {}
    for path, (name, kind) in names.items():
        x = reader.get(name)
        x = np.ascontiguousarray(x.T) if kind == "linear" else x
        flat[path] = x.astype(DTYPES[dtype]) if dtype else x
    return config, unflatten(flat)


def parse_size(size) -> int:
    """Bytes from an int or a string like "5GB", "500MB", "100KB" (powers of 1000, as HF)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB)?\s*", str(size).upper())
    if not m:
        raise UserError(f"max_shard_size must be bytes or like '2GB', got {size!r}")
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[m.group(2) or "B"]
    return int(float(m.group(1)) * scale)


class ShardWriter:
    """Writes tensors, in a planned order, into safetensors shards of at most `max_shard_size`.

    `plan` is [(name, nbytes)] for every tensor in write order; a shard is written as soon as its
    last tensor arrives, so at most one shard is held in memory. Safetensors weights already in
    `directory` are removed first.
    """

    def __init__(self, directory: str, plan: list[tuple[str, int]], max_shard_size):
        limit = parse_size(max_shard_size)
        self.directory = directory
        shards, size = [[]], 0
        for name, nbytes in plan:
            if shards[-1] and size + nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        self.total_size = sum(n for _, n in plan)
        n = len(shards)
        self.files = [
            SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)
        ]
        self.shard_of = {name: i for i, names in enumerate(shards) for name in names}
        self._remaining = [len(names) for names in shards]
        self._pending = [{} for _ in shards]
        os.makedirs(directory, exist_ok=True)
        # Weights saved there before would stay beside these (a stale index or shard), and a
        # reader could take them for this checkpoint's.
        for name in os.listdir(directory):
            if _SAFETENSORS_WEIGHTS.fullmatch(name):
                os.remove(os.path.join(directory, name))

    def add(self, name: str, array: np.ndarray) -> None:
        """Queues tensor `name` (already in its stored dtype); refuses NaN or Inf in it, which
        no input may bring and no computation or cast to a narrower float may produce."""
        errors.check_finite(array, f"tensor {name} to be written to {self.directory}")
        i = self.shard_of[name]
        self._pending[i][name] = np.ascontiguousarray(array)
        self._remaining[i] -= 1
        if self._remaining[i] == 0:
            path = os.path.join(self.directory, self.files[i])
            with errors.naming(path):
                save_file(self._pending[i], path, metadata={"format": "pt"})
            os.chmod(path, files.default_file_mode())  # safetensors creates 0600
            self._pending[i] = {}

    def close(self) -> None:
        if any(self._remaining):
            missing = [n for n, i in self.shard_of.items() if self._remaining[i]]
            raise RuntimeError(f"ShardWriter closed before all tensors were written: {missing[:3]}")
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {n: self.files[i] for n, i in sorted(self.shard_of.items())},
            }
            files.write_json(os.path.join(self.directory, INDEX_FILE), index)


# Files of the source that would misdescribe a written checkpoint: its own config.json is
# written, and the model card (README.md) and the hub's .gitattributes describe the source.
_NOT_COPIED = {"config.json", "README.md", ".gitattributes", ADAPTER_CONFIG}


def copy_side_files(src: str, dst: str) -> list[str]:
    """Copies every non-weight file but `_NOT_COPIED` (tokenizer, generation config, ...); from
    a GGUF file, writes the tokenizer files that its metadata describes."""
    copied = []
    os.makedirs(dst, exist_ok=True)
    if gguf_checkpoint.is_gguf(src):
        for name, content in gguf_checkpoint.open_gguf(src).side_files().items():
            with open(os.path.join(dst, name), "w", encoding="utf-8") as f:
                f.write(content if isinstance(content, str) else json.dumps(content, indent=2))
            copied.append(name)
        return copied
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isfile(path) and name not in _NOT_COPIED and not _WEIGHT_FILE.match(name):
            shutil.copy2(path, os.path.join(dst, name))
            copied.append(name)
    return copied


def write_config(hf_config: dict, directory: str, dtype: str) -> None:
    """config.json with the stored dtype under both transformers spellings."""
    out = dict(hf_config)
    out["dtype" if "dtype" in out or "torch_dtype" not in out else "torch_dtype"] = dtype
    os.makedirs(directory, exist_ok=True)
    files.write_json(os.path.join(directory, "config.json"), out, sort_keys=True)


def save(
    params,
    hf_config: dict,
    directory: str,
    layout: Layout | None = None,
    dtype: str | None = None,
    max_shard_size="2GB",
    source: str | None = None,
) -> None:
    """Writes `params` as a Hugging Face checkpoint (config.json + safetensors [+ index]).

    `dtype` defaults to the params' own; `source` (a checkpoint directory) provides the
    tokenizer and other side files, which are copied over.
    """
    config = LMConfig.from_hf(hf_config)
    layout = layout or layout_for(config)
    flat = flatten(params)
    expected = abstract_params(config)
    if set(flat) != set(expected):
        diff = sorted(set(flat) ^ set(expected))
        raise UserError(
            f"params do not match the config's architecture; first difference {diff[0]!r}"
        )
    out_dtype = DTYPES[dtype] if dtype else np.asarray(next(iter(flat.values()))).dtype
    names = {path: layout.to_hf(path) for path in flat}
    plan = [(names[p][0], int(np.prod(flat[p].shape)) * out_dtype.itemsize) for p in flat]
    writer = ShardWriter(directory, plan, max_shard_size)
    for path, leaf in flat.items():
        name, kind = names[path]
        with np.errstate(over="ignore"):  # an overflow is refused by the writer, by name
            x = np.asarray(leaf).astype(out_dtype)
        writer.add(name, x.T if kind == "linear" else x)
    writer.close()
    write_config(hf_config, directory, str(out_dtype))
    if source:
        copy_side_files(source, directory)


def check_compatible(
    directories: list[str], vocab_tensors: tuple[str, ...] = ()
) -> tuple[LMConfig, dict, list[str]]:
    """Checks that checkpoints share architecture, tensor names and shapes, before any work.

    Returns (config, config.json, tensor names) of the first. The error names the first field
    or tensor that differs. `vocab_tensors` (Flax paths): tensors with a row per token, whose
    row counts (and vocab_size, and the tokenizers) may differ; fusion_jax/vocab.py matches
    their rows.
    """
    first, rest = directories[0], directories[1:]
    config, _, found = parameter_names(first)
    hf_config = read_config(first)
    reader = open_tensors(first)
    names = list(reader.files)
    shapes = {n: reader.shape_dtype(n)[0] for n in names}
    per_token = {found[p][0] for p in vocab_tensors if p in found}
    for n in per_token:
        shapes[n] = shapes[n][1:]
    for other in rest:
        other_config, _, _ = parameter_names(other)
        for field in dataclasses.fields(LMConfig):
            if field.name in ("param_dtype", "dtype") or (per_token and field.name == "vocab_size"):
                continue
            a, b = getattr(config, field.name), getattr(other_config, field.name)
            if a != b:
                raise UserError(
                    f"models differ in config field {field.name!r}: {a!r} in {first} "
                    f"but {b!r} in {other}"
                )
        r = open_tensors(other)
        for name in names:
            if name not in r.files:
                raise UserError(f"models differ: tensor {name!r} is in {first} but not in {other}")
            shape = r.shape_dtype(name)[0]
            shape = shape[1:] if name in per_token else shape
            if shape != shapes[name]:
                raise UserError(
                    f"models differ at tensor {name!r}: shape {list(shapes[name])} in {first} "
                    f"but {list(shape)} in {other}"
                )
        extra = sorted(set(r.files) - set(names))
        if extra:
            raise UserError(f"models differ: tensor {extra[0]!r} is in {other} but not in {first}")
    if not per_token:
        _check_tokenizers(directories)
    return config, hf_config, names


def tokenizer_content(path: str) -> dict | None:
    """A checkpoint's tokenizer as the `tokenizers` library writes it (tokenizer.json's tree,
    whatever its formatting; a GGUF file's converted from its metadata), None if it has none."""
    if gguf_checkpoint.is_gguf(path):
        return json.loads(gguf_checkpoint.open_gguf(path).side_files()["tokenizer.json"])
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        return None
    try:
        return json.loads(Tokenizer.from_file(file).to_str())
    except Exception as e:  # the tokenizers library raises its own error types
        raise UserError(f"{file} is not a readable tokenizer ({e}); replace it") from e


def first_difference(a, b, where: str = "") -> str | None:
    """The path of the first place where JSON trees `a` and `b` differ, None if they do not."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"{where}.{key}"
            if (found := first_difference(a[key], b[key], f"{where}.{key}")) is not None:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            if (found := first_difference(x, y, f"{where}[{i}]")) is not None:
                return found
        return None if len(a) == len(b) else f"{where}[{min(len(a), len(b))}]"
    return None if a == b else where


def _check_tokenizers(paths: list[str]) -> None:
    """Refuses checkpoints whose tokenizers differ (a merge or fusion would read one model's
    token ids with another's meaning); byte-identical files are not parsed twice."""
    seen: dict[str, dict | None] = {}
    first, reference = None, None
    for path in paths:
        file = path if gguf_checkpoint.is_gguf(path) else os.path.join(path, "tokenizer.json")
        digest = sha256_files(file).get(os.path.basename(file)) if os.path.isfile(file) else None
        if digest not in seen:
            seen[digest] = tokenizer_content(path) if digest else None
        content = seen[digest]
        if content is None:
            continue
        if reference is None:
            first, reference = path, content
        elif content != reference:  # (== in C first: the walk takes 0.8 s on SmolLM2's)
            where = first_difference(reference, content)
            raise UserError(
                f"models differ in their tokenizers, first at {where.lstrip('.')!r}: {first} "
                f"and {path} (their token ids would not mean the same)"
            )
