"""Dynamic fusion of language models: init, cache, training, resume, generation, errors."""

import json
import os
import shutil
import subprocess
import sys

import hlo_checks
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hlo_checks import dot_precisions

from configs import lm_fuse as lm_fuse_config
from fusion_jax import hf_checkpoint as hc
from fusion_jax import modes
from fusion_jax.data import tokenize
from fusion_jax.errors import UserError
from fusion_jax.experiments import lm_fuse
from fusion_jax.models import decoding, lm, lm_fusion
from fusion_jax.train import checkpoint

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "lm")
REPO = os.path.dirname(os.path.dirname(__file__))


@pytest.mark.parametrize("name", ("llama", "gpt2"))
def test_fusion_of_identical_experts_at_init_is_that_expert(name):
    # Equal states: any gate weights give the same fused state, the identity context projection
    # gives it too, and the mean head is the expert's head.
    config, params = hc.load(os.path.join(FIXTURES, name), "float32")
    model = lm_fusion.LMFusion(lm_fusion.fusion_config(config, 3))
    fused = lm_fusion.init_from_experts(model, jax.random.key(0), [params] * 3)
    tokens = np.load(os.path.join(FIXTURES, name, "golden.npz"))["input_ids"]
    expert = lm.LanguageModel(config).apply({"params": params}, tokens)
    np.testing.assert_allclose(model.apply({"params": fused}, tokens), expert, atol=2e-5)


def test_fusion_of_distributions_is_a_per_token_mixture_of_the_experts():
    """mix="probs": uniform gate weights give the probability ensemble, a gate that puts all
    weight on one expert gives that expert's distribution, and the cache decodes the same."""
    config, params = hc.load(os.path.join(FIXTURES, "llama"), "float32")
    other = jax.tree.map(lambda x: x * 1.1, params)
    fc = lm_fusion.fusion_config(config, 2, force_gate=True)
    model = lm_fusion.LMFusion(fc, mix="probs")
    fused = lm_fusion.init_from_experts(model, jax.random.key(0), [params, other])
    assert set(fused) == {"experts", "fusion"} and "lm_head" in fused["experts"]
    tokens = np.load(os.path.join(FIXTURES, "llama", "golden.npz"))["input_ids"]
    p = [jax.nn.softmax(lm.LanguageModel(config).apply({"params": q}, tokens), -1)
         for q in (params, other)]  # fmt: skip
    uniform = jax.tree.map(jnp.zeros_like, fused["fusion"])  # zero scores: equal weights
    got = model.apply({"params": {**fused, "fusion": uniform}}, tokens)
    np.testing.assert_allclose(jax.nn.softmax(got, -1), (p[0] + p[1]) / 2, atol=1e-6)
    # A large expert embedding on expert 1 and a query bias: the gate picks expert 1.
    gate = jax.tree.map(jnp.zeros_like, fused["fusion"])
    gate["query"]["bias"] = jnp.full_like(gate["query"]["bias"], 10.0)
    gate["expert_embed"] = gate["expert_embed"].at[1].set(10.0)
    one = model.apply({"params": {**fused, "fusion": gate}}, tokens)
    np.testing.assert_allclose(jax.nn.softmax(one, -1), p[1], atol=1e-6)
    cache = lm_fusion.init_fusion_cache(fc, 2, 12)
    first, cache = model.apply({"params": fused}, tokens[:, :7], cache, 0)
    rest, _ = model.apply({"params": fused}, tokens[:, 7:], cache, 7)
    full = model.apply({"params": fused}, tokens)
    np.testing.assert_allclose(np.concatenate([first, rest], 1), full, atol=2e-5)
    with pytest.raises(ValueError, match="build it with force_gate=True"):
        lm_fusion.LMFusion(lm_fusion.fusion_config(config, 2), mix="probs").init(
            jax.random.key(0), tokens)  # fmt: skip


