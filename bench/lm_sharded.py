"""Benchmark: LM fusion and DAM steps with the experts split over a mesh's `model` axis.

    python bench/lm_sharded.py [--devices 1,2,4,8] [--layers 2] [--experts 3] [--batch 4]
        [--seq 64] [--repeats 3] [--what fusion,dam]
    python bench/lm_sharded.py --fit          # the README's table: what fits on one device

The experts have the shapes of TinyLlama-1.1B (hidden 2048, intermediate 5632, 32 heads, 4
key-value heads, vocab 32000, untied head; 22 layers), cut to `--layers` layers, float32. The steps
are lm_fuse's (the gate and fusion head trained with AdamW over frozen experts) and DAM's (the
coefficients trained with Adam, `engine.dam_objective`). For each device count n, on a mesh
`model:n` (fusion_jax/mesh.py: RULES), each step is compiled ahead of time for abstract arguments
placed by the rule table, and the bench prints XLA's per-device plan (`memory_analysis()`:
arguments, temporaries), the arguments over the whole arguments' bytes, and, for the steps in
`--timed` (fusion by default), the median step time on arguments filled shard by shard (no host
copy of a model is made). DAM is not timed by default: at these shapes a DAM run on one device of
this 2-core CPU did not finish its first timed step in the 10 minutes it was given, and on 8
fake devices it hit XLA:CPU's 40 s collective rendezvous timeout (not investigated further).

`--fit` compiles one-device steps at K in {2, 3} and 1 or 2 layers only (nothing is allocated),
fits bytes = a + b K + c L + d K L (exact for arguments, which are linear in both), checks the
fit at K=4, L=3, and prints the largest K of 22-layer experts and the most layers (and
parameters) for K = 3 whose plan (arguments + temporaries + outputs not aliased to arguments)
fits in each device type's memory. The plan is XLA:CPU's: a GPU or TPU plans its own temporaries.

Without an accelerator, n fake CPU devices are made with
`XLA_FLAGS=--xla_force_host_platform_device_count` (set here before JAX starts): they share this
machine's cores and memory, so per-device memory is the figure to read; the step time shows the
cost of the collectives, not a speed-up. On a lent accelerator, n real devices.
"""

import argparse
import os
import statistics
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8")  # fmt: skip
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from fusion_jax import mesh as mesh_lib  # noqa: E402
from fusion_jax.experiments import engine, lm_fuse  # noqa: E402
from fusion_jax.merging import dam  # noqa: E402
from fusion_jax.models import lm, lm_fusion  # noqa: E402

# TinyLlama-1.1B's shapes (its config.json), less num_layers (22 there).
TINYLLAMA = {"model_type": "llama", "family": "llama", "vocab_size": 32000, "dim": 2048,
             "num_heads": 32, "num_kv_heads": 4, "head_dim": 64, "mlp_dim": 5632,
             "max_len": 2048, "norm_eps": 1e-5, "tie_embeddings": False}  # fmt: skip
FULL_LAYERS = 22
# Memory per device (GB of 1e9 bytes) of the device types the README's table covers.
DEVICES = {"CPU, this machine (24 GB)": 24, "TPU v2 core (8 GB)": 8, "TPU v3 core (16 GB)": 16,
           "GPU 16 GB": 16, "GPU 24 GB": 24, "GPU 80 GB": 80}  # fmt: skip


def config(layers: int) -> lm.LMConfig:
    return lm.LMConfig(**TINYLLAMA, num_layers=layers, sliding_windows=(None,) * layers)


def placed(tree, mesh):
    """Shape structs of `tree` (arrays or structs) carrying mesh.RULES' shardings."""
    shardings = mesh_lib.shardings(tree, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                        shardings)  # fmt: skip


def stacked_experts(cfg, k: int):
    one = jax.eval_shape(lm.LanguageModel(cfg).init, jax.random.key(0),
                         jnp.zeros((1, 1), jnp.int32))["params"]  # fmt: skip
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct((k, *s.shape), s.dtype), one)


