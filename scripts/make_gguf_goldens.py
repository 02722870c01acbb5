"""Goldens for GGUF reading, written by transformers' own GGUF loader (DEV-ONLY).

Needs PyTorch, transformers and sentencepiece, which are NOT dependencies of fusion_jax: install
them in a scratch environment only, never in requirements.txt or CI:

    python -m venv /tmp/scratch
    /tmp/scratch/bin/pip install torch==2.13.0 transformers accelerate gguf==0.19.0 sentencepiece

Usage (from the repository root, after `python main.py --mode=fetch --model=smollm2`):

    /tmp/scratch/bin/python scripts/make_gguf_goldens.py --gguf PATH.gguf
        writes tests/fixtures/smollm2/golden.json and golden.npz, and the tiny SentencePiece
        fixture tests/fixtures/gguf_spm/ (tokenizer.gguf and golden.json);
    /tmp/scratch/bin/python scripts/make_gguf_goldens.py --check OUR.gguf_or_folder
        loads a file or folder that fusion_jax wrote in transformers and prints the largest
        logit difference from the goldens (exit 1 above --tolerance).

SmolLM2 goldens, all from `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained(folder,
gguf_file=...)` in float32 (transformers dequantizes the Q4_1/Q8_0 tensors itself):
  golden.json  "strings" and their "ids" (German, Spanish, Italian and English fortunes, Python
               source, whitespace runs, digits, emoji, the chat template applied), "prompts"
               (token ids of three prompts), "greedy" (40 tokens after each prompt, argmax).
  golden.npz   top32_values / top32_indices [3, T, 32]: the 32 largest logits at every position.
The SentencePiece fixture is a 600-piece BPE model trained here on a few fortunes, written as the
`llama` tokenizer of a GGUF file, with transformers' ids for a list of strings.
"""

import argparse
import glob
import json
import os
import sys

import numpy as np

FORTUNES = "/usr/share/games/fortunes"
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")


def records(folder: str, n: int, max_chars: int = 160) -> list[str]:
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "*"))):
        if path.endswith((".dat", ".u8")) or not os.path.isfile(path) or os.path.islink(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for rec in f.read().split("\n%\n"):
                rec = rec.strip()
                if 10 < len(rec) <= max_chars:
                    out.append(rec)
                if len(out) >= n:
                    return out
    return out


def test_strings() -> list[str]:
    strings = []
    for sub in ("", "de", "es", "it"):
        strings += records(os.path.join(FORTUNES, sub), 60)
    import inspect
    import json as json_module

    source = inspect.getsource(json_module).splitlines()
    strings += ["\n".join(source[i : i + 4]) for i in range(0, 240, 4)]
    strings += [
        "", " ", "  ", "\t\t", "\n\n\n", "a  b   c    d", "   leading and trailing   ",
        "2024-12-04 12:34:56", "π ≈ 3.14159265358979", "x = 1_000_000 + 0xFF", "😀🙂🚀 emoji",
        "naïve café Ünïcödé straße ñandú perché", "<|im_start|>user\nhi<|im_end|>",
        "<|endoftext|>", "C'è l'anno; l'ha detto: «sì»", "ÄÖÜäöüß", "tab\tnew\nline\r\nend",
    ]  # fmt: skip
    return strings


def write_smollm2(gguf_path: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    strings = test_strings()
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Wie spät ist es?"}], tokenize=False,
        add_generation_prompt=True,
    )  # fmt: skip
    strings.append(chat)
    ids = [tok(s)["input_ids"] for s in strings]
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    prompts_text = [
        "Der schnellste Weg nach Berlin ist",
        'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
        chat,
    ]
    prompts = [tok(p)["input_ids"] for p in prompts_text]
    greedy, values, indices = [], [], []
    length = max(len(p) for p in prompts) + 40
    for p in prompts:
        x = torch.tensor([p])
        with torch.no_grad():
            out = model.generate(x, do_sample=False, max_new_tokens=40, min_new_tokens=40)
            full = out[0].tolist()
            logits = model(torch.tensor([full])).logits[0].float().numpy()
        greedy.append(full[len(p) :])
        top = np.argsort(-logits, axis=-1)[:, :32]
        pad = length - len(full)
        values.append(np.pad(np.take_along_axis(logits, top, -1), ((0, pad), (0, 0))))
        indices.append(np.pad(top, ((0, pad), (0, 0)), constant_values=-1))
    out_dir = os.path.join(OUT, "smollm2")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "golden.json"), "w", encoding="utf-8") as f:
        json.dump({"strings": strings, "ids": ids, "prompts": prompts, "greedy": greedy,
                   "transformers": __import__("transformers").__version__,
                   "torch": torch.__version__}, f, ensure_ascii=False)  # fmt: skip
    np.savez_compressed(
        os.path.join(out_dir, "golden.npz"),
        top32_values=np.stack(values).astype(np.float32),
        top32_indices=np.stack(indices).astype(np.int32),
    )
    print("wrote", out_dir, len(strings), "strings")


