"""Merging Hugging Face checkpoints through the checkpoint path: streamed merges, DAM, the CLI."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import hlo_checks
import jax
import ml_collections
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from configs import lm_merge as lm_merge_config
from fusion_jax import hf_checkpoint as hc
from fusion_jax import lora, merging, modes
from fusion_jax import vocab as vocab_lib
from fusion_jax.errors import UserError
from fusion_jax.experiments import lm_merge
from fusion_jax.merging import dam
from fusion_jax.models import lm

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "lm")
LLAMA = os.path.join(FIXTURES, "llama")
TIED = os.path.join(FIXTURES, "llama_tied_sharded")
REPO = os.path.dirname(os.path.dirname(__file__))


def _flat(directory):
    _, params = hc.load(directory)
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree.leaves_with_path(params)}


def _shifted(tmp_path, name, source, fn):
    """A copy of checkpoint `source` with every float tensor x replaced by fn(x)."""
    _, params = hc.load(source)
    out = str(tmp_path / name)
    hc.save(jax.tree.map(fn, params), hc.read_config(source), out, source=source)
    return out


def _merge(tmp_path, method, models, base=None, **hparams):
    out = str(tmp_path / f"out_{method}_{len(os.listdir(tmp_path))}")
    lm_merge.streaming_merge(method, hparams, models, base, out, progress=False)
    return _flat(out)


@pytest.mark.parametrize(
    "method, hparams",
    [
        ("weight_average", {"weights": None}),
        ("ties", {"density": 0.5, "lam": 1.0}),
        ("dare", {"drop_rate": 0.5, "lam": 1.0, "combine": "ties", "density": 1.0}),
        ("slerp", {"t": 0.3}),
        ("multislerp", {"weights": None}),
        ("karcher", {}),
        ("model_stock", {}),
    ],
)
def test_merging_copies_of_one_checkpoint_returns_it(tmp_path, method, hparams):
    k = 2 if method == "slerp" else 3
    base = TIED if lm_merge.merging.needs_base(method) else None
    merged = _merge(tmp_path, method, [TIED] * k, base, **hparams)
    original = _flat(TIED)
    for key, x in original.items():
        assert merged[key].dtype == x.dtype  # bf16 in, bf16 out
        np.testing.assert_allclose(
            merged[key].astype(np.float32), x.astype(np.float32), rtol=1e-2, atol=0
        )
        if method in ("weight_average", "ties", "dare", "model_stock"):  # exact after bf16
            np.testing.assert_array_equal(merged[key], x, err_msg=key)


@pytest.mark.parametrize(
    "method, hparams",
    [
        ("task_arithmetic", {"lam": 0.7}),
        ("ties", {"density": 0.3, "lam": 1.0}),
        ("dare", {"drop_rate": 0.9, "lam": 1.0, "combine": "linear", "density": 1.0}),
        ("breadcrumbs", {"density": 0.5, "gamma": 0.01, "lam": 1.0}),
        ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.01, "lam": 1.0}),
        ("della", {"density": 0.5, "epsilon": 0.15, "lam": 1.0}),
        ("della_linear", {"density": 0.5, "epsilon": 0.15, "lam": 1.0}),
        ("model_stock", {}),
        ("sce", {"select_topk": 0.5}),
    ],
)
def test_task_vector_merges_of_experts_equal_to_the_base_return_the_base(tmp_path, method, hparams):
    merged = _merge(tmp_path, method, [LLAMA, LLAMA], LLAMA, **hparams)
    for key, x in _flat(LLAMA).items():
        np.testing.assert_array_equal(merged[key], x, err_msg=key)


def test_hand_computable_merges(tmp_path):
    # Expert A = base + 1, expert B = base - 3, entry by entry (fp32, so exact in these sums).
    a = _shifted(tmp_path, "a", LLAMA, lambda x: x + np.float32(1))
    b = _shifted(tmp_path, "b", LLAMA, lambda x: x - np.float32(3))
    base = _flat(LLAMA)
    cases = {
        # mean(A, B) = base - 1
        ("weight_average", (("weights", None),)): -1.0,
        # weights 3:1 -> (3(base+1) + (base-3)) / 4 = base
        ("weight_average", (("weights", (3.0, 1.0)),)): 0.0,
        # base + 0.5 * (1 - 3)
        ("task_arithmetic", (("lam", 0.5),)): -1.0,
        # signs: total mass 1 - 3 < 0 elects "-"; only B agrees -> base - 3
        ("ties", (("density", 1.0), ("lam", 1.0))): -3.0,
        # no drops: DARE is task arithmetic
        ("dare", (("drop_rate", 0.0), ("lam", 1.0), ("combine", "linear"), ("density", 1.0))): -2.0,
    }
    for (method, hp), shift in cases.items():
        merged = _merge(tmp_path, method, [a, b], LLAMA, **dict(hp))
        for key, x in base.items():
            np.testing.assert_allclose(merged[key], x + shift, rtol=0, atol=1e-5, err_msg=method)
    # SLERP between A and B at t = 0 and t = 1 returns the end points.
    for t, end in ((0.0, _flat(a)), (1.0, _flat(b))):
        merged = _merge(tmp_path, "slerp", [a, b], t=t)
        for key, x in end.items():
            np.testing.assert_allclose(merged[key], x, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "method, hparams",
    [
        ("weight_average", {"weights": (2.0, 1.0, 1.0)}),
        ("task_arithmetic", {"lam": 0.7}),
        ("ties", {"density": 0.3, "lam": 1.0}),
    ],
)
def test_large_tensors_merged_in_row_blocks_equal_whole_tensor_merges(
    tmp_path, monkeypatch, method, hparams
):
    rng = np.random.default_rng(0)
    experts = [
        _shifted(tmp_path, f"e{k}", LLAMA,
                 lambda x: x + rng.standard_normal(x.shape).astype(x.dtype) * np.float32(0.1))
        for k in range(3)
    ]  # fmt: skip
    base = LLAMA if merging.needs_base(method) else None
    whole = _merge(tmp_path, method, experts, base, **hparams)
    rows_read = []
    get_rows = hc.TensorReader.get_rows

    def counted(self, name, rows):
        rows_read.append(rows)
        return get_rows(self, name, rows)

    monkeypatch.setattr(hc.TensorReader, "get_rows", counted)
    monkeypatch.setattr(lm_merge, "BLOCK_BYTES", 600)  # every matrix in blocks of a few rows
    blocked = _merge(tmp_path, method, experts, base, **hparams)
    assert len(rows_read) > 100
    for key, x in whole.items():
        np.testing.assert_array_equal(blocked[key], x, err_msg=key)


def test_bf16_checkpoints_are_merged_in_float32_and_rounded_once(tmp_path):
    doubled = _shifted(tmp_path, "doubled", TIED, lambda x: x * 2)  # exact in bf16
    merged = _merge(tmp_path, "weight_average", [TIED, doubled], weights=None)
    for key, x in _flat(TIED).items():
        expected = (1.5 * x.astype(np.float32)).astype(x.dtype)
        assert merged[key].dtype == x.dtype
        np.testing.assert_array_equal(merged[key], expected, err_msg=key)


def test_experts_of_mixed_dtypes_are_merged_at_the_widest(tmp_path):
    # A float32 fine-tune of a bfloat16 model: its tensors reach the merge unrounded.
    fine = _shifted(tmp_path, "fine", TIED, lambda x: x.astype(np.float32) * np.float32(1.01))
    merged = _merge(tmp_path, "weight_average", [TIED, fine], weights=None)
    for key, x in _flat(TIED).items():
        wide = 0.5 * x.astype(np.float32) + 0.5 * (x.astype(np.float32) * np.float32(1.01))
        assert merged[key].dtype == x.dtype  # stored as the first model, rounded once
        np.testing.assert_array_equal(merged[key], wide.astype(x.dtype), err_msg=key)


def test_dam_with_one_hot_coefficients_returns_that_expert(tmp_path):
    a = _shifted(tmp_path, "a", LLAMA, lambda x: x * np.float32(2))
    experts = [hc.load(d)[1] for d in (LLAMA, a)]
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *experts)
    one_hot = jax.tree.map(lambda c: c.at[:].set(0).at[1].set(1), dam.init_coefficients(stacked))
    merged = dam.merge(one_hot, stacked, nonlinearity="none")
    hc.save(merged, hc.read_config(LLAMA), str(tmp_path / "out"))
    for key, x in _flat(a).items():
        np.testing.assert_array_equal(_flat(str(tmp_path / "out"))[key], x)


def _config(**fields):
    config = lm_merge_config.get_config()
    for key, value in fields.items():
        section = config
        *parents, last = key.split(".")
        for p in parents:
            section = section[p]
        section[last] = value
    return config


def test_run_writes_checkpoint_and_merge_info(tmp_path):
    config = _config(
        base=LLAMA,
        models=f"{LLAMA},{LLAMA}",
        method="ties",
        density=0.5,
        lam=1.0,
        max_shard_size="100KB",
    )
    info = lm_merge.run(config, str(tmp_path))
    merged = tmp_path / "merged"
    with open(tmp_path / "merge_info.json") as f:
        assert json.load(f) == info
    assert info["method"] == "ties" and info["hparams"] == {"density": 0.5, "lam": 1.0}
    with open(os.path.join(LLAMA, "model.safetensors"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert info["base"]["sha256"]["model.safetensors"] == digest
    assert [m["sha256"]["model.safetensors"] for m in info["models"]] == [digest, digest]
    assert (merged / hc.INDEX_FILE).exists() and not (tmp_path / "merged.partial").exists()
    assert (merged / "generation_config.json").exists()
    for key, x in _flat(LLAMA).items():
        np.testing.assert_array_equal(_flat(str(merged))[key], x)


def test_overrides_give_tensors_whose_names_hold_a_filter_their_own_values(tmp_path):
    # Expert A = base + 1, expert B = base - 3: task arithmetic gives base + lam * (-2).
    a = _shifted(tmp_path, "a", LLAMA, lambda x: x + np.float32(1))
    b = _shifted(tmp_path, "b", LLAMA, lambda x: x - np.float32(3))
    overrides = "self_attn.q:lam=0.25;self_attn:lam=0.0;mlp.down:lam=1"
    config = _config(base=LLAMA, models=f"{a},{b}", method="task_arithmetic", lam=0.5,
                     overrides=overrides)  # fmt: skip
    info = lm_merge.run(config, str(tmp_path / "w"))
    assert info["overrides"] == [
        {"filter": "self_attn.q", "lam": 0.25},
        {"filter": "self_attn", "lam": 0},
        {"filter": "mlp.down", "lam": 1},
    ]
    merged = hc.TensorReader(str(tmp_path / "w" / "merged"))
    original = hc.TensorReader(LLAMA)
    shifts = {}
    for name in original.files:
        shift = float(np.mean(merged.get(name) - original.get(name)))
        np.testing.assert_allclose(merged.get(name) - original.get(name), shift, atol=1e-5)
        shifts[name] = round(shift, 4)
    layer = "model.layers.0."
    assert shifts[layer + "self_attn.q_proj.weight"] == -0.5  # the first filter that matches
    assert shifts[layer + "self_attn.k_proj.weight"] == 0.0
    assert shifts[layer + "mlp.down_proj.weight"] == -2.0
    assert shifts[layer + "mlp.up_proj.weight"] == -1.0  # no filter: config.lam
    assert shifts["model.embed_tokens.weight"] == -1.0
    config.overrides = "self_atn:lam=0.1"
    with pytest.raises(UserError, match=r"^config.overrides: filter 'self_atn' matches no tensor"):
        lm_merge.run(config, str(tmp_path / "w2"))


def test_cli_merge_copies_tokenizer_and_casts_dtype(tmp_path):
    cmd = [
        sys.executable,
        "main.py",
        "--config=configs/lm_merge.py",
        f"--workdir={tmp_path}",
        f"--config.models={TIED},{TIED}",
        "--config.method=weight_average",
        "--config.dtype=float32",
    ]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    merged = str(tmp_path / "merged")
    assert sorted(os.listdir(merged)) == [
        "config.json",
        "generation_config.json",
        "golden.npz",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert hc.read_config(merged)["dtype"] == "float32"
    for key, x in _flat(TIED).items():
        y = _flat(merged)[key]
        assert y.dtype == np.float32
        np.testing.assert_array_equal(y, x.astype(np.float32))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"method": "fisher", "models": LLAMA}, "config.method='fisher': must be one of "
         "'weight_average', 'task_arithmetic', 'ties', 'dare', 'slerp', 'breadcrumbs', "
         "'breadcrumbs_ties', 'della', 'della_linear', 'model_stock', 'sce', 'multislerp', "
         "'karcher', 'dam'"),
        ({"method": "ties", "models": ""}, "config.models='': must be 1 or more existing "
         "checkpoint directories or .gguf files, comma-separated"),
        ({"method": "ties", "models": LLAMA}, "config.base='': must be a checkpoint directory "
         "for config.method='ties'"),
        ({"method": "slerp", "models": f"{LLAMA},{LLAMA},{LLAMA}"},
         f"config.models='{LLAMA},{LLAMA},{LLAMA}': must be exactly 2 checkpoint directories "
         "for config.method='slerp'"),
        ({"method": "weight_average", "models": LLAMA, "dtype": "int8"}, "config.dtype='int8': "
         "must be one of '', 'float32', 'bfloat16', 'float16'"),
        ({"method": "dam", "models": f"{LLAMA},{LLAMA}"}, "config.dam.data='': must be 2 text "
         "sources separated by ';' (one per model)"),
        ({"method": "dam", "models": f"{LLAMA},{LLAMA}", "dam.data": "x"}, "config.dam.data='x': "
         "must be 2 text sources separated by ';' (one per model)"),
        ({"method": "dam", "models": LLAMA, "dam.data": "x", "dam.train": "linear,heads"},
         "config.dam.train='linear,heads': must be comma-separated groups from linear, "
         "embedding, norm"),
        ({"method": "slerp", "models": f"{LLAMA},{LLAMA}", "overrides": "self_attn t=0.3"},
         "config.overrides='self_attn t=0.3': must be '' or FILTER:field=value[,field=value] "
         "entries separated by ';' (e.g. 'self_attn:t=0.3;mlp:t=0.7')"),
        ({"method": "slerp", "models": f"{LLAMA},{LLAMA}", "overrides": "mlp:lam=0.3"},
         "config.overrides='mlp:lam=0.3': must be fields of config.method='slerp' per tensor "
         "(t), not 'lam'"),
        ({"method": "ties", "models": LLAMA, "base": LLAMA, "overrides": "mlp:density=2"},
         "config.overrides='mlp:density=2': must be density values that are a number in (0, 1] "
         "(got density=2)"),
    ],
)  # fmt: skip
def test_errors_are_one_line_and_name_the_field(tmp_path, fields, message):
    """The checks of every experiment's config (fusion_jax/specs/), before any work."""
    with pytest.raises(UserError) as e:
        modes.train(_config(**fields), str(tmp_path / "w"))
    assert str(e.value) == message
    assert not (tmp_path / "w").exists()


