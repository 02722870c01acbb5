"""Gate analysis of fusion models and compute accounting of any model.

Gate statistics come from the `gate_weights` the fusion layer sows into "intermediates"; compute
figures come from XLA's cost analysis of the compiled forward and a timed forward pass.
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.evaluate import plots
from fusion_jax.models.fusion import gate_entropy
from fusion_jax.models.numerics import FLOAT32, Numerics


def gate_weights(model, params, tokens, numerics: Numerics = FLOAT32) -> jax.Array:
    """Gate weights `[B, L', K]` of one run's fusion model on `tokens [B, L]`."""
    _, state = numerics.apply(model, params, tokens, mutable=["intermediates"])
    return state["intermediates"]["fusion"]["gate_weights"][0]


def gate_statistics(weights) -> dict:
    """Per expert: mean weight and top-choice share; mean entropy (nats) and its maximum."""
    weights = np.asarray(weights)
    k = weights.shape[-1]
    flat = weights.reshape(-1, k)
    top = np.bincount(flat.argmax(-1), minlength=k) / flat.shape[0]
    return {
        "mean_weight": flat.mean(0).tolist(),
        "top_choice_share": top.tolist(),
        "entropy": float(np.mean(gate_entropy(jnp.asarray(flat)))),
        "max_entropy": float(np.log(k)),
    }


def analyze_gates(setup, params, out_dir: str | None, max_heatmap_rows: int = 64) -> dict:
    """Gate statistics of every run on its validation split, and a heatmap of the first run in
    `out_dir` (None: no plot).

    `params` are stacked over runs `[R, ...]`. Returns `{"per_seed": [...], "mean": {...}}`.
    """
    per_seed = []
    fn = jax.jit(lambda p, x: gate_weights(setup.model, p, x, setup.numerics))
    first = None
    for r in range(len(setup.seeds)):
        run_params = jax.tree.map(lambda x, r=r: x[r], params)
        weights = fn(run_params, jnp.asarray(setup.data.val.inputs[r]))
        per_seed.append(gate_statistics(weights))
        first = weights if first is None else first
    mean = {
        key: np.mean([s[key] for s in per_seed], axis=0).tolist()
        for key in ("mean_weight", "top_choice_share", "entropy")
    }
    mean["max_entropy"] = per_seed[0]["max_entropy"]
    if out_dir is not None:
        plot_gate_heatmap(np.asarray(first), setup.task.name, out_dir, max_heatmap_rows)
    return {"per_seed": per_seed, "mean": mean}


def plot_gate_heatmap(weights, task_name: str, out_dir: str, max_rows: int) -> str:
    """Validation examples x experts at the last position (and positions x experts if any)."""
    plt = plots.pyplot()
    panels = [(weights[:max_rows, -1], "validation example", "last position")]
    if weights.shape[1] > 1:
        panels.append((weights.mean(0), "position", "mean over examples"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 6), squeeze=False)
    for ax, (data, ylabel, title) in zip(axes[0], panels, strict=True):
        image = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set(xlabel="expert", ylabel=ylabel, title=f"{task_name}: gate weights, {title}")
        ax.set_xticks(range(data.shape[-1]))
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path = os.path.join(out_dir, f"gate_heatmap_{task_name}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compute_stats(apply_fn, params, tokens, repeats: int = 5) -> dict:
    """Parameters, forward FLOPs per example (XLA cost analysis), measured examples/s.

    `params` are one run's; `tokens [B, L]` the batch the forward is compiled and timed on.
    """
    forward = jax.jit(lambda p, x: apply_fn(p, x)[0])
    compiled = forward.lower(params, tokens).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    jax.block_until_ready(compiled(params, tokens))
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        jax.block_until_ready(compiled(params, tokens))
        times.append(time.perf_counter() - tic)
    batch = tokens.shape[0]
    return {
        "params": int(sum(x.size for x in jax.tree.leaves(params))),
        "flops_per_example": float(cost.get("flops", float("nan"))) / batch,
        "examples_per_s": batch / float(np.median(times)),
        "device": jax.devices()[0].device_kind,
    }
