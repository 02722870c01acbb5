"""TFDS builder for the task tables, stored as array_record (readable without TensorFlow).

One builder config per task and size (p, or k for S_k); a single split `pairs` holds every
(a, b) pair with its canonical pair index. TFDS shuffles records on write, so readers sort by
`index` to get the canonical order back. The train/validation split is drawn per run seed
on top of this (see `pipeline`).
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from fusion_jax.data import tasks as tasks_lib

SPLIT = "pairs"


@dataclasses.dataclass
class TaskConfig(tfds.core.BuilderConfig):
    task: str = "x_plus_y"
    size: int = 97


def task_config(task_name: str, size: int | None = None) -> TaskConfig:
    size = tasks_lib.DEFAULT_SIZE[task_name] if size is None else size
    return TaskConfig(name=f"{task_name}_{size}", task=task_name, size=size)


class GrokkingTasks(tfds.core.GeneratorBasedBuilder):
    """All pairs of one grokking task (builder config name = task name)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Tables of x_plus_y, x_minus_y, x_div_y (p=97) and S5 composition."}
    BUILDER_CONFIGS = [task_config(name) for name in tasks_lib.TASKS]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Binary operation tables of the grokking benchmark, one example per pair.",
            features=tfds.features.FeaturesDict(
                {
                    "index": tfds.features.Scalar(dtype=np.int32),
                    "inputs": tfds.features.Tensor(shape=(tasks_lib.SEQ_LEN,), dtype=np.int32),
                    "label": tfds.features.Scalar(dtype=np.int32),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the tables are computed.
        return {SPLIT: self._generate_examples()}

    def _generate_examples(self):
        inputs, labels = tasks_lib.get_task(
            self.builder_config.task, self.builder_config.size
        ).table()
        for i in range(len(labels)):
            yield i, {"index": i, "inputs": inputs[i], "label": labels[i]}


def load_table(
    task_name: str, data_dir: str, size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Prepares (once) and reads a task's table in canonical pair order.

    Returns:
      inputs: int32 `[num_pairs, 4]`; labels: int32 `[num_pairs]`.
    """
    config = task_config(task_name, size)
    # Registered configs are passed by name; TFDS refuses an equal custom object.
    known = {c.name for c in GrokkingTasks.BUILDER_CONFIGS}
    builder = GrokkingTasks(
        config=config.name if config.name in known else config,
        data_dir=data_dir,
        file_format="array_record",
    )
    builder.download_and_prepare()
    source = builder.as_data_source(split=SPLIT)
    records = source.__getitems__(range(len(source)))
    order = np.argsort([r["index"] for r in records])
    inputs = np.stack([records[i]["inputs"] for i in order]).astype(np.int32)
    labels = np.array([records[i]["label"] for i in order], np.int32)
    return inputs, labels