def test_fusion_cache_equals_full_forward():
    configs_params = [hc.load(os.path.join(FIXTURES, "llama"), "float32")]
    config, params = configs_params[0]
    other = jax.tree.map(lambda x: x * 1.1, params)
    fc = lm_fusion.fusion_config(config, 2)
    model = lm_fusion.LMFusion(fc)
    fused = lm_fusion.init_from_experts(model, jax.random.key(0), [params, other])
    tokens = np.load(os.path.join(FIXTURES, "llama", "golden.npz"))["input_ids"]
    full = model.apply({"params": fused}, tokens)
    cache = lm_fusion.init_fusion_cache(fc, 2, 12)
    first, cache = model.apply({"params": fused}, tokens[:, :7], cache, 0)
    rest, _ = model.apply({"params": fused}, tokens[:, 7:], cache, 7)
    np.testing.assert_allclose(np.concatenate([first, rest], 1), full, atol=2e-5)


def _experts(tmp_path):
    """Two tiny Llama experts that differ (scaled copies of the fixture)."""
    source = os.path.join(FIXTURES, "llama")
    _, params = hc.load(source)
    out = []
    for i, scale in enumerate((1.0, 0.8)):
        d = str(tmp_path / f"expert{i}")
        hc.save(
            jax.tree.map(lambda x, s=scale: x * np.float32(s), params), hc.read_config(source), d
        )
        out.append(d)
    return out


