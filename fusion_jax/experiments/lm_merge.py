"""Merging Hugging Face language-model checkpoints: every static merge, streamed, and DAM.

    python main.py --config=configs/lm_merge.py --workdir=runs/m \
        --config.base=BASE --config.models=A,B,C --config.method=ties --config.density=0.5

Static merges stream: for one tensor name at a time, the K experts' tensors (and the base's) are
read lazily, stacked to `[K, ...]` and passed as a one-leaf tree to the same function of
`merging.MERGES` that merges in-memory trees; the result goes to a shard writer. Memory is one
output shard plus a few tensors times K, never K whole models. The merges are orientation-free
(element-wise, per-tensor top-k, per-tensor flattening), so tensors are merged in their stored
layout. DARE draws each tensor's mask from `fold_in(seed key, tensor index)`.

DAM needs the experts' forward passes, so it loads them whole, trains the coefficients on each
expert's own local text (Orbax checkpoints under `<workdir>/dam`, resumed on a rerun while the
inputs' sha256 match `<workdir>/dam/inputs.json`) and exports the merged model. Both write
`<workdir>/merged/` (via a temporary directory renamed at the end, so a half-written checkpoint
never looks finished) and `<workdir>/merge_info.json`.
"""

import concurrent.futures
import dataclasses
import functools
import math
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from fusion_jax import errors, files, gguf_checkpoint, lora, merging, schema
from fusion_jax import hf_checkpoint as hc
from fusion_jax import mesh as mesh_lib
from fusion_jax import vocab as vocab_lib
from fusion_jax import workdir as workdir_lib
from fusion_jax.data import text, tokenize
from fusion_jax.errors import UserError
from fusion_jax.experiments import engine
from fusion_jax.merging import dam
from fusion_jax.models import lm
from fusion_jax.specs.lm_merge import SPEC, parse_overrides
from fusion_jax.train import checkpoint, logs


def method_hparams(config) -> dict:
    """The hyper-parameters of `config.method` from the config (fields named as the merge
    function's arguments; those without a field, SLERP's `eps`, keep their defaults)."""
    out = {}
    for name in merging.hyperparameters(config.method):
        if name not in config:
            continue
        value = config[name]
        if name == "weights":
            value = tuple(float(w) for w in schema.split_list(value)) or None
        out[name] = value
    return out


def _is_float(dtype) -> bool:
    # jnp's test knows bfloat16 (NumPy sees ml_dtypes' bfloat16 as kind "V").
    return jnp.issubdtype(dtype, jnp.floating)


def _export_gguf(config, folder: str, source: str) -> dict:
    """Writes `folder`'s checkpoint as `folder/model.gguf` (the tokenizer from `source`: a GGUF
    input's metadata, else the folder's tokenizer.json); with output_format "gguf" the
    safetensors weights are then removed. Returns write_gguf's summary."""
    out_type = config.gguf_type or config.dtype or "float32"
    reader = hc.open_tensors(folder)
    tokenizer = source if gguf_checkpoint.is_gguf(source) else folder
    path = os.path.join(folder, "model.gguf")
    summary = gguf_checkpoint.write_gguf(path, hc.read_config(folder), reader, out_type, tokenizer)
    if config.output_format == "gguf":
        for name in set(reader.files.values()) | {os.path.join(folder, hc.INDEX_FILE)}:
            if os.path.exists(name):
                os.remove(name)
    logging.info("[lm_merge] wrote model.gguf (%s, tokenizer: %s)", out_type, summary["tokenizer"])
    return {"file": "model.gguf", "type": out_type, **summary}


def _outputs(workdir: str) -> tuple[str, str, str]:
    """merged/ (finished), merged.partial/ (being written), merged.old/ (the previous merged/
    while the new one is renamed in)."""
    out_dir = os.path.join(workdir, "merged")
    return out_dir, out_dir + ".partial", out_dir + ".old"


def _finish(tmp_dir: str, out_dir: str, workdir: str, info: dict) -> dict:
    # The old merge_info.json goes first: a stop in between leaves no info rather than another
    # merge's beside this checkpoint. The old merged/ is moved aside, not deleted, until the new
    # one is in place (a stop in between: `run` moves it back).
    info_path = os.path.join(workdir, "merge_info.json")
    if os.path.exists(info_path):
        os.remove(info_path)
    old_dir = _outputs(workdir)[2]
    if os.path.exists(out_dir):
        os.replace(out_dir, old_dir)
    os.replace(tmp_dir, out_dir)
    files.write_json(info_path, info)
    if os.path.exists(old_dir):
        shutil.rmtree(old_dir)
    logging.info("[lm_merge] wrote %s and merge_info.json", out_dir)
    return info


