"""Stages of multi-stage experiments: each result saved once with Orbax, restored on a rerun.

`Stages(workdir).run(name, fn, abstract)` returns stage `name` from `<workdir>/stages/<name>` if
it finished before, else runs `fn() -> (tree, training FLOPs)`, saves the tree and records its
cost in `stages/costs.json` (written after the tree, so a stage counts as finished only once both
exist).
"""

import json
import os
import time

import jax
import orbax.checkpoint as ocp
from absl import logging


class Stages:
    """Orbax-saved results of finished stages, plus their training cost in FLOPs."""

    def __init__(self, workdir: str):
        self.dir = os.path.abspath(os.path.join(workdir, "stages"))
        self.ckpt = ocp.StandardCheckpointer()
        self.cost_path = os.path.join(self.dir, "costs.json")
        os.makedirs(self.dir, exist_ok=True)
        self.costs = json.load(open(self.cost_path)) if os.path.exists(self.cost_path) else {}

    def run(self, name: str, fn, abstract):
        """Restores stage `name` if saved, else runs `fn() -> (tree, train_flops)` and saves."""
        path = os.path.join(self.dir, name)
        if os.path.exists(path) and name in self.costs:
            logging.info("[stages] %s: restored", name)
            target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract)
            return self.ckpt.restore(path, target)
        tic = time.perf_counter()
        tree, flops = fn()
        self.ckpt.save(path, tree, force=True)
        self.ckpt.wait_until_finished()
        self.costs[name] = flops
        with open(self.cost_path, "w") as f:
            json.dump(self.costs, f, indent=2)
        logging.info("[stages] %s: done in %.0fs", name, time.perf_counter() - tic)
        return tree


def flops_of(fn, *args) -> float:
    """XLA's FLOP count of one call of `fn` (jit-compiled)."""
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", 0.0))
