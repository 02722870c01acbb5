"""Write tiny random Hugging Face LM checkpoints and their golden outputs (DEV-ONLY).

This script is a development tool. It needs PyTorch and Hugging Face transformers, which are NOT
dependencies of fusion_jax: install them in a scratch environment only, e.g.

    python -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.13.0 transformers

and never add them to requirements.txt or CI. The JAX tests read the files this script writes
(tests/fixtures/lm/<name>/) and compare against them without torch.

Usage (from the repository root):

    /tmp/torchenv/bin/python scripts/make_lm_goldens.py              # writes tests/fixtures/lm
    /tmp/torchenv/bin/python scripts/make_lm_goldens.py --out DIR    # somewhere else
    /tmp/torchenv/bin/python scripts/make_lm_goldens.py --only gpt2 llama

    # Check that a checkpoint (e.g. one written by fusion_jax) loads in transformers and reproduces
    # a fixture's golden logits; exits 1 if the max abs difference exceeds 1e-4:
    /tmp/torchenv/bin/python scripts/make_lm_goldens.py --check DIR --golden tests/fixtures/lm/gpt2

Nothing is downloaded: every model is built from a config object with a seeded random init whose
scale is raised (weights std 0.2, biases std 0.1, norm scales 1 + 0.1 * noise) so that logits are
far from zero and any conversion error is visible.

Each fixture folder holds what `save_pretrained` writes (config.json, generation_config.json,
model.safetensors or shards + model.safetensors.index.json) and `golden.npz` with
  input_ids  int32 [2, 12]      fixed ids in [0, 256)
  logits     float32 [2, 12, V] forward logits in float32 (eval, eager attention, no mask)
  prompt_ids int32 [1, 5]
  greedy_ids int32 [1, 13]      generate(do_sample=False, max_new_tokens=8, min_new_tokens=8):
                                prompt + 8 new tokens; verified equal to a plain argmax loop.
Goldens are always computed from the files on disk, reloaded in float32 (so fp16/bf16 fixtures
give "low-precision weights, fp32 compute").
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "lm"

VOCAB = 260  # 256 bytes + 4 specials
BOS, EOS, PAD, UNK = 256, 257, 258, 259
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"]  # ids 256..259
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE = 64, 2, 4, 2, 128
MAX_POS = 64
NEW_TOKENS = 8
CHECK_TOL = 1e-4

WEIGHT_STD, BIAS_STD, NORM_STD = 0.2, 0.1, 0.1


def golden_inputs() -> tuple[np.ndarray, np.ndarray]:
    """Fixed, deterministic token ids (numpy's PCG64 stream is stable across versions)."""
    rng = np.random.default_rng(20240607)
    input_ids = rng.integers(0, 256, size=(2, 12)).astype(np.int32)
    prompt_ids = rng.integers(0, 256, size=(1, 5)).astype(np.int32)
    return input_ids, prompt_ids


def special_ids() -> dict:
    return {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Re-initialise every parameter from a seeded generator with a raised scale.

    2-D tensors (linear / embedding weights) ~ N(0, 0.2); 1-D `.bias` ~ N(0, 0.1) (so Qwen2's q/k/v
    and GPT-2's biases are non-zero); 1-D `.weight` (LayerNorm / RMSNorm scales) ~ 1 + N(0, 0.1).
    Tied parameters appear once in named_parameters(), so ties are preserved.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if param.ndim >= 2:
                value = WEIGHT_STD * noise
            elif name.endswith(".bias"):
                value = BIAS_STD * noise
            elif name.endswith(".weight"):
                value = 1.0 + NORM_STD * noise
            else:
                raise ValueError(f"unexpected parameter {name} {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))


# ----------------------------------------------------------------------------- model builders


def build_gpt2() -> torch.nn.Module:
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=MAX_POS,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_inner=INTERMEDIATE,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
        **special_ids(),
    )
    return GPT2LMHeadModel(config)


def llama_config(tied: bool, theta: float) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POS,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        tie_word_embeddings=tied,
        **special_ids(),
    )


def build_llama() -> torch.nn.Module:
    return LlamaForCausalLM(llama_config(tied=False, theta=10000.0))


def build_llama_tied() -> torch.nn.Module:
    return LlamaForCausalLM(llama_config(tied=True, theta=500000.0))


def build_mistral(sliding_window: int | None = 4) -> torch.nn.Module:
    config = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=16,
        max_position_embeddings=MAX_POS,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        sliding_window=sliding_window,
        tie_word_embeddings=False,
        **special_ids(),
    )
    return MistralForCausalLM(config)


def build_qwen2() -> torch.nn.Module:
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POS,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        use_sliding_window=False,
        tie_word_embeddings=True,
        **special_ids(),
    )
    return Qwen2ForCausalLM(config)


