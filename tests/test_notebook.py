"""notebooks/fusion_jax_colab.ipynb runs top to bottom on the CPU with tiny parameters.

The parameters are injected papermill-style: a cell tagged "injected-parameters" right after the
cell tagged "parameters". The merging comparison is not trained here (its pipeline compiles
dozens of programs, minutes on 2 cores; tests/test_merge_compare.py covers it): its workdir is
laid out as the pipeline saves it, with untrained experts and initial DAM coefficients, and the
notebook restores and evaluates the DAM-merged model from it.
"""

import os

import jax
import jax.numpy as jnp
import nbformat
import orbax.checkpoint as ocp
from nbclient import NotebookClient

from configs import compare as compare_config
from fusion_jax import merging
from fusion_jax.run import load_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "fusion_jax_colab.ipynb")


def inject_parameters(nb, parameters: dict) -> None:
    """Papermill's convention: the new values go in a cell after the "parameters" cell."""
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)


def untrained_comparison(workdir: str) -> None:
    """A merging-comparison workdir as experiments/merge_compare.py saves it (seed 0's experts
    and DAM coefficients), without the training."""
    config = compare_config.get_config("tiny")
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json())
    run = load_run(workdir)
    example = jnp.asarray(run.splits(run.tasks[0], 0).val.inputs[:2])
    keys = jax.random.split(jax.random.key(0), len(run.tasks))
    experts = jax.jit(jax.vmap(lambda k: run.model.init(k, example)["params"]))(keys)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.abspath(run.stage_dir("experts", 0)), experts)
        ckpt.save(os.path.abspath(run.stage_dir("dam", 0)), merging.init_coefficients(experts))


def outputs_of(nb, kind: str) -> str:
    """All text of one kind ("text/plain", "text/markdown", "stream") in the outputs."""
    texts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if kind == "stream" and out.output_type == "stream":
                texts.append(out.text)
            elif kind in out.get("data", {}):
                texts.append(out.data[kind])
    return "\n".join(texts)


def test_notebook_runs_top_to_bottom(tmp_path):
    merge_workdir = str(tmp_path / "compare_tiny")
    untrained_comparison(merge_workdir)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    inject_parameters(
        nb,
        {
            "install": False,
            "repo_dir": ROOT,
            "mount_drive": False,
            "local_root": str(tmp_path / "runs"),
            "config_arg": "tiny",
            "overrides": {"num_seeds": 1, "num_steps": 10, "train.num_devices": 1},
            "run_merge": False,
            "merge_workdir": merge_workdir,
            "example_index": 3,
        },
    )
    client = NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    try:
        client.execute()  # raises CellExecutionError, naming the cell, on any error
    finally:
        nbformat.write(nb, str(tmp_path / "executed.ipynb"))  # kept for a failing run's reader
    streams = outputs_of(nb, "stream")
    assert "backend: cpu" in streams
    assert os.path.isdir(os.path.join(str(tmp_path / "runs"), "dyn_fusion_tiny", "x_plus_y"))
    assert "x_plus_y: checkpoints at steps [10]" in streams
    markdown = outputs_of(nb, "text/markdown")
    # The comparison table, with the seed's published numbers (run 1) beside ours.
    assert "| Dynamic Fusion | 1 |" in markdown and "seed final_val_acc" in markdown
    assert "| x_plus_y | " in markdown and "DAM merged: val acc" in markdown
    images = sum(
        "image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", [])
    )
    assert images == 3  # learning curves, gate heatmap, one example's per-expert weights
    assert "example 3: x_plus_y(" in streams
    assert "expert 2: " in streams