def _text_sources(tmp_path):
    """Two small 'domains' of text: English prose and Python-like code."""
    a = tmp_path / "a.txt"
    b = tmp_path / "b.py"
    a.write_text("the quick brown fox jumps over the lazy dog. " * 12)
    b.write_text("def f(x):\n    return x * 2 + 1\n" * 12)
    return f"{a};{b}"


def _dam_config(tmp_path, experts, num_steps):
    return _config(
        method="dam",
        models=",".join(experts),
        **{
            "dam.data": _text_sources(tmp_path),
            "dam.tokenizer": "bytes",
            "dam.seq_len": 32,
            "dam.batch_size": 32,  # >= windows per source: every step sees the same batch
            "dam.num_devices": 1,
            "dam.num_steps": num_steps,
            "dam.learning_rate": 3e-2,
            "dam.log_every": 1,
            "dam.checkpoint_every": 5,
        },
    )


def _two_experts(tmp_path):
    rng = np.random.default_rng(0)
    noise = {}

    def perturb(x):
        key = x.shape
        noise.setdefault(key, rng.standard_normal(key).astype(np.float32))
        return x + np.float32(0.3 * rng.choice([-1, 1])) * noise[key]  # stays float32

    return [_shifted(tmp_path, f"e{i}", LLAMA, perturb) for i in range(2)]