# name -> (builder, seed, stored dtype, save_pretrained max_shard_size, write tokenizer)
FIXTURES = {
    "gpt2": (build_gpt2, 1, torch.float32, None, False),
    "gpt2_fp16": (build_gpt2, 1, torch.float16, None, False),  # same seed => same weights
    "llama": (build_llama, 3, torch.float32, None, False),
    "llama_tied_sharded": (build_llama_tied, 4, torch.bfloat16, "50KB", True),
    "mistral": (build_mistral, 5, torch.float32, None, False),
    "qwen2": (build_qwen2, 6, torch.float32, None, False),
}


def make_model(name: str, **kwargs) -> torch.nn.Module:
    builder, seed, _, _, _ = FIXTURES[name]
    torch.manual_seed(seed)
    model = builder(**kwargs)
    model.config._attn_implementation = "eager"  # not serialised; set again at load time
    randomize(model, seed)
    return model.eval()


# ----------------------------------------------------------------------------- tokenizer


def byte_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: printable bytes map to themselves, the rest to U+0100..."""
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("¡"), ord("¬") + 1))
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def write_tokenizer(folder: Path) -> None:
    """Byte-level BPE with no merges: token id == byte value, specials 256..259."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: b for b, char in byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    assert tok.get_vocab_size() == VOCAB
    text = "Grüße, fusion!"
    ids = tok.encode(text).ids
    assert ids == list(text.encode("utf-8")), ids
    assert tok.token_to_id("<|eos|>") == EOS
    tok.save(str(folder / "tokenizer.json"))
    # Written by hand (not via transformers' save_pretrained, whose v5 class name
    # "TokenizersBackend" is unknown to transformers 4.x); "PreTrainedTokenizerFast" loads in both.
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1],
        "pad_token": SPECIAL_TOKENS[2],
        "unk_token": SPECIAL_TOKENS[3],
        "model_max_length": MAX_POS,
        "clean_up_tokenization_spaces": False,
    }
    with open(folder / "tokenizer_config.json", "w") as f:
        json.dump(tokenizer_config, f, indent=2, sort_keys=True)
        f.write("\n")
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert loaded(text)["input_ids"] == list(text.encode("utf-8"))
    assert (loaded.eos_token_id, loaded.pad_token_id) == (EOS, PAD)


# ----------------------------------------------------------------------------- goldens


def load_fp32(folder: Path | str) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, attn_implementation="eager", local_files_only=True
    )
    return model.eval()


@torch.no_grad()
def forward_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    out = model(input_ids=torch.from_numpy(ids.astype(np.int64)), use_cache=False)
    return out.logits.float().numpy()


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt: np.ndarray) -> np.ndarray:
    prompt_t = torch.from_numpy(prompt.astype(np.int64))
    out = model.generate(
        prompt_t,
        attention_mask=torch.ones_like(prompt_t),
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        pad_token_id=PAD,
    )
    out = out.numpy().astype(np.int32)
    # The JAX side decodes with a plain argmax of the full-sequence forward: check they agree
    # (would fail if min_new_tokens had to suppress an eos, or the KV-cache path disagreed).
    seq = prompt.astype(np.int64)
    for _ in range(NEW_TOKENS):
        nxt = forward_logits(model, seq)[:, -1].argmax(-1)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
    assert out.shape == (1, prompt.shape[1] + NEW_TOKENS), out.shape
    assert np.array_equal(out, seq.astype(np.int32)), (out, seq)
    return out


def tensor_names(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    info = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                info[key] = (str(sl.get_dtype()), tuple(sl.get_shape()))
    return dict(sorted(info.items()))


def sliding_window_evidence(input_ids: np.ndarray) -> None:
    """Show that the eager Mistral path applies sliding_window=4 and which keys are visible."""
    model = make_model("mistral")
    full = make_model("mistral", sliding_window=None)
    full.load_state_dict(model.state_dict())
    ids = torch.from_numpy(input_ids.astype(np.int64))
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True, use_cache=False)
        ref = full(input_ids=ids, use_cache=False)
    diff = (out.logits - ref.logits).abs().amax(dim=(0, 2)).numpy()
    print("  mistral: max |logits(window=4) - logits(window=None)| per position:")
    print("   ", " ".join(f"{d:.2e}" for d in diff))
    visible = (out.attentions[0][0, 0] > 0).numpy()
    n = visible.shape[0]
    expected = np.array([[0 <= i - j < 4 for j in range(n)] for i in range(n)])
    print("  mistral layer 0 head 0 attention > 0 (row = query i, col = key j):")
    for i in range(n):
        print("    " + "".join("x" if v else "." for v in visible[i]))
    assert np.array_equal(visible, expected), "sliding-window pattern is not 0 <= i - j < 4"
    assert np.all(diff[:4] == 0) and np.all(diff[4:] > 1e-3), diff
    print("  => key j visible from query i iff 0 <= i - j < sliding_window (4)")