def _texts(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir(exist_ok=True)
    for i in range(10):
        (docs / f"{i}.txt").write_text(f"document {i}: the cat sat on the mat. " * 6)
    return str(docs)


def _config(tmp_path, experts, num_steps, **train):
    config = lm_fuse_config.get_config()
    config.models = ",".join(experts)
    config.data.sources = _texts(tmp_path)
    config.data.tokenizer = "bytes"
    config.data.seq_len = 32
    config.data.val_fraction = 0.2
    config.fusion.gate_dim = 16
    config.train.num_steps = num_steps
    config.train.batch_size = 4
    config.train.num_devices = 1
    config.train.learning_rate = 1e-2
    config.train.log_every = 2
    config.train.checkpoint_every = 4
    for key, value in train.items():
        config.train[key] = value
    return config


def test_configured_matmul_precision_reaches_every_matmul_of_the_fusion_model(tmp_path):
    """config.matmul_precision reaches the experts, the gate and the fusion head: forward and
    backward, the gate alone (`fused`, as the gate analyses call it) and cached generation."""
    config = _config(tmp_path, _experts(tmp_path), 1)
    config.matmul_precision = "high"
    setup = lm_fuse.Setup(config, str(tmp_path / "run"), load_data=False)
    model, tokens = setup.model, np.load(os.path.join(FIXTURES, "llama", "golden.npz"))["input_ids"]

    def generated(params):
        cache = lm_fusion.init_fusion_cache(setup.fusion_config, 1, 8)
        step = jax.tree_util.Partial(lambda p, t, c, i: model.apply({"params": p}, t, c, i), params)
        return decoding.generate(step, cache, tokens[:1, :5], 3, jax.random.key(0))

    programs = {
        "gradient": jax.grad(lambda p: model.apply({"params": p}, tokens).mean()),
        "fused": lambda p: model.apply({"params": p}, tokens, method="fused")[:2],
        "generate": generated,
    }
    for name, fn in programs.items():
        found = dot_precisions(fn, setup.params)
        assert len(found) > 10 and set(found) == {("HIGH", "HIGH")}, (name, found)


def test_fusion_trains_resumes_exactly_and_generates(tmp_path):
    experts = _experts(tmp_path)
    straight = tmp_path / "straight"
    info = lm_fuse.train(_config(tmp_path, experts, 8), str(straight))
    losses = [json.loads(x)["train_loss"] for x in open(straight / "metrics.jsonl")]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert info["val_loss"] < min(info["expert_val_loss"])  # trained on this text; they were not
    # Stopped at the step-4 checkpoint, rerun to 8: the same parameters as straight through.
    resumed = tmp_path / "resumed"
    lm_fuse.train(_config(tmp_path, experts, 4), str(resumed))
    lm_fuse.train(_config(tmp_path, experts, 8), str(resumed))
    setup = lm_fuse.Setup(_config(tmp_path, experts, 8), str(straight), load_data=False)
    a = lm_fuse.restore_params(setup, str(straight))
    b = lm_fuse.restore_params(setup, str(resumed))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    # Saving every 3 steps (mid-window: log lines are every 2), interrupted (Ctrl-C) while step
    # 4's log line is written, then rerun: it goes on from step 3 (with the loss of step 3 in
    # its window) and writes the log of the uninterrupted run.
    interrupted, append = tmp_path / "interrupted", lm_fuse.logs.append

    def stop_at_step_4(path, records):
        if records[0]["step"] == 4:
            raise KeyboardInterrupt
        append(path, records)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lm_fuse.logs, "append", stop_at_step_4)
        with pytest.raises(KeyboardInterrupt):
            lm_fuse.train(_config(tmp_path, experts, 8, checkpoint_every=3), str(interrupted))
    assert sorted(os.listdir(interrupted / "checkpoints")) == ["3"]
    lm_fuse.train(_config(tmp_path, experts, 8, checkpoint_every=3), str(interrupted))
    straight_log = (straight / "metrics.jsonl").read_text()
    assert (interrupted / "metrics.jsonl").read_text() == straight_log
    # Lines past the checkpoint a rerun starts from (a kill after logging) are written again.
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 10, "train_loss": 0.0}) + "\n")
    lm_fuse.train(_config(tmp_path, experts, 10), str(resumed))
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [2, 4, 6, 8, 10]
    assert "\n".join(lines[:4]) + "\n" == straight_log and json.loads(lines[4])["train_loss"] > 0
    # Frozen experts: the restored experts are the checkpoints' own weights.
    stacked = [hc.load(e, "float32")[1] for e in experts]
    np.testing.assert_array_equal(
        a["experts"]["layers_0"]["mlp"]["up_proj"]["kernel"],
        np.stack([p["layers_0"]["mlp"]["up_proj"]["kernel"] for p in stacked]),
    )
    config = _config(tmp_path, experts, 8)
    config.generate.prompt = "x" * 60
    config.generate.max_new_tokens = 10
    with pytest.raises(ValueError) as e:
        lm_fuse.generate(config, str(straight))
    assert str(e.value) == (
        "prompt (60 tokens) + config.generate.max_new_tokens (10) exceeds the experts' 64 positions"
    )
    # Generation through the CLI: the prompt followed by 6 new bytes.
    cmd = [
        sys.executable,
        "main.py",
        "--config=configs/lm_fuse.py",
        f"--workdir={straight}",
        "--mode=generate",
        f"--config.models={','.join(experts)}",
        "--config.data.tokenizer=bytes",
        "--config.fusion.gate_dim=16",
        "--config.generate.prompt=the cat",
        "--config.generate.max_new_tokens=6",
    ]
    out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout
    assert out.startswith("the cat") and len(out.rstrip("\n").encode()) >= len("the cat")


def test_no_program_holds_the_experts_or_the_text_as_constants(tmp_path, monkeypatch):
    # A jitted function's closed-over arrays are compiled into its program: the experts (430 KB
    # each here, gigabytes for real ones) and the training windows must be arguments.
    experts = _experts(tmp_path)
    programs = hlo_checks.record_programs(monkeypatch)
    lm_fuse.train(_config(tmp_path, experts, 2), str(tmp_path / "w"))
    assert len(programs) > 3
    assert max(hlo_checks.largest_constant_bytes(p) for p in programs) < 4096


def _workdir(tmp_path, mesh_spec: str):
    return tmp_path / mesh_spec.replace(",", "_").replace(":", "")


