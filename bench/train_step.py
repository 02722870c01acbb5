"""Benchmark: the baseline train step on this device, against this device's matmul rate.

    python bench/train_step.py [--seeds 1] [--steps 200] [--task x_plus_y]

Prints ms per update, the achieved rate counted with the reference's FLOPs (full sequence in
every block and the head at every position, forward + backward = 3x forward), and its ratio to
the fp32 matmul rate this script measures on the same device in the same run. It also prints a
breakdown (forward, forward+backward, full step) with and without `last_position_only`.
Timings are medians of repeated runs after one compile, so the ratio survives a noisy machine.
"""

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import baseline  # noqa: E402
from fusion_jax.train import loop, steps  # noqa: E402


def median_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def matmul_flops_per_s(precision: str, n: int = 1024, repeats: int = 10) -> float:
    """fp32 rate of a square matmul at the benchmarked model's matmul precision (on GPUs and
    TPUs "highest" is several times slower than "default"), the yardstick for this device."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    with jax.default_matmul_precision(precision):
        f = jax.jit(lambda a, b: a @ b).lower(a, b).compile()
    return 2 * n**3 / median_time(f, a, b, repeats=repeats)


def reference_flops_per_example(cfg, seq_len: int = 4) -> float:
    """Forward FLOPs of the reference model: every block and the head at every position."""
    d, s = cfg.dim, seq_len
    per_token_block = 2 * d * (3 * d) + 2 * d * d + 2 * 2 * d * (cfg.mlp_ratio * d)
    attention = 2 * 2 * s * s * d  # scores and weighted sum, full s x s per block
    head = 2 * d * cfg.num_classes * s
    return cfg.num_layers * (s * per_token_block + attention) + head


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=100, help="updates per timed program")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--task", default="x_plus_y")
    args = parser.parse_args()

    config = baseline.get_config()
    config.tasks, config.num_seeds, config.data.source = args.task, args.seeds, "algebra"
    setup = loop.setup_task(config, args.task)
    cfg = loop.step_config(config, num_devices=1)
    batch = config.train.batch_size
    state = setup.init_runs()
    data = setup.data.train
    matmul = matmul_flops_per_s(config.model.matmul_precision)
    ref_flops = 3 * reference_flops_per_example(setup.model.config) * batch * args.seeds

    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"{args.seeds} seed(s), batch {batch}, {args.steps} updates per program")  # fmt: skip
    print(f"fp32 matmul (1024^3, precision {config.model.matmul_precision}): "
          f"{matmul / 1e9:.1f} GFLOP/s")  # fmt: skip
    print(f"reference FLOPs per update: {ref_flops / 1e9:.3f} GFLOP")
    print(f"{'variant':<34}{'ms/update':>10}{'GFLOP/s*':>10}{'ratio':>8}")
    tokens = jnp.asarray(data.inputs[:, :batch])
    labels = jnp.asarray(data.labels[:, :batch])
    for last_only in (True, False):
        model = dataclasses.replace(setup.model.config, last_position_only=last_only)
        model = type(setup.model)(model)
        apply_fn = steps.model_apply_fn(model)

        def loss(p, x, y, apply_fn=apply_fn):
            return jnp.mean(steps.cross_entropy(apply_fn(p, x)[0], y))

        fwd = jax.jit(jax.vmap(loss))
        grad = jax.jit(jax.vmap(jax.grad(loss)))

        def train(state, data, keys, apply_fn=apply_fn):
            def one(s, d, k):
                return steps.train_steps(
                    s, d, k, args.steps, apply_fn=apply_fn, tx=setup.tx, cfg=cfg, axis_name=None
                )

            return jax.vmap(one)(state, data, keys)

        train = jax.jit(train)
        tag = "last-position" if last_only else "full-sequence"
        rows = [
            (f"forward ({tag})", median_time(fwd, state.params, tokens, labels,
                                             repeats=args.repeats * 4), 1 / 3),
            (f"forward+backward ({tag})", median_time(grad, state.params, tokens, labels,
                                                      repeats=args.repeats * 4), 1.0),
            (f"train step ({tag})", median_time(train, state, data, setup.run_keys,
                                                repeats=args.repeats) / args.steps, 1.0),
        ]  # fmt: skip
        for name, seconds, share in rows:
            rate = share * ref_flops / seconds
            print(f"{name:<34}{seconds * 1e3:>10.2f}{rate / 1e9:>10.1f}{rate / matmul:>8.2f}")
    print("* GFLOP/s counts the reference's FLOPs (forward rows: one third of an update's).")


if __name__ == "__main__":
    main()
