"""What a jitted function's lowered program does with its matmuls (shared by the LM tests)."""

import re

import jax


def dot_precisions(fn, *args) -> list[tuple[str, str] | None]:
    """Per dot of `jax.jit(fn)`'s lowered program, its operands' precisions (None if none)."""
    dots = re.findall(r"stablehlo\.dot_general .*", jax.jit(fn).lower(*args).as_text())
    found = [re.search(r"precision = \[(\w+), (\w+)\]", d) for d in dots]
    return [m.groups() if m else None for m in found]