def fusion_step(cfg, k, mesh, batch, seq):
    """(jitted step, abstract placed arguments): lm_fuse's update over frozen experts."""
    model = lm_fusion.LMFusion(lm_fusion.fusion_config(cfg, k, gate_dim=256))
    tx = optax.adamw(1e-3)

    def build(stacked):
        params = lm_fusion.init_from_experts(model, jax.random.key(0), stacked)
        frozen = {"experts": params.pop("experts")}
        return lm_fuse._initial_state(tx, params), frozen

    state, frozen = placed(jax.eval_shape(build, stacked_experts(cfg, k)), mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    tokens = jax.ShapeDtypeStruct((64, seq + 1), jnp.int32, sharding=replicated)
    mask = jax.ShapeDtypeStruct((64, seq), jnp.float32, sharding=replicated)
    setup = type("Setup", (), {"model": model})
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step = lm_fuse.train_step(setup, tx, batch, jax.random.key(0), mesh_lib.batch(mesh), shardings)
    return step, (state, frozen, tokens, mask)


def dam_step(cfg, k, mesh, batch, seq):
    """(jitted step, abstract placed arguments): DAM's update of the coefficients."""
    model = lm.LanguageModel(cfg)
    tx = optax.adam(1e-3)
    loss_fn = engine.dam_objective({}, lambda p, x: model.apply({"params": p}, x[:, :-1]),
                                   similarity="per_layer")  # fmt: skip
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    stacked = placed(stacked_experts(cfg, k), mesh)

    def build(stacked):
        coefficients = dam.init_coefficients(stacked)
        return coefficients, tx.init(coefficients)

    state = placed(jax.eval_shape(build, stacked), mesh)
    inputs = jax.ShapeDtypeStruct((k, batch, seq + 1), jnp.int32, sharding=mesh_lib.batch(mesh, 1))
    shardings = jax.tree.map(lambda x: x.sharding, state)

    @jax.jit
    def step(state, experts, inputs):
        _, grads = grad_fn(state[0], {"experts": experts}, inputs)
        updates, opt = tx.update(grads, state[1], state[0])
        return jax.lax.with_sharding_constraint((optax.apply_updates(state[0], updates), opt),
                                                shardings)  # fmt: skip

    # Timed from DAM's own start (c = 1/K, zero moments), not from random coefficients.
    step.start = lambda args: (jax.device_put(build(args[1]), shardings), *args[1:])
    return step, (state, stacked, inputs)


STEPS = {"fusion": fusion_step, "dam": dam_step}


def plan(compiled) -> dict:
    m = compiled.memory_analysis()
    return {"arguments": m.argument_size_in_bytes, "temporaries": m.temp_size_in_bytes,
            "total": m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
            - m.alias_size_in_bytes}  # fmt: skip


def filled(abstract, vocab: int):
    """Arrays for `abstract`, each shard drawn on its own (small positive floats, token ids)."""
    rng = np.random.default_rng(0)

    def one(s):
        def block(index):
            shape = tuple(len(range(*i.indices(n))) for i, n in zip(index, s.shape, strict=True))
            if jnp.issubdtype(s.dtype, jnp.integer):
                return rng.integers(0, vocab, shape).astype(s.dtype) if s.ndim else np.zeros(
                    shape, s.dtype)  # fmt: skip
            return (0.02 * np.abs(rng.standard_normal(shape))).astype(s.dtype)

        return mesh_lib.from_host(block, s.shape, s.dtype, s.sharding)

    return jax.tree.map(one, abstract)


def timed(compiled, args, repeats: int) -> float:
    """Median seconds of `compiled(*args)`, its output (the new state) fed back as the first
    argument; the first call warms up."""
    times = []
    for _ in range(repeats + 1):
        tic = time.perf_counter()
        args = (jax.block_until_ready(compiled(*args)), *args[1:])
        times.append(time.perf_counter() - tic)
    return statistics.median(times[1:])


def fit(a) -> None:
    one = mesh_lib.make("model:1", jax.devices())
    points = [(2, 1), (3, 1), (2, 2), (3, 2)]
    print(f"XLA:CPU's one-device plans, batch {a.batch} x {a.seq} tokens, float32 experts of "
          "TinyLlama-1.1B's shapes, fitted as a + b K + c L + d K L over (K, L) in "
          f"{points}")  # fmt: skip
    fits = {}
    for what, build in STEPS.items():
        plans = {}
        for k, layers in [*points, (4, 3)]:
            step, args = build(config(layers), k, one, a.batch, a.seq)
            plans[k, layers] = plan(step.lower(*args).compile())["total"]
        design = np.array([[1, k, layers, k * layers] for k, layers in points], np.float64)
        coef = np.linalg.solve(design, np.array([plans[p] for p in points], np.float64))
        fits[what] = lambda k, layers, c=coef: c[0] + c[1] * k + c[2] * layers + c[3] * k * layers
        full = fits[what](3, FULL_LAYERS) / 1e9
        print(f"{what}: fit / plan at K=4, L=3 = {fits[what](4, 3) / plans[4, 3]:.4f}; K=3 "
              f"full experts ({FULL_LAYERS} layers): {full:.1f} GB")  # fmt: skip
    params = sum(x.size for x in jax.tree.leaves(stacked_experts(config(1), 1)))
    per_layer = sum(x.size for x in jax.tree.leaves(stacked_experts(config(2), 1))) - params
    print("\n| device | " + " | ".join(
        f"{w}: largest K of {FULL_LAYERS}-layer experts (1.1B) | {w}: most layers at K = 3"
        for w in fits) + " |")  # fmt: skip
    print("|---|" + "---|---|" * len(fits))
    for name, gb in DEVICES.items():
        cells = []
        for predict in fits.values():
            ks = [k for k in range(1, 65) if predict(k, FULL_LAYERS) <= gb * 1e9]
            layers = [n for n in range(1, 257) if predict(3, n) <= gb * 1e9]
            most = max(layers, default=0)
            size = f"{most} ({(params + (most - 1) * per_layer) / 1e9:.2f}B)" if most else "none"
            cells += [str(max(ks, default=0)), size]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", default="1,2,4,8")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--what", default="fusion,dam")
    parser.add_argument("--timed", default="fusion", help="the steps also timed ('' for none)")
    parser.add_argument("--fit", action="store_true", help="the one-device memory table")
    a = parser.parse_args()
    if a.fit:
        return fit(a)
    cfg = config(a.layers)
    whole = mesh_lib.nbytes(stacked_experts(cfg, 1))
    print(f"{jax.device_count()} {jax.devices()[0].platform} devices "
          f"({jax.devices()[0].device_kind}); K={a.experts} experts of TinyLlama-1.1B's shapes, "
          f"{a.layers} layers, {whole / 1e9:.2f} GB each in float32; batch {a.batch} x {a.seq} "
          "tokens")  # fmt: skip
    print("| step | devices (model axis) | arguments GB / device | temporaries GB / device | "
          "arguments / whole | step s |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for what in a.what.split(","):
        for n in (int(x) for x in a.devices.split(",")):
            if n > jax.device_count():
                print(f"| {what} | {n} | (only {jax.device_count()} devices) | | | |")
                continue
            mesh = mesh_lib.make(f"model:{n}", jax.devices())
            step, abstract = STEPS[what](cfg, a.experts, mesh, a.batch, a.seq)
            compiled = step.lower(*abstract).compile()
            p = plan(compiled)
            seconds = "not timed"
            if what in a.timed.split(","):
                args = getattr(step, "start", lambda x: x)(filled(abstract, cfg.vocab_size))
                seconds = f"{timed(compiled, args, a.repeats):.2f}"
            print(f"| {what} | {n} | {p['arguments'] / 1e9:.3f} | {p['temporaries'] / 1e9:.3f} | "
                  f"{p['arguments'] / mesh_lib.nbytes(abstract):.3f} | {seconds} |",
                  flush=True)  # fmt: skip
            del compiled


if __name__ == "__main__":
    main()