def test_dam_training_lowers_kl_resumes_exactly_and_trains_linear_only(tmp_path, monkeypatch):
    experts = _two_experts(tmp_path)
    straight = tmp_path / "straight"
    lm_merge.run(_dam_config(tmp_path, experts, 10), str(straight))
    records = [json.loads(x) for x in open(straight / "dam" / "metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(1, 11))
    # Observed: KL 15.2 -> 8.9 in 10 steps (the batch is nearly the same every step).
    assert records[-1]["kl"] < 0.75 * records[0]["kl"], (records[0]["kl"], records[-1]["kl"])
    # Interrupted (Ctrl-C) after step 8's update, before its log line, between checkpoints,
    # then rerun: the state saved is step 7's (the one the log matches), and the rerun ends with
    # the same coefficients and output.
    resumed = tmp_path / "resumed"
    append = lm_merge.logs.append

    def interrupted(path, records):
        if records[0]["step"] == 8:
            raise KeyboardInterrupt
        append(path, records)

    monkeypatch.setattr(lm_merge.logs, "append", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lm_merge.run(_dam_config(tmp_path, experts, 10), str(resumed))
    monkeypatch.undo()
    assert not (resumed / "merged").exists()
    log = resumed / "dam" / "metrics.jsonl"
    assert json.loads(log.read_text().splitlines()[-1])["step"] == 7
    # A line past the saved step (as a kill after logging leaves) is dropped and written again.
    with open(log, "a") as f:
        f.write(json.dumps({**records[7], "kl": -1.0}) + "\n")
    lm_merge.run(_dam_config(tmp_path, experts, 10), str(resumed))
    # It went on from the step saved on the interrupt (7), not from the last checkpoint (5), and
    # logged what the uninterrupted run logged.
    assert [json.loads(x) for x in open(log)] == records
    # A rerun of the finished run re-exports and still reports the last logged step.
    assert (
        lm_merge.run(_dam_config(tmp_path, experts, 10), str(resumed))["dam"]["final"]
        == (records[-1])
    )
    a, b = _flat(str(straight / "merged")), _flat(str(resumed / "merged"))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # Only the linear coefficients trained (the default): embeddings, head and norms are still
    # f(1/K) * sum_k W_k with the initial coefficients.
    e0, e1 = _flat(experts[0]), _flat(experts[1])
    for key, x in a.items():
        frozen_mean = np.tanh(0.5) * (e0[key] + e1[key])
        if "embed" in key or "norm" in key or "lm_head" in key:
            np.testing.assert_allclose(x, frozen_mean, rtol=1e-6, atol=1e-6)
        else:
            assert not np.allclose(x, frozen_mean, rtol=1e-6, atol=1e-6), key


def test_dam_refuses_changed_inputs_and_gpt2_windows_past_its_positions(tmp_path, monkeypatch):
    experts = _two_experts(tmp_path)
    hashed, sha256_files = [], hc.sha256_files
    monkeypatch.setattr(hc, "sha256_files", lambda d: hashed.append(d) or sha256_files(d))
    lm_merge.run(_dam_config(tmp_path, experts, 1), str(tmp_path / "w"))
    # Each input read once for inputs.json and merge_info.json, then each text file.
    assert hashed == [*experts, str(tmp_path / "a.txt"), str(tmp_path / "b.py")]
    monkeypatch.undo()
    _, params = hc.load(experts[1])
    hc.save(jax.tree.map(lambda x: x + 1, params), hc.read_config(experts[1]), experts[1])
    with pytest.raises(ValueError) as e:
        lm_merge.run(_dam_config(tmp_path, experts, 1), str(tmp_path / "w"))
    assert str(e.value) == (
        "the expert checkpoints differ from those this workdir was trained with "
        f"(first difference: {os.path.abspath(experts[1])}); use a new --workdir"
    )
    gpt2 = os.path.join(FIXTURES, "gpt2")
    config = _dam_config(tmp_path, [gpt2, gpt2], 1)
    config.dam.seq_len = 65
    with pytest.raises(ValueError) as e:
        lm_merge.run(config, str(tmp_path / "g"))
    assert str(e.value) == (
        "config.dam.seq_len=65: must be at most the models' n_positions=64 (GPT-2 learns one "
        "embedding per position)"
    )
    assert not (tmp_path / "g").exists()
    config.method = "weight_average"  # reads no dam.* field
    lm_merge.run(config, str(tmp_path / "g"))


def test_dam_refuses_other_text_on_resume_and_empty_or_binary_text_before_binding(tmp_path):
    experts = _two_experts(tmp_path)
    lm_merge.run(_dam_config(tmp_path, experts, 1), str(tmp_path / "w"))
    config = _dam_config(tmp_path, experts, 1)  # writes the text files again
    (tmp_path / "b.py").write_text("def g(y):\n    return y\n" * 12)
    with pytest.raises(UserError) as e:
        lm_merge.run(config, str(tmp_path / "w"))
    assert str(e.value) == (
        "the text files differ from those this workdir was trained with (first difference: "
        f"{tmp_path / 'b.py'}); use a new --workdir"
    )
    for content, message in [
        (b"", f"{tmp_path / 'b.py'} is empty: a text source needs text"),
        (b"\x7fELF\x00\x01", f"{tmp_path / 'b.py'} is not a text file (it holds NUL bytes); "
         "name text only"),
    ]:  # fmt: skip
        config = _dam_config(tmp_path, experts, 1)
        (tmp_path / "b.py").write_bytes(content)
        with pytest.raises(UserError) as e:
            lm_merge.run(config, str(tmp_path / "fresh"))
        assert str(e.value) == message
        assert not (tmp_path / "fresh").exists()


def test_no_dam_program_holds_the_models_as_constants(tmp_path, monkeypatch):
    # A jitted function's closed-over arrays are compiled into its program: the K models must
    # be an argument of DAM's step (K x 430 KB here, K whole models for real ones).
    experts = _two_experts(tmp_path)
    programs = hlo_checks.record_programs(monkeypatch)
    lm_merge.run(_dam_config(tmp_path, experts, 2), str(tmp_path / "w"))
    assert programs
    assert max(hlo_checks.largest_constant_bytes(p) for p in programs) < 4096


def test_dam_over_a_mesh_of_data_and_model_axes_trains_as_one_device(tmp_path, monkeypatch):
    """The windows split over `data`, the K models, coefficients and moments over `model`: the
    same KL and merge as one device, each device holding its shards only, and an interrupted
    workdir resumes on another mesh."""
    experts = _two_experts(tmp_path)
    recorded = hlo_checks.argument_bytes(monkeypatch)
    runs = {"one": {}, "four": {"num_devices": 4}, "data2_model4": {"mesh": "data:2,model:4"},
            "data1_model8": {"mesh": "data:1,model:8"}}  # fmt: skip
    for name, fields in runs.items():
        config = _dam_config(tmp_path, experts, 3)
        config.dam.update(fields)
        lm_merge.run(config, str(tmp_path / name))
    # Per device, the arguments are the shards of what mesh.RULES splits (the kernels, their
    # coefficients and moments; 1/4, 1/8) plus what it keeps whole (the rest, and the text).
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *[hc.load(e)[1] for e in experts])
    coefficients = jax.tree.map(np.asarray, dam.init_coefficients(stacked))
    models = (stacked, coefficients, coefficients, coefficients)  # with Adam's two moments
    one = recorded[0]
    assert recorded[1] == one  # data parallel: everything whole on every device
    for model, measured in zip((4, 8), recorded[2:], strict=True):
        split, _ = hlo_checks.sharded_bytes(models, model)
        assert measured == one - split + split // model, model
    # Interrupted after step 2 on model:4, resumed on model:2 and on one device.
    append = lm_merge.logs.append

    def interrupted(path, records):
        if records[0]["step"] == 3:
            raise KeyboardInterrupt
        append(path, records)

    config = _dam_config(tmp_path, experts, 3)
    config.dam.mesh = "model:4"
    monkeypatch.setattr(lm_merge.logs, "append", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lm_merge.run(config, str(tmp_path / "resharded"))
    monkeypatch.undo()
    shutil.copytree(tmp_path / "resharded", tmp_path / "resumed_on_one")
    config.dam.mesh = "model:2"
    lm_merge.run(config, str(tmp_path / "resharded"))
    lm_merge.run(_dam_config(tmp_path, experts, 3), str(tmp_path / "resumed_on_one"))
    logs = {
        w: [json.loads(x)["kl"] for x in open(tmp_path / w / "dam" / "metrics.jsonl")]
        for w in ("one", "four", "data2_model4", "data1_model8", "resharded", "resumed_on_one")
    }
    a = _flat(str(tmp_path / "one" / "merged"))
    for w, kl in logs.items():
        np.testing.assert_allclose(kl, logs["one"], rtol=1e-5, err_msg=w)
        b = _flat(str(tmp_path / w / "merged"))
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=f"{w} {key}")
    config = _dam_config(tmp_path, experts, 3)
    config.dam.num_devices = 3
    with pytest.raises(ValueError) as e:
        lm_merge.run(config, str(tmp_path / "three"))
    assert str(e.value) == (
        "config.dam.batch_size=32: must be divisible by the 3 devices used for data parallelism "
        "(or set config.dam.num_devices)"
    )
    config.dam.mesh = "data:3,model:2"
    with pytest.raises(ValueError) as e:
        lm_merge.run(config, str(tmp_path / "three"))
    assert str(e.value) == (
        "config.dam.batch_size=32: must be divisible by the mesh's data axis (3, config.dam.mesh)"
    )
    config.method = "ties"  # reads no dam.* field: the rule does not apply
    config.base = experts[0]
    lm_merge.run(config, str(tmp_path / "three"))


def test_mismatched_inputs_are_refused_before_the_workdir_is_bound(tmp_path):
    tied = os.path.join(FIXTURES, "llama_tied_sharded")
    config = _config(base=LLAMA, models=f"{LLAMA},{tied}", method="ties")
    with pytest.raises(UserError) as e:
        lm_merge.run(config, str(tmp_path / "m"))
    assert str(e.value) == (
        f"models differ in config field 'tie_embeddings': False in {LLAMA} but True in {tied}"
    )
    assert not (tmp_path / "m").exists()
    config.models = f"{LLAMA},{LLAMA}"  # the fixed command reuses the workdir
    lm_merge.run(config, str(tmp_path / "m"))


def test_a_streamed_merge_does_not_write_into_an_input(tmp_path):
    copy = _shifted(tmp_path, "copy", LLAMA, lambda x: x)
    with pytest.raises(ValueError) as e:
        lm_merge.streaming_merge("weight_average", {}, [LLAMA, copy], None, copy, progress=False)
    assert str(e.value) == (
        f"the output {copy} overlaps the input {copy} (the same path, or one inside the other); "
        "choose a --workdir apart from every input"
    )
    assert sorted(os.listdir(copy)) == sorted(os.listdir(LLAMA))


def test_dam_builds_its_model_at_the_configured_matmul_precision(tmp_path, monkeypatch):
    # tests/test_lm.py checks that the model's matmuls carry its config's precision.
    built, language_model = [], lm.LanguageModel

    def recorded(config):
        built.append(config.matmul_precision)
        return language_model(config)

    monkeypatch.setattr(lm_merge.lm, "LanguageModel", recorded)
    config = _dam_config(tmp_path, _two_experts(tmp_path), 1)
    config.dam.matmul_precision = "high"
    lm_merge.run(config, str(tmp_path / "run"))
    assert built == ["high"]


def test_method_hparams_are_the_merge_functions_arguments_from_the_config():
    config = ml_collections.ConfigDict(lm_merge_config.get_config())
    config.weights = "1,2,3"
    expected = {
        "weight_average": {"weights": (1.0, 2.0, 3.0)},
        "task_arithmetic": {"lam": 1.0},
        "ties": {"density": 0.5, "lam": 1.0},
        "dare": {"drop_rate": 0.5, "lam": 1.0, "combine": "linear", "density": 0.5},
        "slerp": {"t": 0.5},  # eps keeps the function's default
        "breadcrumbs": {"density": 0.5, "gamma": 0.01, "lam": 1.0},
        "breadcrumbs_ties": {"density": 0.5, "gamma": 0.01, "lam": 1.0},
        "della": {"density": 0.5, "epsilon": 0.15, "lam": 1.0},
        "della_linear": {"density": 0.5, "epsilon": 0.15, "lam": 1.0},
        "model_stock": {},
        "sce": {"select_topk": 1.0},
        "multislerp": {"weights": (1.0, 2.0, 3.0)},
        "karcher": {"max_iter": 10, "tol": 1e-5},
    }
    assert set(expected) == set(merging.MERGES)
    for method, hparams in expected.items():
        config.method = method
        assert lm_merge.method_hparams(config) == hparams, method
    config.method, config.weights = "weight_average", ""
    assert lm_merge.method_hparams(config) == {"weights": None}


def test_a_merge_method_registered_in_merging_is_offered_by_lm_merge(tmp_path, toy_merge):
    a = _shifted(tmp_path, "a", LLAMA, lambda x: x + np.float32(1))
    b = _shifted(tmp_path, "b", LLAMA, lambda x: x - np.float32(3))
    config = _config(method="first_vector", models=f"{a},{b}", base=LLAMA, lam=0.5)
    lm_merge.run(config, str(tmp_path / "w"))
    merged = _flat(str(tmp_path / "w" / "merged"))
    for key, x in _flat(LLAMA).items():  # base + 0.5 * (A - base)
        np.testing.assert_allclose(merged[key], x + 0.5, rtol=0, atol=1e-6, err_msg=key)


def _adapter(folder, factors, r, alpha, **extra):
    """A PEFT adapter folder: `factors` {module: (A [r, in], B [out, r])}."""
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    targets = sorted({m.rsplit(".", 1)[-1] for m in factors})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "bias": "none",
              "target_modules": targets, **extra}  # fmt: skip
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    return str(folder)


@pytest.mark.parametrize("rslora", [False, True])
def test_a_lora_adapter_merges_as_the_fine_tune_it_makes(tmp_path, monkeypatch, rslora):
    rng = np.random.default_rng(1)
    layer = "model.layers.1."
    factors = {
        layer + "self_attn.q_proj": (rng.standard_normal((4, 64)), rng.standard_normal((64, 4))),
        layer + "mlp.down_proj": (rng.standard_normal((4, 128)), rng.standard_normal((64, 4))),
    }
    factors = {m: (a.astype(np.float32), b.astype(np.float32)) for m, (a, b) in factors.items()}
    adapter = _adapter(tmp_path / "adapter", factors, r=4, alpha=2, use_rslora=rslora)
    scale = 2 / (2.0 if rslora else 4.0)
    # The same fine-tune merged into a full checkpoint by hand.
    base = hc.TensorReader(LLAMA)
    full = {name: base.get(name) for name in base.files}
    for module, (a, b) in factors.items():
        full[module + ".weight"] = full[module + ".weight"] + scale * (b @ a)
    full_dir = tmp_path / "full"
    shutil.copytree(LLAMA, full_dir)
    save_file(full, str(full_dir / "model.safetensors"))
    other = _shifted(tmp_path, "other", LLAMA, lambda x: x * np.float32(1.5))
    for block_bytes in (lm_merge.BLOCK_BYTES, 600):  # whole tensors, then row blocks
        monkeypatch.setattr(lm_merge, "BLOCK_BYTES", block_bytes)
        ties = {"density": 0.5, "lam": 1.0}
        for method, hp in (("weight_average", {"weights": None}), ("ties", ties)):
            by_hand = _merge(tmp_path, method, [str(full_dir), other], LLAMA, **hp)
            merged = _merge(tmp_path, method, [adapter, other], LLAMA, **hp)
            for key, x in by_hand.items():
                np.testing.assert_allclose(merged[key], x, rtol=0, atol=1e-5, err_msg=key)
    q = "['layers_1']['self_attn']['q_proj']['kernel']"
    assert not np.allclose(by_hand[q], _flat(LLAMA)[q])


@pytest.mark.parametrize(
    "fixture, rank, adapted, targets",
    [
        # 7 linear layers x 2 blocks; not the embeddings or the head.
        ("llama", 2, 14, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                          "v_proj"]),
        # Past k_proj's smaller side (32): zero rows keep every module at the config's r.
        ("llama", 40, 14, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                           "v_proj"]),
        # GPT-2's Conv1D weights, stored [in, out] (fan_in_fan_out).
        ("gpt2", 2, 8, ["c_attn", "c_fc", "c_proj"]),
    ],
)  # fmt: skip
def test_extracted_lora_reproduces_a_rank_r_task_vector_and_applies_back(
    tmp_path, fixture, rank, adapted, targets
):
    rng = np.random.default_rng(2)
    source = os.path.join(FIXTURES, fixture)

    def low_rank(x):  # every matrix plus a rank-2 update; vectors (norms) unchanged
        if x.ndim < 2:
            return x
        u, v = rng.standard_normal((x.shape[0], 2)), rng.standard_normal((2, x.shape[1]))
        return x + (0.01 * u @ v).astype(x.dtype)

    tuned = _shifted(tmp_path, "tuned", source, low_rank)
    config = _config(base=source, models=tuned, lora_rank=rank)
    info = modes.extract_lora(config, str(tmp_path / "w"))
    (adapter,) = info["adapters"]
    assert adapter["folder"] == str(tmp_path / "w" / "lora" / "tuned")
    assert adapter["tensors"] == adapted
    assert min(adapter["energy_kept"].values()) > 1 - 1e-9
    with open(os.path.join(adapter["folder"], "adapter_config.json")) as f:
        peft_config = json.load(f)
    assert (peft_config["r"], peft_config["lora_alpha"]) == (rank, rank)
    assert peft_config["target_modules"] == targets
    assert peft_config["fan_in_fan_out"] == (fixture == "gpt2")
    reader = lora.LoraReader(adapter["folder"], hc.TensorReader(source))
    want = hc.TensorReader(tuned)
    for name in want.files:
        if name in adapter["left_out"]:  # embeddings and positions: not in the adapter
            continue
        np.testing.assert_allclose(reader.get(name), want.get(name), rtol=0, atol=1e-6,
                                   err_msg=name)  # fmt: skip
    # Rank 1 cannot hold a rank-2 update: the summary says how much it keeps.
    config.lora_rank = 1
    info = modes.extract_lora(config, str(tmp_path / "w"))
    assert max(info["adapters"][0]["energy_kept"].values()) < 0.99
    config.base = ""  # with the default method (TIES), which needs a base too
    with pytest.raises(UserError) as e:
        modes.extract_lora(config, str(tmp_path / "no_base"))
    assert str(e.value) == ("config.base='': must be the checkpoint the fine-tunes are taken "
                            "against for --mode=extract_lora")  # fmt: skip
    assert not (tmp_path / "no_base").exists()


