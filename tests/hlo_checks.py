"""What a jitted function's lowered program does with its matmuls and memory (shared by the LM
tests)."""

import re

import jax
import numpy as np

from fusion_jax import mesh
from fusion_jax.train import chunks


def dot_precisions(fn, *args) -> list[tuple[str, str] | None]:
    """Per dot of `jax.jit(fn)`'s lowered program, its operands' precisions (None if none)."""
    dots = re.findall(r"stablehlo\.dot_general .*", jax.jit(fn).lower(*args).as_text())
    found = [re.search(r"precision = \[(\w+), (\w+)\]", d) for d in dots]
    return [m.groups() if m else None for m in found]


def largest_constant_bytes(program_text: str) -> int:
    """Bytes of the largest array constant of a lowered program's text (non-splat constants are
    printed as hex blobs; 0 when there is none)."""
    blobs = re.findall(r'dense<"0x([0-9A-Fa-f]*)">', program_text)
    return max((len(b) // 2 for b in blobs), default=0)


def record_programs(monkeypatch) -> list[str]:
    """Records the lowered text of every call (or ahead-of-time lowering) of a function jitted
    (by `jax.jit` at run time) after this call, for checks on what the programs hold."""
    programs, jit = [], jax.jit

    class Recording:
        def __init__(self, fn, **options):
            self.jitted = jit(fn, **options)

        def __call__(self, *args):
            programs.append(self.jitted.lower(*args).as_text())
            return self.jitted(*args)

        def lower(self, *args, **kwargs):  # programs compiled ahead of time are recorded too
            lowered = self.jitted.lower(*args, **kwargs)
            programs.append(lowered.as_text())
            return lowered

        def __getattr__(self, name):  # .lower, .trace, ... as the jitted function's
            return getattr(self.jitted, name)

    monkeypatch.setattr(jax, "jit", Recording)
    return programs


def argument_bytes(monkeypatch) -> list[int]:
    """Records the per-device argument bytes XLA plans for each program compiled ahead of time
    (`chunks.compile_reporting`) after this call."""
    recorded, compile_reporting = [], chunks.compile_reporting

    def recording(*args, **kwargs):
        compiled = compile_reporting(*args, **kwargs)
        recorded.append(compiled.memory_analysis().argument_size_in_bytes)
        return compiled

    monkeypatch.setattr(chunks, "compile_reporting", recording)
    return recorded


def sharded_bytes(tree, model: int) -> tuple[int, int]:
    """(bytes of the leaves mesh.RULES splits over a `model` axis, bytes of those it keeps
    whole on every device)."""
    split = whole = 0
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        spec = mesh.partition(mesh.path_name(path), np.shape(x), model)
        if spec == jax.sharding.PartitionSpec():
            whole += np.asarray(x).nbytes
        else:
            split += np.asarray(x).nbytes
    return split, whole