def write_spm_fixture() -> None:
    """A tiny SentencePiece BPE vocabulary as a GGUF `llama` tokenizer, with transformers' ids."""
    import tempfile

    import gguf
    import sentencepiece as spm
    from transformers import AutoTokenizer

    text = records(FORTUNES, 400, 400) + records(os.path.join(FORTUNES, "de"), 200, 400)
    tmp = tempfile.mkdtemp()
    with open(os.path.join(tmp, "corpus.txt"), "w") as f:
        f.write("\n".join(text))
    spm.SentencePieceTrainer.train(
        input=os.path.join(tmp, "corpus.txt"), model_prefix=os.path.join(tmp, "m"),
        vocab_size=600, model_type="bpe", byte_fallback=True, character_coverage=0.995,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
    )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_file=os.path.join(tmp, "m.model"))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    scores = [sp.get_score(i) for i in range(sp.get_piece_size())]
    # llama.cpp's token types: 1 normal, 2 unknown, 3 control, 6 byte.
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
             for i in range(sp.get_piece_size())]  # fmt: skip
    out_dir = os.path.join(OUT, "gguf_spm")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_tensor("token_embd.weight", np.zeros((len(pieces), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = AutoTokenizer.from_pretrained(out_dir, gguf_file="tokenizer.gguf")
    strings = [s for s in test_strings() if "<|" not in s][:200]
    ids = [tok(s)["input_ids"] for s in strings]
    decoded = [tok.decode(i, skip_special_tokens=True) for i in ids]
    with open(os.path.join(out_dir, "golden.json"), "w", encoding="utf-8") as f:
        json.dump({"strings": strings, "ids": ids, "decoded": decoded}, f, ensure_ascii=False)
    print("wrote", out_dir)


def check(path: str, tolerance: float) -> int:
    """transformers loads `path` (a GGUF file or a folder) and reproduces the goldens' logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(os.path.join(OUT, "smollm2", "golden.json"), encoding="utf-8") as f:
        golden = json.load(f)
    ref = np.load(os.path.join(OUT, "smollm2", "golden.npz"))
    if path.endswith(".gguf"):
        folder, name = os.path.split(os.path.abspath(path))
        kwargs = {"gguf_file": name}
    else:
        folder, kwargs = path, {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    differ = [s for s, i in zip(golden["strings"], golden["ids"], strict=True)
              if tok(s)["input_ids"] != i]  # fmt: skip
    worst = 0.0
    for p, g, vals, idx in zip(golden["prompts"], golden["greedy"], ref["top32_values"],
                               ref["top32_indices"], strict=True):  # fmt: skip
        full = p + g
        with torch.no_grad():
            logits = model(torch.tensor([full])).logits[0].float().numpy()
        n = len(full)
        got = np.take_along_axis(logits, idx[:n], -1)
        worst = max(worst, float(np.abs(got - vals[:n]).max()))
    print(f"{path}: {len(golden['strings']) - len(differ)} of {len(golden['strings'])} strings "
          f"tokenized as the goldens (others: {[d[:40] for d in differ[:3]]}); max |logit - "
          f"golden| over the top 32 at every position: {worst:.3g}")  # fmt: skip
    return 0 if worst <= tolerance and not differ else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", help="the SmolLM2 GGUF file (python main.py --mode=fetch)")
    parser.add_argument("--check", help="a GGUF file or folder written by fusion_jax")
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--spm-only", action="store_true", help="rewrite only gguf_spm/")
    args = parser.parse_args()
    if args.check:
        return check(args.check, args.tolerance)
    if not args.gguf and not args.spm_only:
        parser.error("--gguf or --check is required")
    if not args.spm_only:
        write_smollm2(args.gguf)
    write_spm_fixture()
    return 0


if __name__ == "__main__":
    sys.exit(main())