def test_a_mesh_of_data_and_model_axes_trains_as_one_device(tmp_path, monkeypatch):
    """The batch split over `data`, the experts' kernels and the trained state over `model`:
    the same losses and parameters as one device, each device holding its shards only, and a
    workdir resumes on another mesh."""
    experts = _experts(tmp_path)
    made, train_step = [], lm_fuse.train_step
    monkeypatch.setattr(lm_fuse, "train_step", lambda *a: made.append(train_step(*a)) or made[-1])
    argument_bytes = hlo_checks.argument_bytes(monkeypatch)
    lm_fuse.train(_config(tmp_path, experts, 4), str(tmp_path / "one"))
    # One compile for the run, ahead of time (its memory plan logged), never through the jit's
    # cache: a compiled program refuses arguments placed otherwise, so the loss window reset at
    # each log line is placed like the state.
    assert made[0]._cache_size() == 0
    programs = hlo_checks.record_programs(monkeypatch)
    for spec in ("data:2,model:4", "data:1,model:8"):
        lm_fuse.train(_config(tmp_path, experts, 4, num_devices=0, mesh=spec),
                      str(_workdir(tmp_path, spec)))  # fmt: skip
    # The update is one program over the 2 x 4 mesh with its batch rows split along `data`.
    updates = [p for p in programs if "sharding_constraint" in p]
    assert len(updates) == 2  # one per mesh, compiled once and run for every step
    assert 'sdy.mesh @mesh = <["data"=2, "model"=4]>' in updates[0]
    assert '<@mesh, [{"data"}, {}]> : tensor<4x33xi32>' in updates[0]  # the batch's windows
    # Per device, the arguments are the shards of what mesh.RULES splits (1/4, 1/8) plus what
    # it keeps whole (norms, biases, the vocabulary's 260 rows over 8, the text).
    setup = lm_fuse.Setup(_config(tmp_path, experts, 4), str(tmp_path / "one"))
    trainable, frozen = setup.split(setup.params)
    tx = optax.adamw(1e-2)
    arguments = (lm_fuse._initial_state(tx, trainable), frozen, *setup.train)
    one = argument_bytes[0]
    assert one == sum(np.asarray(x).nbytes for x in jax.tree.leaves(arguments))
    for model, measured in zip((4, 8), argument_bytes[1:], strict=True):
        split, whole = hlo_checks.sharded_bytes(arguments, model)
        assert measured == whole + split // model, model
    # Resharding: 2 steps with the models over 4 devices, resumed on 2, and on one device.
    half = _workdir(tmp_path, "model:4")
    lm_fuse.train(_config(tmp_path, experts, 2, num_devices=0, mesh="model:4"), str(half))
    shutil.copytree(half, tmp_path / "resumed_on_one")
    lm_fuse.train(_config(tmp_path, experts, 4, num_devices=0, mesh="model:2"), str(half))
    lm_fuse.train(_config(tmp_path, experts, 4), str(tmp_path / "resumed_on_one"))
    a = lm_fuse.restore_params(setup, str(tmp_path / "one"))
    # The gate's key bias cancels in its softmax over experts: its true gradient is 0, so Adam
    # turns rounding noise into +-lr steps there (as in tests/test_multidevice.py).
    del a["fusion"]["key"]["bias"]
    others = [_workdir(tmp_path, s) for s in ("data:2,model:4", "data:1,model:8", "model:4")]
    for other in (*others, tmp_path / "resumed_on_one"):
        b = lm_fuse.restore_params(setup, str(other))
        del b["fusion"]["key"]["bias"]
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)
        losses = [
            [json.loads(x)["train_loss"] for x in open(w / "metrics.jsonl")]
            for w in (tmp_path / "one", other)
        ]  # fmt: skip
        np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    config = _config(tmp_path, experts, 4, num_devices=3)
    with pytest.raises(ValueError) as e:
        lm_fuse.train(config, str(tmp_path / "three"))
    assert str(e.value) == (
        "config.train.batch_size=4: must be divisible by the 3 devices used for data "
        "parallelism (or set config.train.num_devices)"
    )
    for spec, message in (
        ("data:3", "must be divisible by the mesh's data axis (3, config.train.mesh)"),
        ("data:2,model:8", "must be at most 8 devices in all (the local devices)"),
    ):
        with pytest.raises(ValueError) as e:
            lm_fuse.train(_config(tmp_path, experts, 4, mesh=spec), str(tmp_path / "three"))
        field = "batch_size=4" if spec == "data:3" else f"mesh={spec!r}"
        assert str(e.value) == f"config.train.{field}: {message}"
    for spec in ("data:2,tensor:4", "model:2,model:4"):
        with pytest.raises(ValueError) as e:
            lm_fuse.train(_config(tmp_path, experts, 4, mesh=spec), str(tmp_path / "x"))
        assert str(e.value) == (
            f'config.train.mesh={spec!r}: must be "auto" or axis sizes like '
            '"data:2,model:4" (axes data and model, once each)'
        )


