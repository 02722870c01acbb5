"""Task algebra of the grokking benchmark: exact operand/answer tables.

Every task is a binary operation `c = a o b` over finite element sets. An example is the token
sequence `[a, "o", b, "="]` and its label is the index of `c` among the task's answer elements.
The vocabulary is `["o", "="] + elements`, so element `i` has token id `i + 2` (as in the
reference implementation, whose labels are `vocab_index(c) - 2`).
"""

import dataclasses
import itertools
from collections.abc import Callable, Sequence

import numpy as np

from fusion_jax.errors import UserError

OP_TOKEN = 0
EQ_TOKEN = 1
NUM_SPECIAL_TOKENS = 2
SEQ_LEN = 4


@dataclasses.dataclass(frozen=True)
class Task:
    """A binary operation table.

    Attributes:
      name: registry name.
      elements: all elements that may appear as operand or answer; their order fixes the
        token ids and the label ids.
      left: operands allowed on the left (a subset of `elements`).
      right: operands allowed on the right.
      op: the operation on two elements, returning an element.
    """

    name: str
    elements: tuple
    left: tuple
    right: tuple
    op: Callable

    @property
    def vocab_size(self) -> int:
        return len(self.elements) + NUM_SPECIAL_TOKENS

    @property
    def num_classes(self) -> int:
        return len(self.elements)

    @property
    def num_pairs(self) -> int:
        return len(self.left) * len(self.right)

    def table(self) -> tuple[np.ndarray, np.ndarray]:
        """All pairs in canonical order (pair index = i_left * |right| + i_right).

        Returns:
          inputs: int32 `[num_pairs, 4]` token ids `[a, o, b, =]`.
          labels: int32 `[num_pairs]` index of the answer in `elements`.
        """
        index = {e: i for i, e in enumerate(self.elements)}
        inputs = np.empty((self.num_pairs, SEQ_LEN), np.int32)
        labels = np.empty((self.num_pairs,), np.int32)
        for n, (a, b) in enumerate(itertools.product(self.left, self.right)):
            inputs[n] = (
                index[a] + NUM_SPECIAL_TOKENS,
                OP_TOKEN,
                index[b] + NUM_SPECIAL_TOKENS,
                EQ_TOKEN,
            )
            labels[n] = index[self.op(a, b)]
        return inputs, labels


def _mod_task(name: str, p: int, op: Callable, right_start: int = 0) -> Task:
    elements = tuple(range(p))
    return Task(name, elements, elements, tuple(range(right_start, p)), op)


def x_plus_y(p: int = 97) -> Task:
    return _mod_task("x_plus_y", p, lambda a, b: (a + b) % p)


def x_minus_y(p: int = 97) -> Task:
    return _mod_task("x_minus_y", p, lambda a, b: (a - b) % p)


def x_div_y(p: int = 97) -> Task:
    # b^(p-2) is the inverse of b modulo a prime p (Fermat), so b ranges over 1..p-1.
    return _mod_task("x_div_y", p, lambda a, b: (a * pow(b, p - 2, p)) % p, right_start=1)


def permutation(k: int = 5) -> Task:
    """Composition in the symmetric group S_k: c[i] = a[b[i]]."""
    perms = tuple(itertools.permutations(range(k)))
    return Task("permutation", perms, perms, perms, lambda a, b: tuple(a[i] for i in b))


# Each builder takes the task's size parameter: the modulus p, or k for S_k.
TASKS: dict[str, Callable[[int], Task]] = {
    "x_plus_y": x_plus_y,
    "x_minus_y": x_minus_y,
    "x_div_y": x_div_y,
    "permutation": permutation,
}
DEFAULT_SIZE = {"x_plus_y": 97, "x_minus_y": 97, "x_div_y": 97, "permutation": 5}


def size_for(name: str, p: int) -> int | None:
    """The size parameter of task `name` under the config's modulus p (permutation: S5)."""
    return None if name == "permutation" else p


def get_task(name: str, size: int | None = None) -> Task:
    """Looks a task up by name; `size` overrides p (or k for permutation)."""
    if name not in TASKS:
        raise UserError(f"Unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}.")
    return TASKS[name](DEFAULT_SIZE[name] if size is None else size)


def parse_task_names(tasks: str | Sequence[str]) -> list[str]:
    """Splits a comma-separated task list (the config's `tasks` field) and checks every name."""
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    names = [n for n in names if n]
    if not names:
        raise UserError("config.tasks is empty; give a comma-separated list of task names.")
    for name in names:
        get_task(name)
    return names
