"""Comparison of finished experiments: overlaid curves and a table beside the seed's numbers."""

import json
import os

from fusion_jax import files
from fusion_jax.errors import UserError
from fusion_jax.evaluate import plots, results

# The seed's published numbers ship inside the package, so an installed copy finds them too.
REFERENCE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference", "seed_runs.json"
)
COLUMNS = ("final_val_acc", "final_val_loss", "final_train_acc", "final_train_loss",
           "step_val_acc_99")  # fmt: skip


def read_run(workdir: str) -> dict:
    """A finished workdir's name, reference run, per-task logs, final info and compute."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise UserError(f"{workdir} has no config.json: is it a fusion_jax workdir?")
    with open(path) as f:
        config = json.load(f)
    if config.get("experiment"):
        raise UserError(
            f"{workdir} is a {config['experiment']} workdir: --mode=compare reads grokking "
            "training workdirs (--mode=results tabulates the others)"
        )
    tasks = [t.strip() for t in config["tasks"].split(",") if t.strip()]
    records = results.read_task_records(workdir, tasks)
    info = results.final_info(records, config["num_steps"], config["eval"]["acc_threshold"])
    compute = files.read_json(os.path.join(workdir, "compute.json"), {})
    return {
        "name": config["name"],
        "reference_run": config.get("reference_run"),
        "records": records,
        "final_info": info,
        "compute": compute,
    }


def comparison_table(runs: list[dict], reference: dict) -> dict:
    """`{task: [row per run]}`, each row our means/stderrs and the seed's means where known."""
    table = {}
    for run in runs:
        seed_means = reference.get(run["reference_run"] or "", {}).get("means", {})
        for task, info in run["final_info"].items():
            row = {"run": run["name"], "seeds": len(info["final_info_dict"]["final_val_acc"])}
            for col in COLUMNS:
                row[col] = info["means"][f"{col}_mean"]
                row[f"{col}_stderr"] = info["stderrs"][f"{col}_stderr"]
                row[f"seed_{col}"] = seed_means.get(task, {}).get(f"{col}_mean")
            compute = run["compute"].get(task, {})
            row["params"] = compute.get("params")
            row["flops_per_example"] = compute.get("flops_per_example")
            table.setdefault(task, []).append(row)
    return table


def _fmt(value, stderr=None):
    if value is None:
        return "–"
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text + (f" ± {stderr:.2g}" if stderr else "")


def to_markdown(table: dict) -> str:
    lines = ["# Comparison of runs", "",
             "Ours: mean ± standard error over seeds. Seed: the published means of the same run "
             "(reference/seed_runs.json), where it has one.", ""]  # fmt: skip
    header = ["run", "seeds"]
    for col in COLUMNS:
        header += [col, f"seed {col}"]
    header += ["params", "FLOPs/example"]
    for task, rows in table.items():
        lines += [f"## {task}", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]  # fmt: skip
        for row in rows:
            cells = [row["run"], str(row["seeds"])]
            for col in COLUMNS:
                cells += [_fmt(row[col], row[f"{col}_stderr"]), _fmt(row[f"seed_{col}"])]
            cells += [_fmt(row["params"]), _fmt(row["flops_per_example"])]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def compare(workdirs: list[str], out_dir: str, reference_path: str = REFERENCE) -> dict:
    """Writes overlaid plots, comparison.md and comparison.json for `workdirs` into `out_dir`."""
    if not workdirs:
        raise UserError("--workdirs needs at least one finished workdir (comma-separated).")
    runs = [read_run(w) for w in workdirs]
    names = [r["name"] for r in runs]
    if len(set(names)) < len(names):
        # Two runs of one config: tell the lines apart by position and directory.
        for i, (run, workdir) in enumerate(zip(runs, workdirs, strict=True)):
            run["name"] = f"{run['name']} #{i + 1} ({os.path.basename(os.path.normpath(workdir))})"
    with open(reference_path) as f:
        reference = json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    plots.plot_curves({r["name"]: r["records"] for r in runs}, out_dir)
    table = comparison_table(runs, reference)
    files.write_json(os.path.join(out_dir, "comparison.json"), table)
    with open(os.path.join(out_dir, "comparison.md"), "w") as f:
        f.write(to_markdown(table))
    return table