def test_frozen_bfloat16_experts_stay_bfloat16_and_train_as_float32_copies(tmp_path, monkeypatch):
    source = os.path.join(FIXTURES, "llama_tied_sharded")  # bfloat16
    _, params = hc.load(source)
    experts = []
    for i, scale in enumerate((1.0, 0.8)):
        experts.append(str(tmp_path / f"bf16_{i}"))
        scaled = jax.tree.map(lambda x, s=scale: (x.astype(np.float32) * s).astype(x.dtype), params)
        hc.save(scaled, hc.read_config(source), experts[-1])
    config = _config(tmp_path, experts, 4)
    setup = lm_fuse.Setup(config, str(tmp_path / "probe"), load_data=False)
    trainable, frozen = setup.split(setup.params)
    assert {str(x.dtype) for x in jax.tree.leaves(frozen)} == {"bfloat16"}
    assert {str(x.dtype) for x in jax.tree.leaves(trainable)} == {"float32"}
    lm_fuse.train(config, str(tmp_path / "stored"))
    # The same run with the experts read as float32 (as before): the same bits.
    load = hc.load
    monkeypatch.setattr(hc, "load", lambda directory, dtype=None: load(directory, "float32"))
    lm_fuse.train(config, str(tmp_path / "float32"))
    monkeypatch.undo()
    logs = [(tmp_path / w / "metrics.jsonl").read_text() for w in ("stored", "float32")]
    assert logs[0] == logs[1]
    a, b = (lm_fuse.restore_params(setup, str(tmp_path / w)) for w in ("stored", "float32"))
    trained = [jax.tree.leaves(setup.split(p)[0]) for p in (a, b)]
    for x, y in zip(*trained, strict=True):
        np.testing.assert_array_equal(x, y)