def write_fixture(name: str, out_root: Path) -> dict:
    _, _, dtype, shard, with_tokenizer = FIXTURES[name]
    folder = out_root / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)

    model = make_model(name)
    input_ids, prompt_ids = golden_inputs()
    in_memory = forward_logits(model, input_ids)

    kwargs = {"max_shard_size": shard} if shard else {}
    copy.deepcopy(model).to(dtype).save_pretrained(str(folder), **kwargs)
    if with_tokenizer:
        write_tokenizer(folder)
    for path in folder.iterdir():  # safetensors are written 0600; make permissions uniform
        path.chmod(0o644)

    reloaded = load_fp32(folder)
    logits = forward_logits(reloaded, input_ids)
    if dtype == torch.float32:
        assert np.array_equal(logits, in_memory), np.abs(logits - in_memory).max()
    else:
        # The reloaded weights must be exactly the low-precision values, upcast.
        sd = reloaded.state_dict()
        for key, value in model.state_dict().items():
            assert torch.equal(sd[key], value.to(dtype).float()), key
    greedy_ids = greedy(reloaded, prompt_ids)
    np.savez(
        folder / "golden.npz",
        input_ids=input_ids,
        logits=logits.astype(np.float32),
        prompt_ids=prompt_ids,
        greedy_ids=greedy_ids,
    )
    files = sorted(p.name for p in folder.iterdir())
    total = sum(p.stat().st_size for p in folder.iterdir())
    lowp = (
        ""
        if dtype == torch.float32
        else f" (vs fp32 weights: {np.abs(logits - in_memory).max():.3g})"
    )
    print(f"[{name}] logits std {logits.std():.3f}, max |logit| {np.abs(logits).max():.3f}{lowp}")
    print(f"  greedy_ids {greedy_ids.tolist()}")
    names = tensor_names(folder)
    for key, (dt, shape) in names.items():
        print(f"    {key:55s} {dt:9s} {list(shape)}")
    return {"name": name, "files": files, "bytes": total, "tensors": list(names)}


def generate_all(out_root: Path, only: list[str] | None) -> None:
    names = only or list(FIXTURES)
    for n in names:
        if n not in FIXTURES:
            raise SystemExit(f"unknown fixture {n!r}; choose from {list(FIXTURES)}")
    out_root.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    rows = []
    for n in names:
        rows.append(write_fixture(n, out_root))
        if n == "mistral":
            sliding_window_evidence(golden_inputs()[0])
    print("\nsummary")
    print(f"{'name':20s} {'bytes':>9s}  files")
    for r in rows:
        print(f"{r['name']:20s} {r['bytes']:9d}  {', '.join(r['files'])}")
    for r in rows:
        print(f"{r['name']} tensors ({len(r['tensors'])}): {', '.join(r['tensors'])}")
    grand = sum(p.stat().st_size for p in out_root.rglob("*") if p.is_file())
    print(f"total size of {out_root}: {grand} bytes ({grand / 2**20:.2f} MiB)")


def check(folder: str, golden_dir: str) -> int:
    golden = np.load(Path(golden_dir) / "golden.npz")
    model = load_fp32(folder)
    logits = forward_logits(model, golden["input_ids"])
    if logits.shape != golden["logits"].shape:
        print(f"shape mismatch: {logits.shape} vs golden {golden['logits'].shape}")
        return 1
    diff = float(np.abs(logits - golden["logits"]).max())
    print(f"max abs diff vs golden: {diff}")
    return 0 if diff <= CHECK_TOL else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixture root folder")
    parser.add_argument("--only", nargs="+", help="write only these fixtures")
    parser.add_argument("--check", metavar="DIR", help="checkpoint folder to verify")
    parser.add_argument("--golden", metavar="DIR", help="fixture folder holding golden.npz")
    args = parser.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    if args.check or args.golden:
        if not (args.check and args.golden):
            parser.error("--check and --golden go together")
        return check(args.check, args.golden)
    generate_all(args.out, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
