"""Language models and Hugging Face checkpoint I/O against goldens written by transformers.

The fixtures under tests/fixtures/lm were written once by scripts/make_lm_goldens.py (PyTorch +
transformers 5.24, dev-only): tiny random checkpoints, their fp32 logits on fixed tokens, and
transformers' greedy generations. Regenerate them only when that script changes.
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hlo_checks import dot_precisions
from safetensors import safe_open

from fusion_jax import hf_checkpoint as hc
from fusion_jax.models import decoding, lm

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "lm")
NAMES = ("gpt2", "gpt2_fp16", "llama", "llama_tied_sharded", "mistral", "qwen2")


def fixture(name):
    return os.path.join(FIXTURES, name)


def golden(name):
    return np.load(os.path.join(fixture(name), "golden.npz"))


def _stored_tensors(directory):
    out = {}
    for name, path in hc.tensor_files(directory).items():
        with safe_open(path, framework="numpy") as f:
            out[name] = f.get_tensor(name)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
    config, params = hc.load(fixture(name), "float32")
    g = golden(name)
    logits = lm.LanguageModel(config).apply({"params": params}, g["input_ids"])
    assert logits.shape == g["logits"].shape
    np.testing.assert_allclose(np.asarray(logits), g["logits"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ("gpt2", "llama"))  # tied (embedding's attend) and untied heads
@pytest.mark.parametrize("precision", ("highest", "high"))
def test_every_matmul_of_forward_and_backward_has_the_configured_precision(name, precision):
    config, params = hc.load(fixture(name), "float32")
    model = lm.LanguageModel(dataclasses.replace(config, matmul_precision=precision))
    tokens = golden(name)["input_ids"]
    found = dot_precisions(jax.grad(lambda p: model.apply({"params": p}, tokens).mean()), params)
    # Projections, attention einsums and the head, forward and both gradients of each.
    assert len(found) > 20
    assert set(found) == {(precision.upper(), precision.upper())}


@pytest.mark.parametrize("name", ("gpt2", "llama", "mistral", "qwen2"))
def test_greedy_generation_with_cache_matches_transformers(name):
    config, params = hc.load(fixture(name), "float32")
    g = golden(name)
    model = lm.LanguageModel(config)
    step = jax.tree_util.Partial(lambda p, t, c, i: model.apply({"params": p}, t, c, i), params)
    new = g["greedy_ids"].shape[1] - g["prompt_ids"].shape[1]
    cache = lm.init_cache(config, 1, g["greedy_ids"].shape[1])
    out = decoding.generate(step, cache, jnp.asarray(g["prompt_ids"]), new, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out), g["greedy_ids"])


def test_cached_chunks_equal_full_forward_with_sliding_window():
    # Mistral's window of 4 < 12 tokens: the cache path must apply the same window.
    config, params = hc.load(fixture("mistral"), "float32")
    assert config.sliding_windows == (4, 4)
    tokens = golden("mistral")["input_ids"]
    model = lm.LanguageModel(config)
    full = model.apply({"params": params}, tokens)
    cache = lm.init_cache(config, 2, 16)
    parts = []
    for start, stop in ((0, 5), (5, 6), (6, 12)):
        logits, cache = model.apply({"params": params}, tokens[:, start:stop], cache, start)
        parts.append(logits)
    np.testing.assert_allclose(np.concatenate(parts, 1), full, rtol=0, atol=2e-5)


def test_sampling_is_seeded_and_differs_from_greedy():
    config, params = hc.load(fixture("llama"), "float32")
    model = lm.LanguageModel(config)
    step = jax.tree_util.Partial(lambda p, t, c, i: model.apply({"params": p}, t, c, i), params)
    prompt = jnp.asarray(golden("llama")["prompt_ids"])

    def run(seed, temperature):
        cache = lm.init_cache(config, 1, 25)
        return np.asarray(
            decoding.generate(step, cache, prompt, 20, jax.random.key(seed), temperature)
        )

    np.testing.assert_array_equal(run(0, 1.0), run(0, 1.0))
    assert not np.array_equal(run(0, 1.0), run(1, 1.0))
    assert not np.array_equal(run(0, 1.0), run(0, 0.0))


@pytest.mark.parametrize("name", ("gpt2", "llama_tied_sharded", "qwen2", "gpt2_fp16"))
def test_load_save_load_is_bit_identical(name, tmp_path):
    config, params = hc.load(fixture(name))
    hf_config = hc.read_config(fixture(name))
    hc.save(params, hf_config, str(tmp_path), max_shard_size="50KB", source=fixture(name))
    config2, params2 = hc.load(str(tmp_path))
    assert config2 == config
    for (path, a), b in zip(
        jax.tree.leaves_with_path(params), jax.tree.leaves(params2), strict=True
    ):
        assert a.dtype == b.dtype and np.array_equal(a, b), path
    # Same names, dtypes and bytes as the original files (GPT-2 keeps its `transformer.` prefix).
    original, saved = _stored_tensors(fixture(name)), _stored_tensors(str(tmp_path))
    assert sorted(saved) == sorted(original)
    for key in original:
        assert saved[key].dtype == original[key].dtype
        np.testing.assert_array_equal(saved[key], original[key])


def test_save_writes_sharded_layout_with_index_and_side_files(tmp_path):
    config, params = hc.load(fixture("llama_tied_sharded"))
    hf_config = hc.read_config(fixture("llama_tied_sharded"))
    source = tmp_path / "source"
    shutil.copytree(fixture("llama"), source)
    (source / "README.md").write_text("the model card of the source")
    (source / "pytorch_model.bin").write_bytes(b"old weights")
    out = tmp_path / "out"
    hc.save(params, hf_config, str(out), max_shard_size="60KB", source=str(source))
    # The source's tokenizer and generation files come along; its card and weights do not.
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("model")) == [
        "config.json",
        "generation_config.json",
        "golden.npz",
    ]
    with open(out / hc.INDEX_FILE) as f:
        index = json.load(f)
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 1 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    sizes = {}
    for name, file in index["weight_map"].items():
        with safe_open(str(out / file), framework="numpy") as f:
            sizes[file] = sizes.get(file, 0) + f.get_tensor(name).nbytes
    assert index["metadata"]["total_size"] == sum(sizes.values())
    # Every shard but one holding a single oversized tensor stays within the limit.
    assert all(s <= 60_000 for s in sizes.values())
    assert "lm_head.weight" not in index["weight_map"]  # tied: no stored head
    assert (out / "generation_config.json").exists()
    with open(out / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"


def test_config_spellings_of_transformers_4_and_5_agree():
    with open(os.path.join(fixture("llama_tied_sharded"), "config.json")) as f:
        v5 = json.load(f)
    v4 = {k: v for k, v in v5.items() if k not in ("dtype", "rope_parameters")}
    v4.update(torch_dtype=v5["dtype"], rope_theta=v5["rope_parameters"]["rope_theta"])
    assert lm.LMConfig.from_hf(v4) == lm.LMConfig.from_hf(v5)
    assert lm.LMConfig.from_hf(v5).rope_theta == 500000.0


def test_keys_left_out_take_transformers_defaults():
    # MistralConfig and Qwen2Config default to sliding_window=4096 and max_window_layers=28;
    # max_position_embeddings: Llama 2048, Mistral 131072, Qwen2 32768.
    hf = {
        "model_type": "mistral",
        "vocab_size": 8,
        "hidden_size": 8,
        "num_hidden_layers": 30,
        "num_attention_heads": 2,
        "intermediate_size": 8,
    }
    assert lm.LMConfig.from_hf(hf).sliding_windows == (4096,) * 30
    assert lm.LMConfig.from_hf(hf).max_len == 131072
    assert lm.LMConfig.from_hf({**hf, "model_type": "llama"}).max_len == 2048
    assert lm.LMConfig.from_hf({**hf, "sliding_window": None}).sliding_windows == (None,) * 30
    qwen2 = {**hf, "model_type": "qwen2"}
    assert lm.LMConfig.from_hf(qwen2).sliding_windows == (None,) * 30
    assert lm.LMConfig.from_hf(qwen2).max_len == 32768
    windows = lm.LMConfig.from_hf({**qwen2, "use_sliding_window": True}).sliding_windows
    assert windows == (None,) * 28 + (4096,) * 2
    # Qwen2's window needs use_sliding_window, also where layer_types name sliding layers.
    typed = {**qwen2, "layer_types": ["full_attention", "sliding_attention"] * 15}
    assert lm.LMConfig.from_hf(typed).sliding_windows == (None,) * 30
    windows = lm.LMConfig.from_hf({**typed, "use_sliding_window": True}).sliding_windows
    assert windows == (None, 4096) * 15


def test_llama3_rope_frequencies_match_transformers():
    # Written once by transformers' ROPE_INIT_FUNCTIONS["llama3"] for this config.
    expected = [1.0, 0.44036662578582764, 0.07940301299095154, 0.010674637742340565,
                0.004700753837823868, 0.0020700551103800535, 0.0009115831344388425,
                0.00040143076330423355, 0.00017677668074611574, 7.784655463183299e-05,
                3.428102354519069e-05, 1.5096217794052791e-05, 6.647869668086059e-06,
                2.927499735960737e-06, 1.289173155782919e-06, 5.677088097399974e-07]  # fmt: skip
    hf = {
        "model_type": "llama",
        "vocab_size": 8,
        "hidden_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 8,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    }
    freqs = lm.rope_frequencies(lm.LMConfig.from_hf(hf))
    np.testing.assert_allclose(freqs, expected, rtol=1e-6)


def test_unsupported_architectures_are_named():
    with pytest.raises(lm.UnsupportedModelError) as e:
        lm.LMConfig.from_hf({"model_type": "bert"})
    assert str(e.value) == "unsupported model_type 'bert'; supported: gpt2, llama, mistral, qwen2"
    hf = hc.read_config(fixture("llama"))
    with pytest.raises(lm.UnsupportedModelError) as e:
        lm.LMConfig.from_hf({**hf, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}})
    assert str(e.value) == "unsupported rope_type 'yarn'; supported: default, llama3"


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        hc.load(str(tmp_path / "nope"))
    assert str(e.value) == f"checkpoint directory not found: {tmp_path / 'nope'}"
    shutil.copy(os.path.join(fixture("llama"), "config.json"), tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        hc.load(str(tmp_path))
    assert str(e.value) == (
        f"checkpoint file not found: {tmp_path / 'model.safetensors'} "
        f"(nor a sharded index {tmp_path / hc.INDEX_FILE})"
    )
    sharded = tmp_path / "sharded"
    shutil.copytree(fixture("llama_tied_sharded"), sharded)
    os.remove(sharded / "model-00002-of-00004.safetensors")
    with pytest.raises(FileNotFoundError) as e:
        hc.load(str(sharded))
    assert str(e.value) == (
        f"checkpoint file not found: {sharded / 'model-00002-of-00004.safetensors'}"
    )


def test_tensors_that_do_not_match_the_config_are_all_reported(tmp_path):
    shutil.copytree(fixture("llama"), tmp_path / "m")
    with open(tmp_path / "m" / "config.json") as f:
        hf = json.load(f)
    hf["intermediate_size"] = 96  # the stored MLP weights are 128 wide
    hf["tie_word_embeddings"] = True  # then lm_head.weight is ignored, not an error
    with open(tmp_path / "m" / "config.json", "w") as f:
        json.dump(hf, f)
    with pytest.raises(ValueError) as e:
        hc.load(str(tmp_path / "m"))
    message = str(e.value)
    assert message.startswith(f"checkpoint {tmp_path / 'm'} does not match its config.json: ")
    assert message.count("has shape") == 6  # gate/up/down in each of 2 layers
    assert "unexpected" not in message
    assert (
        "tensor 'model.layers.0.mlp.down_proj.weight' has shape [64, 128], expected [64, 96]"
        in (message)
    )


def test_models_that_differ_are_refused_naming_the_difference():
    with pytest.raises(ValueError) as e:
        hc.check_compatible([fixture("llama"), fixture("mistral")])
    assert str(e.value) == (
        f"models differ in config field 'model_type': 'llama' in {fixture('llama')} "
        f"but 'mistral' in {fixture('mistral')}"
    )
    with pytest.raises(ValueError) as e:
        hc.check_compatible([fixture("llama"), fixture("llama_tied_sharded")])
    assert str(e.value) == (
        f"models differ in config field 'tie_embeddings': False in {fixture('llama')} "
        f"but True in {fixture('llama_tied_sharded')}"
    )


def test_generation_takes_the_parameters_as_arguments_and_stops_at_eos():
    config, params = hc.load(fixture("llama"), "float32")
    g = golden("llama")
    model = lm.LanguageModel(config)
    step = jax.tree_util.Partial(lambda p, t, c, i: model.apply({"params": p}, t, c, i), params)
    prompt, new = jnp.asarray(g["prompt_ids"]), g["greedy_ids"].shape[1] - g["prompt_ids"].shape[1]
    cache = lm.init_cache(config, 1, g["greedy_ids"].shape[1])
    # Every parameter is an input of the compiled program (not a constant folded into it).
    lowered = decoding.generate.lower(step, cache, prompt, new, jax.random.key(0))
    args = jax.tree.leaves(lowered.args_info)
    assert len(args) == len(jax.tree.leaves((params, cache, prompt, jax.random.key(0))))
    # Ended at transformers' third new token: the rest holds that token, as transformers pads.
    greedy = g["greedy_ids"][0, prompt.shape[1] :].tolist()
    eos = greedy[2]
    end = greedy.index(eos)
    out = decoding.generate(step, cache, prompt, new, jax.random.key(0), eos_ids=(eos, 999))
    expected = greedy[: end + 1] + [eos] * (new - end - 1)
    assert np.asarray(out)[0, prompt.shape[1] :].tolist() == expected
    assert expected != greedy  # the stop changed something


def test_eos_ids_come_from_the_generation_config_then_config(tmp_path):
    assert hc.eos_token_ids(fixture("llama")) == (257,)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [3, 4]}))
    assert hc.eos_token_ids(str(tmp_path)) == (3, 4)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert hc.eos_token_ids(str(tmp_path)) == (5,)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "generation_config.json").write_text("{}")
    assert hc.eos_token_ids(str(tmp_path)) == ()


def test_saving_over_a_checkpoint_leaves_none_of_its_weight_files(tmp_path):
    hf = hc.read_config(fixture("llama_tied_sharded"))
    _, params = hc.load(fixture("llama_tied_sharded"))
    doubled = jax.tree.map(lambda x: x * 2, params)
    target = tmp_path / "m"
    shutil.copytree(fixture("llama_tied_sharded"), target)
    hc.save(doubled, hf, str(target))  # one file over four shards and their index
    assert sorted(f for f in os.listdir(target) if "safetensors" in f) == ["model.safetensors"]
    loaded = hc.load(str(target))[1]
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(doubled), strict=True):
        np.testing.assert_array_equal(a, b)
    hc.save(params, hf, str(target), max_shard_size="20KB")  # shards over the one file
    assert "model.safetensors" not in os.listdir(target)
    loaded = hc.load(str(target))[1]
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_folder_with_both_a_single_file_and_an_index_reads_the_single_file(tmp_path):
    # transformers looks for model.safetensors first; reading the index would load other weights.
    hf = hc.read_config(fixture("llama_tied_sharded"))
    _, params = hc.load(fixture("llama_tied_sharded"))
    hc.save(jax.tree.map(lambda x: x * 2, params), hf, str(tmp_path / "single"))
    both = tmp_path / "both"
    shutil.copytree(fixture("llama_tied_sharded"), both)
    shutil.copy(tmp_path / "single" / "model.safetensors", both)
    assert set(hc.tensor_files(str(both)).values()) == {str(both / "model.safetensors")}


def test_untied_gpt2_is_refused():
    hf = hc.read_config(fixture("gpt2"))
    assert lm.LMConfig.from_hf(hf).tie_embeddings
    with pytest.raises(lm.UnsupportedModelError) as e:
        lm.LMConfig.from_hf({**hf, "tie_word_embeddings": False})
    assert str(e.value) == "unsupported GPT-2 option tie_word_embeddings=false"
