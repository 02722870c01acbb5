"""Where the LM runs' arrays live: a `data` x `model` device mesh, and the rule table that splits
each large parameter over `model`.

Parameters are sharded FSDP-style: a kernel or embedding is cut along one dimension over the
`model` axis and kept whole across `data`; XLA gathers what a step reads. The batch is split over
`data`. A mesh `data:N` (what `auto` gives) keeps every model whole on every device.
"""

import math
import re

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from fusion_jax.errors import UserError
from fusion_jax.schema import Rule

AXES = ("data", "model")

# The rule table. A leaf whose path (its keys joined by "/") matches `pattern` (re.search) is
# split over `model` along dimension `dim`, counted from the end: stacked experts `[K, ...]`,
# DAM's coefficients and Adam's moments carry the same leaf names as a model's parameters, so
# one table places them all. The first match wins. A leaf that matches no rule, or whose
# dimension the `model` axis does not divide, is replicated (norm scales, biases, counters).
RULES = (
    (r"embedding$", -2),  # [..., vocab, dim]: vocabulary rows
    # [..., in, out]: output features (DAM's kernel coefficients [K, in]: input features)
    (r"kernel$", -1),
)

_SPEC = re.compile(r"^(data|model):[1-9][0-9]*(,(data|model):[1-9][0-9]*)?$")


def _valid(v) -> bool:
    if not isinstance(v, str) or not (v == "auto" or _SPEC.match(v.replace(" ", ""))):
        return False
    return v == "auto" or len({part.split(":")[0] for part in v.split(",")}) == v.count(",") + 1


MESH = Rule(_valid, '"auto" or axis sizes like "data:2,model:4" (axes data and model, once each)')


def sizes(spec: str, devices: int) -> dict[str, int]:
    """{"data": n, "model": m} of a `MESH` string; "auto" is `data:devices`. An axis left out
    has size 1."""
    if spec == "auto":
        return {"data": devices, "model": 1}
    out = {}
    for part in spec.replace(" ", "").split(","):
        axis, n = part.split(":")
        out[axis] = int(n)
    return {"data": out.get("data", 1), "model": out.get("model", 1)}


def devices(spec: str, num_devices: int = 0) -> list:
    """The local devices a run uses: the first `num_devices` (0: all) for "auto", all of them
    for an explicit mesh (which takes as many as it names)."""
    local = jax.local_devices()
    return local[: num_devices or len(local)] if spec == "auto" else local


def make(spec: str, devices: list) -> jax.sharding.Mesh:
    """The mesh of `spec` over the first data x model of `devices` ("auto": all of them)."""
    shape = sizes(spec, len(devices))
    n = math.prod(shape.values())
    if n > len(devices):
        raise UserError(f"mesh {spec!r} needs {n} devices; {len(devices)} are available")
    return jax.sharding.Mesh(np.array(devices[:n]).reshape(shape["data"], shape["model"]), AXES)


def path_name(path) -> str:
    """A tree path as "layers_0/self_attn/q_proj/kernel"."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def partition(name: str, shape: tuple, model: int) -> PartitionSpec:
    """The leaf's PartitionSpec over a `model` axis of size `model` (see RULES)."""
    for pattern, dim in RULES:
        if re.search(pattern, name):
            if len(shape) < -dim or shape[dim] % model or model == 1:
                break
            spec = [None] * len(shape)
            spec[len(shape) + dim] = "model"
            return PartitionSpec(*spec)
    return PartitionSpec()


def shardings(tree, mesh: jax.sharding.Mesh):
    """A NamedSharding per leaf of `tree` (arrays or shape structs) by the rule table."""
    model = mesh.shape["model"]
    return jax.tree.map_with_path(
        lambda path, x: NamedSharding(mesh, partition(path_name(path), np.shape(x), model)),
        tree,
    )


def place(tree, mesh: jax.sharding.Mesh):
    """`tree` on the mesh, each leaf on its shards."""
    return jax.device_put(tree, shardings(tree, mesh))


def stack_onto(trees: list, mesh: jax.sharding.Mesh):
    """The leaves of `trees` (host arrays) stacked `[K, ...]`, each put on its shards by the rule
    table: a device's shard is cut from the K leaves, and no stacked copy is made on the host."""
    model = mesh.shape["model"]

    def one(path, *leaves):
        shape = (len(leaves), *np.shape(leaves[0]))
        sharding = NamedSharding(mesh, partition(path_name(path), shape, model))
        return from_host(lambda index: np.stack([x[index[1:]] for x in leaves[index[0]]]), shape,
                         leaves[0].dtype, sharding)  # fmt: skip

    return jax.tree.map_with_path(one, *trees)


def nbytes(tree) -> int:
    """Bytes of a tree's arrays, all shards counted once."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def batch(mesh: jax.sharding.Mesh, axis: int = 0) -> NamedSharding:
    """Rows of axis `axis` split over `data`, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(*([None] * axis), "data"))


def from_host(read, shape: tuple, dtype, sharding: NamedSharding) -> jax.Array:
    """An array built shard by shard: `read(index) -> np.ndarray` gives the block at `index` (a
    tuple of slices), so a device's shard is the only copy made of it."""
    return jax.make_array_from_callback(
        shape, sharding, lambda index: np.asarray(read(index), dtype)
    )
