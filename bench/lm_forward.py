"""Benchmark: the language model's forward pass (tokens -> logits) against the matmul rate.

    python bench/lm_forward.py [--models llama,gpt2] [--batch 4] [--seq 512] [--repeats 5]
        [--dtype float32] [--matmul_precision highest]
    python bench/lm_forward.py --models smollm2 --batch 8 --seq 256 --train \
        --torch /tmp/scratch/bin/python          # beside transformers' PyTorch, same run

Models (`LanguageModel` from fusion_jax/models/lm.py):
* llama: a small untied Llama, hidden 512, 8 layers, 8 heads, intermediate 1536, vocab 32000
  (60.0M parameters), random weights;
* gpt2: GPT-2 small's shape, hidden 768, 12 layers, 12 heads, vocab 50257, tied head (124.4M),
  random weights;
* smollm2: the real SmolLM2-135M (fetched GGUF, dequantized to float32; 30 layers, tied head).

`--train` also times one training step (forward, next-token cross-entropy, backward, Adam) and
its rate counted as 3x the forward FLOPs. `--torch PYTHON` runs bench/torch_lm_step.py with that
interpreter (a scratch venv with torch and transformers, never this project's dependencies) on
the smollm2 GGUF file at the same batch and length, and prints its forward and training step
beside ours, with ours / torch's tokens per second.

Prints ms per jitted forward (median of `--repeats` after one compile and one warm-up call),
tokens/s, and the achieved rate counted analytically:

    FLOPs = 2 * N_matmul * B * T  +  num_layers * B * 4 * T^2 * d_attn

where N_matmul is every Dense kernel's size plus the output head (the tied embedding for GPT-2;
token/position lookups and norms are not counted), and 4 * T^2 * d_attn is the scores (Q K^T) and
the weighted sum (P V) over the full T x T matrix per layer (the model computes it all and masks;
d_attn = heads * head_dim). The rate is also shown over the fp32 matmul rate (1024^3) measured in
the same run, and next to XLA's own count (`compiled.cost_analysis()["flops"]`) where available.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from train_step import matmul_flops_per_s, median_time  # noqa: E402  (bench/ is on sys.path)

from fusion_jax import hf_checkpoint, pretrained  # noqa: E402
from fusion_jax.models.lm import LanguageModel, LMConfig  # noqa: E402

PRESETS = {
    "llama": {
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "intermediate_size": 1536,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "torch_dtype": "float32",
    },
    "gpt2": {
        "model_type": "gpt2",
        "vocab_size": 50257,
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
        "n_positions": 1024,
        "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new",
        "torch_dtype": "float32",
    },
}


def train_step_fn(model, learning_rate=1e-5):
    """(optimizer, jitted step `(params, opt_state, tokens [B, T+1]) -> (params, opt_state,
    loss)`): next-token cross-entropy, Adam."""
    import optax

    tx = optax.adam(learning_rate)

    def loss_fn(params, tokens):
        logits = model.apply({"params": params}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return tx, jax.jit(step)


def torch_times(python: str, gguf: str, batch: int, seq: int, repeats: int) -> dict:
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_lm_step.py")
    cmd = [python, script, "--gguf", gguf, "--batch", str(batch), "--seq", str(seq),
           "--repeats", str(repeats)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: {script} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def analytic_flops(config: LMConfig, params, batch: int, seq: int) -> tuple[float, int, int]:
    """(forward FLOPs, matmul parameters, all parameters) by the formula in the docstring."""
    leaves = jax.tree.leaves_with_path(params)
    total = sum(int(np.prod(x.shape)) for _, x in leaves)
    matmul = sum(int(np.prod(x.shape)) for p, x in leaves if p[-1].key == "kernel")
    if config.tie_embeddings:
        matmul += config.vocab_size * config.dim  # the head reuses the token embedding
    d_attn = config.num_heads * config.head_dim
    attention = config.num_layers * batch * 4 * seq * seq * d_attn
    return 2 * matmul * batch * seq + attention, matmul, total


def xla_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend or version reports costs
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="llama,gpt2",
                        help=f"from {', '.join([*PRESETS, 'smollm2'])}")  # fmt: skip
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", help="activation dtype (params stay fp32)")
    parser.add_argument("--matmul_precision", default="highest", choices=("highest", "high",
                        "default"), help="the model's and the yardstick's")  # fmt: skip
    parser.add_argument("--train", action="store_true", help="also time a training step")
    parser.add_argument("--torch", help="a python with torch+transformers: time smollm2 there")
    args = parser.parse_args()
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown := [m for m in names if m not in (*PRESETS, "smollm2")]:
        parser.error(f"unknown model {unknown[0]!r}; known: {', '.join([*PRESETS, 'smollm2'])}")

    matmul = matmul_flops_per_s(args.matmul_precision)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"batch {args.batch} x seq {args.seq}, activations {args.dtype}")  # fmt: skip
    print(f"fp32 matmul (1024^3, precision {args.matmul_precision}): {matmul / 1e9:.1f} GFLOP/s")
    rows, train_rows, torch_rows = [], [], {}
    tokens = jax.random.randint(jax.random.key(2), (args.batch, args.seq + 1), 0, 256, jnp.int32)
    for name in names:
        if name == "smollm2":
            gguf = pretrained.fetch("smollm2")
            config, params = hf_checkpoint.load(gguf, "float32")
            config = dataclasses.replace(config, dtype=args.dtype)
        else:
            config = LMConfig.from_hf(PRESETS[name], dtype=args.dtype)
        config = dataclasses.replace(config, matmul_precision=args.matmul_precision)
        model = LanguageModel(config)
        if name != "smollm2":
            params = jax.jit(model.init)(jax.random.key(0), tokens[:1, :8])["params"]
        params = jax.tree.map(jnp.asarray, params)
        flops, n_matmul, n_total = analytic_flops(config, params, args.batch, args.seq)
        forward = jax.jit(lambda p, t, model=model: model.apply({"params": p}, t))
        tic = time.perf_counter()
        compiled = forward.lower(params, tokens[:, :-1]).compile()
        compile_s = time.perf_counter() - tic
        seconds = median_time(compiled, params, tokens[:, :-1], repeats=args.repeats)
        rows.append((name, n_total, n_matmul, seconds, flops, xla_flops(compiled), compile_s))
        if args.train:
            tx, step = train_step_fn(model)
            opt_state = tx.init(params)
            train_s = median_time(step, params, opt_state, tokens, repeats=args.repeats)
            train_rows.append((name, train_s, 3 * flops))
        if args.torch and name == "smollm2":
            torch_rows[name] = torch_times(args.torch, gguf, args.batch, args.seq, args.repeats)
        del params

    print(f"{'model':<7}{'params M':>9}{'matmul M':>9}{'ms/fwd':>9}{'tokens/s':>10}"
          f"{'GFLOP':>8}{'XLA GFLOP':>10}{'GFLOP/s':>9}{'ratio':>7}{'compile s':>10}")  # fmt: skip
    for name, n_total, n_matmul, seconds, flops, xla, compile_s in rows:
        xla_s = f"{xla / 1e9:>10.1f}" if xla else f"{'-':>10}"
        rate = flops / seconds
        print(f"{name:<7}{n_total / 1e6:>9.1f}{n_matmul / 1e6:>9.1f}{seconds * 1e3:>9.0f}"
              f"{args.batch * args.seq / seconds:>10.0f}{flops / 1e9:>8.1f}{xla_s}"
              f"{rate / 1e9:>9.1f}{rate / matmul:>7.2f}{compile_s:>10.1f}")  # fmt: skip
    print("GFLOP: 2 * matmul params * tokens + layers * B * 4 * T^2 * d (full T x T attention);")
    print("GFLOP/s and ratio (to the fp32 matmul rate above) use that analytic count.")
    tokens_per_call = args.batch * args.seq
    if train_rows:
        print(f"{'train step':<11}{'ms/step':>9}{'tokens/s':>10}{'GFLOP/s':>9}{'ratio':>7}")
        for name, seconds, flops in train_rows:
            print(f"{name:<11}{seconds * 1e3:>9.0f}{tokens_per_call / seconds:>10.0f}"
                  f"{flops / seconds / 1e9:>9.1f}{flops / seconds / matmul:>7.2f}")  # fmt: skip
        print("train-step FLOPs counted as 3x the forward's.")
    for name, t in torch_rows.items():
        ours_fwd = next(r[3] for r in rows if r[0] == name)
        ours_train = next((r[1] for r in train_rows if r[0] == name), None)
        train = f"{tokens_per_call / t['train_s']:.0f} tokens/s"
        if ours_train:
            train += f" (ours / torch {t['train_s'] / ours_train:.2f}x)"
        print(f"PyTorch {t['torch']} ({t['threads']} threads), transformers' GGUF loader, {name}: "
              f"forward {tokens_per_call / t['forward_s']:.0f} tokens/s (ours / torch "
              f"{t['forward_s'] / ours_fwd:.2f}x), train step {train}")  # fmt: skip


if __name__ == "__main__":
    main()