def test_lora_adapters_are_refused_where_they_cannot_stand(tmp_path):
    a = np.zeros((2, 64), np.float32)
    adapter = _adapter(tmp_path / "ad", {"model.layers.0.self_attn.q_proj": (a, a.T)}, 2, 2)
    for fields, message in (
        ({"models": f"{adapter},{LLAMA}", "method": "weight_average"},
         f"config.base='': must be the base model of the LoRA adapter {adapter}"),
        ({"models": f"{adapter},{LLAMA}", "method": "dam", "base": LLAMA, "dam.data": "x;y"},
         f"config.models='{adapter},{LLAMA}': must be full checkpoints ({adapter} is a LoRA "
         "adapter, which the static merges take)"),
    ):  # fmt: skip
        with pytest.raises(UserError) as e:
            modes.train(_config(**fields), str(tmp_path / "w"))
        assert str(e.value) == message
    with pytest.raises(UserError) as e:  # where a whole model is read (lm_fuse, DAM, lm_study)
        hc.load(adapter)
    assert str(e.value) == (f"{adapter} is a LoRA adapter, not a whole model: lm_merge's static "
                            "merges take adapters (with config.base); elsewhere merge it into its "
                            "base first")  # fmt: skip
    bad = _adapter(tmp_path / "bad", {"model.layers.0.self_attn.q_proj": (a, a.T)}, 2, 2,
                   use_dora=True)  # fmt: skip
    with pytest.raises(UserError) as e:
        lm_merge.streaming_merge("weight_average", {}, [bad], LLAMA, str(tmp_path / "o"))
    assert str(e.value) == (f"{bad}: a DoRA adapter (use_dora) rescales the base's columns; "
                            "supported: LoRA adapters (PEFT) on linear layers")  # fmt: skip


