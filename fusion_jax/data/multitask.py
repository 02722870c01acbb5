"""One shared vocabulary and output space over several tasks (for merging experiments).

Tokens: the numbers 0..p-1, then the 120 permutations of S5 (these two blocks are also the answer
classes, in that order), then one operator token per task, then "=". An example is
`[a, op_task, b, "="]`, so the input says which task it is.
"""

import dataclasses

import numpy as np

from fusion_jax.data import pipeline
from fusion_jax.data import tasks as tasks_lib


@dataclasses.dataclass(frozen=True)
class MultiTask:
    names: tuple[str, ...]
    p: int

    @property
    def num_numbers(self) -> int:
        return self.p

    @property
    def num_classes(self) -> int:
        return self.p + len(tasks_lib.permutation().elements)

    @property
    def vocab_size(self) -> int:
        return self.num_classes + len(self.names) + 1

    def op_token(self, task_index: int) -> int:
        return self.num_classes + task_index

    @property
    def eq_token(self) -> int:
        return self.vocab_size - 1

    def table(self, task_index: int) -> tuple[np.ndarray, np.ndarray]:
        """A task's pairs in the shared vocabulary: inputs `[N, 4]`, labels `[N]` (answer ids)."""
        name = self.names[task_index]
        task = tasks_lib.get_task(name, None if name == "permutation" else self.p)
        inputs, labels = task.table()
        offset = self.p if name == "permutation" else 0  # element i -> shared id i + offset
        a = inputs[:, 0] - tasks_lib.NUM_SPECIAL_TOKENS + offset
        b = inputs[:, 2] - tasks_lib.NUM_SPECIAL_TOKENS + offset
        shared = np.stack(
            [a, np.full_like(a, self.op_token(task_index)), b, np.full_like(a, self.eq_token)], 1
        )
        return shared.astype(np.int32), (labels + offset).astype(np.int32)


@dataclasses.dataclass
class TaskSplits:
    """Host splits of one task: `train` (minus the held-out slice), `holdout`, `val`."""

    train: pipeline.Split
    holdout: pipeline.Split
    val: pipeline.Split


def splits(mt: MultiTask, seed: int, frac_train: float, holdout_frac: float) -> list[TaskSplits]:
    """Per task, the baseline's seeded split; the last `holdout_frac` of train is held out for
    choosing merge hyper-parameters, so the search never touches validation."""
    out = []
    for i in range(len(mt.names)):
        inputs, labels = mt.table(i)
        train, val = pipeline.split_indices(len(labels), frac_train, seed)
        n_hold = int(len(train) * holdout_frac)
        fit, hold = train[: len(train) - n_hold], train[len(train) - n_hold :]
        out.append(TaskSplits(*(pipeline.Split(inputs[ix], labels[ix]) for ix in (fit, hold, val))))
    return out


def mixture(parts: list[pipeline.Split]) -> pipeline.Split:
    return pipeline.Split(
        np.concatenate([s.inputs for s in parts]), np.concatenate([s.labels for s in parts])
    )