def test_end_to_end_training_changes_the_experts(tmp_path):
    experts = _experts(tmp_path)
    lm_fuse.train(_config(tmp_path, experts, 2, end_to_end=True), str(tmp_path / "w"))
    config = _config(tmp_path, experts, 2, end_to_end=True)
    setup = lm_fuse.Setup(config, str(tmp_path / "w"), load_data=False)
    params = lm_fuse.restore_params(setup, str(tmp_path / "w"))
    before = hc.load(experts[0], "float32")[1]["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert not np.allclose(params["experts"]["layers_0"]["mlp"]["up_proj"]["kernel"][0], before)


def test_fusion_errors(tmp_path):
    experts = _experts(tmp_path)
    with pytest.raises(ValueError) as e:
        lm_fuse.train(_config(tmp_path, experts[:1], 2), str(tmp_path / "a"))
    assert str(e.value) == (
        f"config.models='{experts[0]}': must be 2 or more existing checkpoint directories or "
        ".gguf files, comma-separated"
    )
    assert not (tmp_path / "a").exists()
    # Experts of different architectures: refused before the workdir is bound.
    tied = os.path.join(FIXTURES, "llama_tied_sharded")
    with pytest.raises(ValueError) as e:
        lm_fuse.train(_config(tmp_path, [experts[0], tied], 2), str(tmp_path / "a"))
    assert str(e.value) == (
        f"models differ in config field 'tie_embeddings': False in {experts[0]} but True in {tied}"
    )
    assert not (tmp_path / "a").exists()
    lm_fuse.train(_config(tmp_path, experts, 2), str(tmp_path / "w"))
    # The experts changed on disk: the workdir is refused rather than mixed.
    _, params = hc.load(experts[1])
    hc.save(jax.tree.map(lambda x: x + 1, params), hc.read_config(experts[1]), experts[1])
    with pytest.raises(ValueError) as e:
        lm_fuse.train(_config(tmp_path, experts, 4), str(tmp_path / "w"))
    assert str(e.value) == (
        "the expert checkpoints differ from those this workdir was trained with "
        f"(first difference: {os.path.abspath(experts[1])}); use a new --workdir"
    )
    # Checked before anything is written: a corrected rerun may use the same workdir.
    one = tmp_path / "one.txt"
    one.write_text("a single document " * 20)
    config = _config(tmp_path, experts, 2)
    config.data.sources = str(one)
    with pytest.raises(ValueError) as e:
        lm_fuse.train(config, str(tmp_path / "b"))
    assert str(e.value) == (
        f"config.data.sources='{one}': must be 2 or more files (one document each: a training "
        "and a validation split need one each), or files split into records by "
        "config.data.record_separator"
    )
    gpt2 = os.path.join(FIXTURES, "gpt2")
    config = _config(tmp_path, [gpt2, gpt2], 2)
    config.data.seq_len = 65
    with pytest.raises(ValueError) as e:
        lm_fuse.train(config, str(tmp_path / "c"))
    assert str(e.value) == (
        "config.data.seq_len=65: must be at most the models' n_positions=64 (GPT-2 learns one "
        "embedding per position)"
    )
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    # Records are counted before the workdir is bound, too.
    config = _config(tmp_path, experts, 2)
    config.data.sources, config.data.record_separator = str(one), "%"
    with pytest.raises(ValueError) as e:
        lm_fuse.train(config, str(tmp_path / "d"))
    assert str(e.value) == (
        f"config.data.sources='{one}': must be text of 2 or more records split by "
        "config.data.record_separator='%' (it holds 1): a training and a validation split need "
        "one each"
    )
    assert not (tmp_path / "d").exists()
    # Generation needs a trained workdir, and leaves an untrained one as it was.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with pytest.raises(ValueError) as e:
        lm_fuse.generate(_config(tmp_path, experts, 2), str(fresh))
    assert str(e.value) == f"{fresh} holds no trained fusion model: train it first (--mode=train)"
    assert not os.listdir(fresh)


def test_gate_weights_are_per_token_distributions():
    config, params = hc.load(os.path.join(FIXTURES, "llama"), "float32")
    model = lm_fusion.LMFusion(lm_fusion.fusion_config(config, 2))
    fused = lm_fusion.init_from_experts(
        model, jax.random.key(0), [params, jax.tree.map(lambda x: x * 0.9, params)]
    )
    tokens = jnp.asarray(np.load(os.path.join(FIXTURES, "llama", "golden.npz"))["input_ids"])
    weights, _, _ = model.apply({"params": fused}, tokens, method="fused")
    assert weights.shape == (2, 12, 2)
    np.testing.assert_allclose(jnp.sum(weights, -1), 1.0, atol=1e-6)


def test_generate_mode_reads_the_model_from_the_workdir(tmp_path, capsys):
    experts = _experts(tmp_path)
    workdir = str(tmp_path / "w")
    modes.train(_config(tmp_path, experts, 2), workdir)
    shutil.rmtree(tmp_path / "docs")  # the training text is not needed to generate
    # Only the generate section is given: models, data and gate come from config.json.
    config = lm_fuse_config.get_config()
    config.generate.prompt = "the"
    config.generate.max_new_tokens = 3
    out = modes.generate(config, workdir)
    assert out.startswith("the") and capsys.readouterr().out == out + "\n"


def test_generate_stops_at_the_tokenizers_eos_and_refuses_an_empty_prompt(tmp_path, monkeypatch):
    experts = _experts(tmp_path)
    workdir = str(tmp_path / "w")
    lm_fuse.train(_config(tmp_path, experts, 2), workdir)
    calls = []

    def generated(step_fn, cache, prompt, max_new_tokens, rng, temperature, eos_ids):
        calls.append(eos_ids)
        new = [104, 105, eos_ids[0], 106][:max_new_tokens]  # "h", "i", the end, "j"
        return jnp.concatenate([prompt, jnp.asarray([new], prompt.dtype)], axis=1)

    monkeypatch.setattr(lm_fuse.decoding, "generate", generated)
    config = _config(tmp_path, experts, 2)
    config.generate.prompt, config.generate.max_new_tokens = "the cat ", 4
    assert lm_fuse.generate(config, workdir) == "the cat hi"
    # The text was packed with the byte tokenizer's end (258), not the experts' config's (257).
    assert calls == [(tokenize.ByteTokenizer.eos_id,)] and tokenize.ByteTokenizer.eos_id == 258
    config.generate.prompt = ""
    with pytest.raises(ValueError, match=r"^config.generate.prompt is empty$"):
        lm_fuse.generate(config, workdir)


def test_a_checkpoint_from_before_the_saved_loss_window_resumes(tmp_path):
    # Written by the code before the window joined the state: step, params and opt_state.
    experts = _experts(tmp_path)
    straight, old = str(tmp_path / "straight"), str(tmp_path / "old")
    lm_fuse.train(_config(tmp_path, experts, 4), straight)
    lm_fuse.train(_config(tmp_path, experts, 2), old)
    setup = lm_fuse.Setup(_config(tmp_path, experts, 2), old, load_data=False)
    trainable, _ = setup.split(setup.params)
    tx = optax.adamw(1e-2, weight_decay=_config(tmp_path, experts, 2).train.weight_decay)
    mngr = checkpoint.manager(os.path.join(old, "checkpoints"), max_to_keep=2)
    state = lm_fuse._restore(mngr, lm_fuse._initial_state(tx, trainable))
    mngr.close()
    shutil.rmtree(os.path.join(old, "checkpoints"))
    mngr = checkpoint.manager(os.path.join(old, "checkpoints"), max_to_keep=2)
    checkpoint.save(mngr, 2, {k: state[k] for k in ("step", "params", "opt_state")})
    mngr.wait_until_finished()
    mngr.close()
    lm_fuse.train(_config(tmp_path, experts, 4), old)  # step 2 ended a log window: nothing lost
    assert open(os.path.join(old, "metrics.jsonl")).read() == (
        open(os.path.join(straight, "metrics.jsonl")).read()
    )


def test_the_text_is_part_of_the_workdir_and_binary_sources_are_refused(tmp_path):
    experts = _experts(tmp_path)
    workdir = str(tmp_path / "w")
    lm_fuse.train(_config(tmp_path, experts, 2), workdir)
    config = _config(tmp_path, experts, 4)  # (writes the documents again, unchanged)
    changed = tmp_path / "docs" / "3.txt"
    changed.write_text("other text " * 20)
    with pytest.raises(UserError) as e:
        lm_fuse.train(config, workdir)
    assert str(e.value) == (
        "the text files differ from those this workdir was trained with (first difference: "
        f"{changed}); use a new --workdir"
    )
    config = _config(tmp_path, experts, 2)
    (tmp_path / "docs" / "3.txt").write_bytes(b"\x00\x01 not text")
    with pytest.raises(UserError) as e:
        lm_fuse.train(config, str(tmp_path / "other"))
    assert str(e.value) == (
        f"{tmp_path / 'docs' / '3.txt'} is not a text file (it holds NUL bytes); name text only"
    )
    assert not (tmp_path / "other").exists()  # refused before the workdir is bound