def _vocab_models(tmp_path):
    """A = the Llama fixture with a 260-token word-level tokenizer; B = 2 x A's weights, with
    two added tokens ("<x>", "<y>": ids 260, 261) and rows for them."""
    vocab = {f"t{i}": i for i in range(259)} | {"[UNK]": 259}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    a = tmp_path / "a"
    shutil.copytree(LLAMA, a)
    tok.save(str(a / "tokenizer.json"))
    _, params = hc.load(LLAMA)
    rng = np.random.default_rng(3)
    extra = rng.standard_normal((2, 64)).astype(np.float32)
    params = jax.tree.map(lambda x: 2 * x, params)
    params["embed_tokens"]["embedding"] = np.concatenate([params["embed_tokens"]["embedding"],
                                                          extra])  # fmt: skip
    params["lm_head"]["kernel"] = np.concatenate([params["lm_head"]["kernel"], 3 * extra.T], 1)
    b = str(tmp_path / "b")
    hc.save(params, dict(hc.read_config(LLAMA), vocab_size=262), b)
    tok.add_tokens(["<x>", "<y>"])
    tok.save(os.path.join(b, "tokenizer.json"))
    return str(a), b, extra


def test_a_union_vocabulary_merge_matches_rows_by_token_and_writes_the_tokenizer(tmp_path):
    a, b, extra = _vocab_models(tmp_path)
    config = _config(models=f"{a},{b}", method="weight_average")
    with pytest.raises(UserError) as e:  # without tokenizer_source: refused, as before
        lm_merge.run(config, str(tmp_path / "refused"))
    assert str(e.value) == f"models differ in config field 'vocab_size': 260 in {a} but 262 in {b}"
    config.tokenizer_source = "union"
    lm_merge.run(config, str(tmp_path / "w"))
    out = str(tmp_path / "w" / "merged")
    assert hc.read_config(out)["vocab_size"] == 262
    assert Tokenizer.from_file(os.path.join(out, "tokenizer.json")).encode("t5 <y> <x>").ids == [
        5, 261, 260]  # fmt: skip
    merged, original = hc.TensorReader(out), hc.TensorReader(a)
    for name in original.files:
        x = original.get(name)
        np.testing.assert_allclose(merged.get(name)[: len(x)], 1.5 * x, rtol=1e-6, err_msg=name)
    # The added tokens' rows: only B has them, so A takes B's (mergekit's donor rule).
    np.testing.assert_array_equal(merged.get("model.embed_tokens.weight")[260:], extra)
    np.testing.assert_array_equal(merged.get("lm_head.weight")[260:], 3 * extra)
    # B's tokenizer as the source: the same rows, B's tokenizer file.
    config.tokenizer_source = b
    lm_merge.run(config, str(tmp_path / "w2"))
    with (
        open(os.path.join(b, "tokenizer.json")) as f1,
        open(tmp_path / "w2" / "merged" / "tokenizer.json") as f2,
    ):
        assert f1.read() == f2.read()