def _aligned(shape, dtype, fill: np.ndarray | None = None) -> np.ndarray:
    """An array (empty, or a copy of `fill`) whose data start on a 64-byte boundary, which
    `jax.device_put` on CPU then uses in place: XLA's alignment. It copied NumPy's own arrays
    (16 bytes past a page) at about 1 GB/s, 0.09 s per 100 MB on this machine."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    out = raw[start : start + nbytes].view(dtype).reshape(shape)
    if fill is not None:
        out[...] = fill
    return out


# A float tensor of more bytes per input than this is merged in row blocks of about this size,
# when the method has a row-block form (`merging.BLOCKWISE`) and every input reads rows
# (safetensors; GGUF files are read whole): the working memory is then the blocks, the output
# tensor and, for TIES, one expert's whole task vector beside the base (BUILD_NOTES: memory).
BLOCK_BYTES = 32 * 2**20


def streaming_merge(
    method: str,
    hparams: dict,
    models: list[str],
    base: str | None,
    out_dir: str,
    dtype: str | None = None,
    max_shard_size="2GB",
    seed: int = 0,
    progress: bool = True,
    overrides: list[tuple[str, dict]] = (),
    tokenizer_source: str = "",
) -> int:
    """Merges checkpoint directories tensor by tensor into `out_dir`; returns the tensor count.
    `overrides` ([(filter, hyper-parameters)]): a tensor whose name holds a filter (the first
    that does) merges with those hyper-parameters over `hparams`. `tokenizer_source` ("base",
    "union" or an input; "": the inputs' vocabularies must be the same): the output's
    vocabulary, the inputs' rows matched to it by fusion_jax/vocab.py."""
    inputs = ([base] if base else []) + models
    files.check_apart(out_dir, inputs)
    per_token = vocab_lib.VOCAB_PATHS if tokenizer_source else ()
    _, hf_config, names = lora.check_compatible(models, base, per_token)
    for where, _ in overrides:
        if not any(where in name for name in names):
            raise UserError(
                f"config.overrides: filter {where!r} matches no tensor name of the inputs "
                f"(e.g. {names[len(names) // 2]!r})"
            )

    def hparams_of(name) -> dict:
        for where, values in overrides:
            if where in name:
                return {**hparams, **values}
        return hparams

    base_reader = hc.open_tensors(base) if base else None
    readers = [lora.open_input(d, base_reader) for d in models]  # an adapter over the base
    ref = base_reader or readers[0]
    # Only the merges that use a base read it (a base given to weight_average is just checked).
    merge_base = base_reader if merging.needs_base(method) else None
    blockwise = merging.BLOCKWISE.get(method)
    # (An adapter reads rows when its base does: GGUF files are read whole.)
    by_rows = blockwise is not None and all(
        hasattr(getattr(r, "base", r), "get_rows")
        for r in readers + ([merge_base] if merge_base else [])
    )
    shapes, stored, out_dtypes = {}, {}, {}
    for name in names:
        shapes[name] = ref.shape_dtype(name)[0]
        # The widest of the inputs' dtypes: a float32 fine-tune of a bfloat16 model keeps its bits.
        stored[name] = np.dtype(jnp.result_type(*(r.get_dtype(name) for r in readers)))
        kept = ref.get_dtype(name)
        out_dtypes[name] = hc.DTYPES[dtype] if dtype and _is_float(kept) else kept
    vocab_plan, vocab_names = None, ()
    if tokenizer_source:
        by_path = dict(zip(models, readers, strict=True)) | ({base: base_reader} if base else {})
        found = hc.parameter_names(base or models[0])[2]
        vocab_names = [found[p][0] for p in per_token if p in found]
        rows = {path: r.shape_dtype(vocab_names[0])[0][0] for path, r in by_path.items()}
        vocab_plan = vocab_lib.plan(models, base, tokenizer_source, rows)
        for n in vocab_names:
            shapes[n] = (vocab_plan.size, *shapes[n][1:])
        hf_config = dict(hf_config, vocab_size=vocab_plan.size)
    plan = [(n, math.prod(shapes[n]) * out_dtypes[n].itemsize) for n in names]
    writer = hc.ShardWriter(out_dir, plan, max_shard_size)
    key, draws = jax.random.key(seed), merging.needs_rng(method)

    def parts(name) -> list:
        """The row blocks tensor `name` is merged in; [None]: whole."""
        shape = shapes[name]
        if not by_rows or len(shape) < 2 or name in vocab_names:
            return [None]
        rows = max(1, BLOCK_BYTES // (math.prod(shape[1:]) * stored[name].itemsize))
        if shape[0] <= rows:
            return [None]
        return [slice(a, min(a + rows, shape[0])) for a in range(0, shape[0], rows)]

    def read(name, rows):
        """The K experts' tensors (or rows) stacked, and the base's for a merge that reads it,
        each checked finite; straight into the stacked array, one copy of each."""
        if name in vocab_names:  # whole, each input's rows in the output's token order
            tensors = {path: r.get(name) for path, r in by_path.items()}
            for path, x in tensors.items():
                errors.check_finite(x, f"{path}: tensor {name}")
            permuted = vocab_lib.permute(vocab_plan, tensors, base)
            stacked = np.stack([permuted[m] for m in models]).astype(stored[name], copy=False)
            return stacked, ({"base": {"w": permuted[base]}} if merge_base else {})
        shape = shapes[name] if rows is None else (len(range(*rows.indices(shapes[name][0]))),
                                                   *shapes[name][1:])  # fmt: skip
        stacked = _aligned((len(readers), *shape), stored[name])
        for k, r in enumerate(readers):
            stacked[k] = r.get(name) if rows is None else r.get_rows(name, rows)
            errors.check_finite(stacked[k], f"{models[k]}: tensor {name}")
        args = {}
        if merge_base:
            b = merge_base.get(name) if rows is None else merge_base.get_rows(name, rows)
            errors.check_finite(b, f"{base}: tensor {name}")
            args["base"] = {"w": jax.device_put(_aligned(b.shape, b.dtype, b))}
        return stacked, args

    def stats(name):
        """`[K]`: each expert's statistic for the row-block merge, from its whole tensor, one
        expert at a time; None if the method needs none."""
        if blockwise.stats is None:
            return None
        b = merge_base.get(name) if merge_base else None
        return np.stack([
            blockwise.stats(r.get(name).astype(stored[name], copy=False), b, **hparams_of(name))
            for r in readers
        ])  # fmt: skip

    floats = [n for n in names if _is_float(ref.get_dtype(n))]
    work = [(name, rows) for name in floats for rows in parts(name)]

    def small(j):  # read ahead only what adds little memory: a block, or a small tensor
        name, rows = work[j]
        return rows is not None or math.prod(shapes[name]) * stored[name].itemsize <= BLOCK_BYTES

    # The next piece is read in a thread while this one merges (reads and NumPy's checks release
    # the GIL): both cores busy.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        ahead = {}

        def fetch(j):
            if j in ahead:
                return ahead.pop(j).result()
            return read(*work[j])

        def read_ahead(j):
            if j < len(work) and small(j):
                ahead[j] = pool.submit(read, *work[j])

        read_ahead(0)
        j = 0
        for i, name in enumerate(tqdm(names, desc=method, unit="tensor", disable=not progress)):
            if not _is_float(ref.get_dtype(name)):  # integer buffers: copied, not merged
                writer.add(name, ref.get(name))
                continue
            blocks = parts(name)
            given = stats(name) if blocks[0] is not None else None
            out = None
            for rows in blocks:
                stacked, args = fetch(j)
                j += 1
                read_ahead(j)
                w = {"w": jax.device_put(stacked)}  # in place: no copy (see `_aligned`)
                if rows is None:
                    # One fixed key for every tensor: the jitted merges are compiled once per
                    # shape and dtype, not once per name (a tree keyed by the name is a new
                    # structure). Drawn only for a merge that draws (an eager op per tensor).
                    rng = jax.random.fold_in(key, i) if draws else None
                    merged = merging.merge(method, w, rng=rng, **args, **hparams_of(name))["w"]
                else:
                    merged = blockwise.merge(w, args.get("base"), given, **hparams_of(name))["w"]
                del stacked, args, w
                with np.errstate(over="ignore"):  # an overflow is refused by the writer, by name
                    merged = np.asarray(merged).astype(out_dtypes[name], copy=False)
                if rows is None:
                    out = merged
                else:
                    if out is None:
                        out = np.empty(shapes[name], out_dtypes[name])
                    out[rows] = merged
                del merged
            writer.add(name, out)
            del out
    writer.close()
    kept = str(out_dtypes[names[0]]) if names else "float32"
    hc.write_config(hf_config, out_dir, dtype or kept)
    hc.copy_side_files(vocab_plan.source if vocab_plan else base or models[0], out_dir)
    if tokenizer_source == "union":
        vocab_lib.write_tokenizer(vocab_plan, out_dir)
    return len(names)


def dam_merge(config, workdir: str, models: list[str], out_dir: str) -> tuple[dict, list[dict]]:
    """Trains DAM coefficients (resuming from `<workdir>/dam`) and exports the merged model.
    Returns its summary and the models' `hc.input_records` (read once: gigabytes each)."""
    d = config.dam
    groups = schema.split_list(d.train)
    sources = [s for s in str(d.data).split(";") if s.strip()]
    lm_config, hf_config, _ = hc.check_compatible(models)
    lm_config = dataclasses.replace(
        lm_config, dtype=d.compute_dtype, matmul_precision=d.matmul_precision
    )
    tokenizer = tokenize.load_tokenizer(d.tokenizer if d.tokenizer != "model" else models[0])
    text_files = [text.text_files(s) for s in sources]
    data = [
        text.load_text(f, tokenizer, d.seq_len, special_tokens=d.special_tokens) for f in text_files
    ]
    tokens, mask = [t for t, _ in data], [m for _, m in data]
    if max(int(t.max()) for t in tokens) >= lm_config.vocab_size:
        raise UserError(
            f"config.dam.tokenizer gives token ids up to {max(int(t.max()) for t in tokens)} "
            f"but the models' vocab_size is {lm_config.vocab_size}"
        )
    # The coefficients saved under <workdir>/dam belong to these checkpoints' contents.
    inputs = hc.input_records(models)  # after the checks above, which fail fast
    hc.check_inputs(os.path.join(workdir, "dam", "inputs.json"), inputs)
    # So is the text they were trained on: a resume on other text would mix the two.
    hc.check_inputs(
        os.path.join(workdir, "dam", "text.json"),
        hc.input_records(sum(text_files, [])),
        what="text files",
    )
    num_steps = d.num_steps or -(-max(len(t) for t in tokens) // d.batch_size)  # one epoch
    # Each step's windows are split over the mesh's `data` axis (batch axis 1 of [K, B, T]), the
    # experts and coefficients over its `model` axis by mesh.RULES (whole on every device for
    # `data:N`); XLA sums the coefficients' gradients across devices.
    mesh = mesh_lib.make(d.mesh, mesh_lib.devices(d.mesh, d.num_devices))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    # Each device's shards cut from the K models: K models on the host, not 2K.
    stacked = mesh_lib.stack_onto([hc.load(m)[1] for m in models], mesh)
    # Beside the compiled step's per-device plan (logged at its compile): what the models weigh.
    logging.info("[dam] mesh %s: the %d models %.3f GB in all", dict(mesh.shape), len(models),
                 mesh_lib.nbytes(stacked) / 1e9)  # fmt: skip
    model = lm.LanguageModel(lm_config)
    trainable = jax.tree.map(
        lambda g: g in groups, dam.coefficient_groups(dam.init_coefficients(stacked))
    )
    # Every expert's windows padded to the longest text, with the true counts.
    sizes = np.asarray([len(t) for t in tokens], np.int32)
    padded = [np.concatenate([x, np.zeros((sizes.max() - len(x), *x.shape[1:]), x.dtype)])
              for x in tokens + mask]  # fmt: skip
    tables = jax.device_put((np.stack(padded[: len(tokens)]), np.stack(padded[len(tokens) :]),
                             sizes), replicated)  # fmt: skip
    mngr = checkpoint.manager(os.path.join(workdir, "dam", "checkpoints"), max_to_keep=2)
    log_path = os.path.join(workdir, "dam", "metrics.jsonl")
    history = []

    def progress(state):  # resumes from the newest checkpoint; the log is cut back to it
        found = checkpoint.restore_newest(mngr, state)
        history[:] = logs.truncate(log_path, 0 if found is None else found[0])
        return mngr, found

    def log(metrics, done):
        if done % d.log_every == 0 or done == num_steps:
            aux = jax.tree.map(lambda x: x[-1], metrics[1])  # the chunk's last step
            record = {"step": done, **{k: np.asarray(v).tolist() for k, v in aux.items()}}
            logs.append(log_path, [record])
            history.append(record)

    coefficients, _, _ = engine.train_dam(
        "[dam]", stacked, d, lambda params, x: model.apply({"params": params}, x[:, :-1]),
        functools.partial(engine.sample_experts, batch_size=d.batch_size), tables,
        jax.random.key(config.seed), num_steps=num_steps, data_axes=(), trainable=trainable,
        chunk=d.log_every, progress=progress, every_steps=d.checkpoint_every, save_at_end=True,
        constrain=lambda batch: jax.lax.with_sharding_constraint(batch, mesh_lib.batch(mesh, 1)),
        shard=functools.partial(mesh_lib.shardings, mesh=mesh), log=log,
    )  # fmt: skip
    merged = dam.merge(coefficients, stacked, d.nonlinearity)
    hc.save(
        merged,
        hf_config,
        out_dir,
        dtype=config.dtype or None,
        max_shard_size=config.max_shard_size,
        source=models[0],
    )
    return {"num_steps": num_steps, "final": history[-1] if history else None}, inputs


@workdir_lib.claims_workdir(SPEC)
def extract_lora(config, workdir: str) -> dict:
    """`lora.extract` of each of `config.models` against `config.base` (`modes.extract_lora`
    refuses a config without one, before the spec's rules for `config.method`), at rank
    `config.lora_rank`, to `<workdir>/lora/<model's folder name>/`; writes and returns
    `<workdir>/lora/extract_info.json` (inputs with sha256, and per adapter the fraction of each
    task vector's squared norm it keeps)."""
    models, base = schema.split_list(config.models), config.base
    if adapters := [m for m in models if lora.is_adapter(m)]:
        raise UserError(f"config.models: {adapters[0]} is a LoRA adapter already")
    out_root = os.path.join(workdir, "lora")
    folders = [os.path.join(out_root, os.path.basename(os.path.normpath(m))) for m in models]
    if len(set(folders)) != len(folders):
        raise UserError("config.models: two fine-tunes share a folder name; the adapters are "
                        "named after them")  # fmt: skip
    info = {"rank": config.lora_rank, "base": hc.input_records([base])[0], "adapters": []}
    for model, folder in zip(models, folders, strict=True):
        files.check_apart(folder, [base, model])
        summary = lora.extract(base, model, folder, config.lora_rank)
        logging.info("[extract_lora] %s: rank %d over %d tensors, %.4f of the task vector's "
                     "squared norm kept on average -> %s", model, config.lora_rank,
                     summary["tensors"], float(np.mean(list(summary["energy_kept"].values()))),
                     folder)  # fmt: skip
        info["adapters"].append({"model": hc.input_records([model])[0], "folder": folder,
                                 **summary})  # fmt: skip
    files.write_json(os.path.join(out_root, "extract_info.json"), info)
    return info


@workdir_lib.claims_workdir(SPEC)
def run(config, workdir: str) -> dict:
    """Merges `config.models` (and `config.base`) with `config.method` into `<workdir>/merged`.

    The config is checked by fusion_jax/specs/lm_merge.py first: method, inputs and their counts,
    dtype and DAM's groups and text sources."""
    models, base = schema.split_list(config.models), config.base or None
    os.makedirs(workdir, exist_ok=True)
    out_dir, tmp_dir, old_dir = _outputs(workdir)
    if os.path.exists(tmp_dir):
        shutil.rmtree(tmp_dir)  # left by an interrupted merge; nothing in it is trusted
    if os.path.exists(old_dir):  # a stop while the last merge was renamed in
        if os.path.exists(out_dir):
            shutil.rmtree(old_dir)
        else:
            os.replace(old_dir, out_dir)
    t0 = time.time()
    info = {"method": config.method}
    if config.method == "dam":
        info["hparams"] = config.dam.to_dict()
        info["dam"], inputs = dam_merge(config, workdir, models, tmp_dir)
        base_record = hc.input_records([base])[0] if base else None
    else:
        hparams = method_hparams(config)
        info["hparams"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in hparams.items()}
        overrides = parse_overrides(config.overrides)
        if overrides:
            info["overrides"] = [{"filter": where, **values} for where, values in overrides]
        # The inputs are hashed in a thread while they merge (hashlib releases the GIL).
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            hashed = pool.submit(hc.input_records, models + ([base] if base else []))
            info["tensors"] = streaming_merge(
                config.method, hparams, models, base, tmp_dir, config.dtype or None,
                config.max_shard_size, config.seed, overrides=overrides,
                tokenizer_source=config.tokenizer_source,
            )  # fmt: skip
            records = hashed.result()
        inputs, base_record = records[: len(models)], (records[-1] if base else None)
    if config.output_format != "safetensors":
        info["gguf"] = _export_gguf(config, tmp_dir, base or models[0])
    info.update(
        seed=config.seed,
        dtype=config.dtype or "as stored",
        base=base_record,
        models=inputs,
        output=os.path.abspath(out_dir),
        seconds=round(time.time() - t0, 3),
    )
    return _finish(tmp_dir, out_dir, workdir, info)