def test_vocabularies_that_differ_beyond_added_tokens_are_refused(tmp_path):
    a, b, _ = _vocab_models(tmp_path)
    other = Tokenizer(WordLevel({f"w{i}": i for i in range(260)}, unk_token="w0"))
    other.add_tokens(["<x>", "<y>"])
    other.save(os.path.join(b, "tokenizer.json"))
    config = _config(models=f"{a},{b}", method="weight_average", tokenizer_source="union")
    with pytest.raises(UserError) as e:
        lm_merge.run(config, str(tmp_path / "w"))
    assert str(e.value).startswith("tokenizers differ beyond their added tokens, first at ")
    tail = "merges only vocabularies that differ by added tokens or padded rows"
    assert str(e.value).endswith(f": {a} and {b}; config.tokenizer_source {tail}")
    config.tokenizer_source = "base"
    with pytest.raises(UserError) as e:
        lm_merge.run(config, str(tmp_path / "w"))
    assert str(e.value) == (
        "config.tokenizer_source='base': must be 'union' or an input's path when config.base is ''"
    )


def test_vocab_rows_follow_mergekits_rule_and_keep_each_inputs_dtype():
    # Output tokens 0..3. Token 0: in all three; 1: in a and b, not the base; 2: in b only;
    # 3: in none.
    rows = {"base": np.array([0, -1, -1, -1]), "a": np.array([0, 1, -1, -1]),
            "b": np.array([1, 0, 2, -1])}  # fmt: skip
    plan = vocab_lib.Plan(tokenizer={}, source="a", rows=rows)
    tensors = {
        "base": np.array([[10.0]], np.float32),
        "a": np.array([[1.0], [2.0]], ml_dtypes.bfloat16),
        "b": np.array([[7.0], [5.0], [9.0]], np.float32),
    }
    out = vocab_lib.permute(plan, tensors, "base")
    assert {p: x.dtype for p, x in out.items()} == {p: x.dtype for p, x in tensors.items()}
    # Token 1 is missing from the base only: it takes the mean of a's 2 and b's 7; token 2 is
    # b's alone; token 3 is nobody's: zeros. Each input keeps its own rows.
    assert out["base"][:, 0].tolist() == [10.0, 4.5, 9.0, 0.0]
    assert out["a"][:, 0].astype(np.float32).tolist() == [1.0, 2.0, 9.0, 0.0]
    assert out["b"][:, 0].tolist() == [5.0, 7.0, 9.0, 0.0]
    # A token several inputs have but one lacks takes the base's row when the base has it.
    rows["a"] = np.array([-1, 1, -1, -1])
    assert vocab_lib.permute(plan, tensors, "base")["a"][0, 0] == 10.0
