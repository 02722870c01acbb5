"""The committed `results/` folder, regenerated from result workdirs by code only.

    python main.py --mode=results --workdir=results \
        --workdirs=runs/baseline,runs/dyn_fusion,runs/dyn_fusion_l4,runs/compare

For each workdir this writes `results/<name>/`, where `<name>` is the config's `reference_run`
(`run_0` ... `run_4`), else the workdir's base name; `name=path` in `--workdirs` chooses it.

* Grokking workdirs (configs/baseline.py, configs/dyn_fusion.py): `config.json`, the logs
  `<task>/metrics.jsonl`, `final_info.json` (recomputed from the logs, tasks logged to the
  config's last step only), the 16 plots (redrawn from the logs), `table.md` / `table.json` (ours
  beside the source's numbers, with a verdict per task), and for fusion models the gate analysis
  (`gate_analysis.json`, `gate_heatmap_<task>.png`) and `compute.json`, as `--mode=analyze`
  wrote them.
* Experiment workdirs (configs/compare.py, configs/lm_study.py): `config.json` and the
  comparison files, with `comparison.md` rendered anew from `comparison.json`
  (fusion_jax/evaluate/comparisons.py).
* Every folder gets `run.json` (name, title, kind, source workdir, device where known), and
  `results/index.md` lists every folder present in `results/`.

A results folder is itself workdir-shaped (config.json + logs), so `--workdirs=results/run_0`
regenerates it in place; tests/test_results_report.py checks that this reproduces the committed
tables byte for byte. Source workdirs are only read, never written (a run still training is read
up to its last complete log line).
"""

import json
import os
import shutil

import numpy as np

from fusion_jax import files
from fusion_jax.errors import UserError
from fusion_jax.evaluate import compare as compare_lib
from fusion_jax.evaluate import plots as plots_lib
from fusion_jax.evaluate import results
from fusion_jax.train import logs

REFERENCE_DIR = os.path.dirname(compare_lib.REFERENCE)
SEED_RUNS = os.path.join(REFERENCE_DIR, "seed_runs.json")
# Published reruns of a seed run, with per-seed values: {reference_run: file}.
RERUNS = {"run_0": os.path.join(REFERENCE_DIR, "reference_baseline_rerun.json")}

# The source's experiment (shared/DESIGN.md section 2): what "full length" means.
SOURCE_NUM_STEPS = 7500
SOURCE_NUM_SEEDS = 3
SOURCE_P = 97
ARITHMETIC_TASKS = ("x_div_y", "x_minus_y", "x_plus_y")
TASK_ORDER = ("x_div_y", "x_minus_y", "x_plus_y", "permutation")

METRICS = (
    "final_train_loss",
    "final_val_loss",
    "final_train_acc",
    "final_val_acc",
    "step_val_acc_99",
)
# The metrics a task's verdict is taken from (the bands of DESIGN.md section 2).
VERDICT_METRICS = ("final_val_acc", "step_val_acc_99")
# Widening of our mean in standard errors.
NUM_STDERRS = 2

COMPARISON_FILES = (
    "comparison.md",
    "comparison.json",
    "frontier.png",
    "dam_coefficients.png",
    "routing.png",
    "gate_tokens.png",
    "fusion_selection.png",
)
NOT_RUN, UNFINISHED, FULL = "not run", "unfinished", "full length"
SHORTENED, OTHER_SETUP = "shortened", "different setup"


# ---------------------------------------------------------------------------------------------
# Reading workdirs


def parse_workdirs(spec) -> list[tuple[str | None, str]]:
    """`"a,name=b"` (or a list of such entries) -> [(None, "a"), ("name", "b")]."""
    entries = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for entry in (e.strip() for e in entries):
        if not entry:
            continue
        name, sep, path = entry.partition("=")
        out.append((name.strip(), path.strip()) if sep else (None, entry))
    if not out:
        raise UserError("--workdirs needs at least one result workdir (comma-separated).")
    return out


def _config_tasks(config: dict) -> list[str]:
    return [t.strip() for t in config.get("tasks", "").split(",") if t.strip()]


def _ordered(tasks) -> list[str]:
    tasks = set(tasks)
    return [t for t in TASK_ORDER if t in tasks] + sorted(tasks - set(TASK_ORDER))


# ---------------------------------------------------------------------------------------------
# The table


def task_status(config: dict, task: str, records: list[dict]) -> dict:
    """Whether `task` ran at the source's full length; `records` cut to the last common step."""
    num_steps, num_seeds = config["num_steps"], config["num_seeds"]
    if task not in _config_tasks(config):
        return {
            "status": NOT_RUN,
            "note": "not among the config's tasks",
            "seeds": 0,
            "last_step": None,
            "records": [],
        }
    if not records:
        return {
            "status": NOT_RUN,
            "note": "no logs yet",
            "seeds": 0,
            "last_step": None,
            "records": [],
        }
    last_by_seed = {}
    for r in records:
        last_by_seed[r["seed"]] = max(last_by_seed.get(r["seed"], 0), r["step"])
    last = min(last_by_seed.values())
    records = [r for r in records if r["step"] <= last]
    seeds = len(last_by_seed)
    notes = []
    if last < num_steps or seeds < num_seeds:
        notes.append(f"last logged step {last} of {num_steps}")
        if seeds < num_seeds:
            notes.append(f"{seeds} of {num_seeds} seeds logged")
        status = UNFINISHED
    else:
        deviations = []
        if num_steps != SOURCE_NUM_STEPS:
            deviations.append(f"{num_steps} steps (source: {SOURCE_NUM_STEPS})")
        p = config.get("data", {}).get("p")
        if task in ARITHMETIC_TASKS and p != SOURCE_P:
            deviations.append(f"p = {p} (source: {SOURCE_P})")
        status = FULL
        if deviations:
            status = SHORTENED if num_steps < SOURCE_NUM_STEPS else OTHER_SETUP
        notes += deviations
        if seeds < SOURCE_NUM_SEEDS:
            notes.append(f"{seeds} of the source's {SOURCE_NUM_SEEDS} seeds")
    return {
        "status": status,
        "note": "; ".join(notes),
        "seeds": seeds,
        "last_step": last,
        "records": records,
    }


def source_numbers(task: str, reference_run: str | None, seed_runs: dict, rerun: dict) -> dict:
    """Per metric: the seed's mean, the rerun's mean and per-seed values, and their spread."""
    seed_means = seed_runs.get(reference_run or "", {}).get("means", {}).get(task, {})
    rerun_task = rerun.get(task, {})
    out = {}
    for metric in METRICS:
        seed_mean = seed_means.get(f"{metric}_mean")
        rerun_values = rerun_task.get("final_info_dict", {}).get(metric)
        rerun_mean = rerun_task.get("means", {}).get(f"{metric}_mean")
        values = [v for v in [seed_mean, *(rerun_values or [])] if v is not None]
        out[metric] = {
            "source_mean": seed_mean,
            "rerun_mean": rerun_mean,
            "rerun_values": rerun_values,
            "spread": [float(min(values)), float(max(values))] if values else None,
        }
    return out


def in_spread(mean: float, stderr: float, spread) -> bool:
    """Our mean widened by NUM_STDERRS standard errors overlaps the source's [min, max]."""
    lo, hi = spread
    return bool(mean - NUM_STDERRS * stderr <= hi and mean + NUM_STDERRS * stderr >= lo)


def _ours(status: dict, num_steps: int, threshold: float) -> dict:
    """Per metric: our mean, standard error, per-seed values (None where not measured)."""
    info = results.task_final_info(status["records"], num_steps, threshold)
    arrays = logs.to_arrays(status["records"])
    reached = [bool(np.any(a > threshold)) for a in arrays["val_acc"]]
    out = {}
    for metric in METRICS:
        entry = {
            "mean": info["means"][f"{metric}_mean"],
            "stderr": info["stderrs"][f"{metric}_stderr"],
            "values": info["final_info_dict"][metric],
        }
        if metric == "step_val_acc_99" and status["status"] == UNFINISHED and not all(reached):
            # A seed short of the threshold has no step yet: the default would claim num_steps.
            entry = {
                "mean": None,
                "stderr": None,
                "values": None,
                "note": f"reached {threshold} in {sum(reached)} of {len(reached)} seeds "
                f"by step {status['last_step']}",
            }
        out[metric] = entry
    return out


def run_table(config: dict, task_records: dict, seed_runs: dict, rerun: dict) -> dict:
    """table.json: per task its status, our numbers, the source's, and the verdicts."""
    reference_run = config.get("reference_run")
    known = seed_runs.get(reference_run or "", {}).get("means", {})
    tasks = _ordered(set(_config_tasks(config)) | set(known))
    threshold = config["eval"]["acc_threshold"]
    table = {
        "name": config.get("name"),
        "reference_run": reference_run,
        "source_title": seed_runs.get(reference_run or "", {}).get("title"),
        "has_rerun": bool(rerun),
        "num_steps": config["num_steps"],
        "num_seeds": config["num_seeds"],
        "p": config.get("data", {}).get("p"),
        "eval_mode": config.get("eval", {}).get("mode"),
        "tasks": {},
    }
    for task in tasks:
        status = task_status(config, task, task_records.get(task, []))
        entry = {k: status[k] for k in ("status", "note", "seeds", "last_step")}
        source = source_numbers(task, reference_run, seed_runs, rerun)
        entry["verdict"] = None
        if status["status"] != NOT_RUN:
            ours = _ours(status, config["num_steps"], threshold)
            metrics = {}
            for metric in METRICS:
                m = {"ours": ours[metric], **source[metric], "inside": None}
                if status["status"] == FULL and m["spread"] is not None:
                    m["inside"] = in_spread(
                        ours[metric]["mean"], ours[metric]["stderr"], m["spread"]
                    )
                metrics[metric] = m
            entry["metrics"] = metrics
            if status["status"] == FULL:
                if any(metrics[m]["spread"] is None for m in VERDICT_METRICS):
                    entry["verdict"] = "no source numbers"
                else:
                    out = [m for m in VERDICT_METRICS if not metrics[m]["inside"]]
                    entry["verdict"] = "inside" if not out else f"outside ({', '.join(out)})"
        else:
            entry["source"] = source
        table["tasks"][task] = entry
    return table


def _num(value) -> str:
    if value is None:
        return "–"
    value = float(value)
    if not np.isfinite(value):
        return str(value)
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _err(value) -> str:
    value = float(value)
    if not np.isfinite(value):
        return str(value)
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2g}"


def _ours_cell(ours: dict) -> str:
    if ours["mean"] is None:
        return f"– ({ours['note']})"
    return f"{_num(ours['mean'])} ± {_err(ours['stderr'])}"


def _inside_cell(inside) -> str:
    return "–" if inside is None else ("inside" if inside else "outside")


def to_markdown(table: dict, run_name: str) -> str:
    source = "none"
    if table["reference_run"]:
        source = f"reference/seed_runs.json `{table['reference_run']}`"
    has_rerun = table["has_rerun"]
    spread_from = "the source's mean"
    if has_rerun:
        spread_from += " and each per-seed value of the rerun"
    lines = [
        f"# {run_name}: {table['name']}",
        "",
        f"Our config: {table['num_seeds']} seeds, {table['num_steps']} steps, p = {table['p']}, "
        f"validation: {table['eval_mode']}. Source: {source} "
        f"({table['source_title'] or 'none'}), the mean over its {SOURCE_NUM_SEEDS} seeds "
        f"({SOURCE_NUM_STEPS} steps, p = {SOURCE_P}; no per-seed values published).",
        *(
            [
                "Rerun: reference/reference_baseline_rerun.json, its mean and [min, max] over its "
                "seeds."
            ]
            if has_rerun
            else []
        ),
        "",
        "Ours: mean ± standard error over our seeds (std with ddof = 1, divided by sqrt(n)), "
        "from the logs at the last logged step; step_val_acc_99 counts a seed that never "
        "exceeds the threshold as the last step (the source's convention).",
        f"Spread: [min, max] of {spread_from}. A metric is inside when our mean "
        f"± {NUM_STDERRS} standard errors overlaps the spread. A task's verdict is inside when "
        f"{' and '.join(VERDICT_METRICS)} are both inside; the other metrics are marked but not "
        f"part of it. Verdicts are given only to tasks run at the source's full length "
        f"({SOURCE_NUM_STEPS} steps, p = {SOURCE_P}) with every seed logged to the last step; "
        "other tasks show their numbers without marks.",
        "",
        "| task | status | seeds | last step | verdict |",
        "|---|---|---|---|---|",
    ]
    for task, entry in table["tasks"].items():
        status = entry["status"] + (f" ({entry['note']})" if entry["note"] else "")
        lines.append(
            f"| {task} | {status} | {entry['seeds']} | {_num(entry['last_step'])} | "
            f"{entry['verdict'] or '–'} |"
        )
    header = ["metric", "ours", "source"] + (["rerun mean [min, max]"] if has_rerun else [])
    header += ["spread", "in spread"]
    for task, entry in table["tasks"].items():
        lines += ["", f"## {task}", ""]
        if entry["status"] == NOT_RUN:
            lines.append(f"Not run ({entry['note']}).")
            continue
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for metric, m in entry["metrics"].items():
            cells = [metric, _ours_cell(m["ours"]), _num(m["source_mean"])]
            if has_rerun:
                values = m["rerun_values"]
                cells.append(
                    "–"
                    if not values
                    else f"{_num(m['rerun_mean'])} [{_num(min(values))}, {_num(max(values))}]"
                )
            spread = m["spread"]
            cells.append("–" if spread is None else f"[{_num(spread[0])}, {_num(spread[1])}]")
            cells.append(_inside_cell(m["inside"]))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def gates_markdown(gates: dict) -> str:
    """The gate analysis (mean over seeds) of a fusion run, one row per task."""
    lines = [
        "",
        "## Gate analysis (validation split, mean over seeds)",
        "",
        "| task | mean weight per expert | top-choice share per expert | entropy / max |",
        "|---|---|---|---|",
    ]

    def flat(values):
        return ", ".join(_num(v) for v in np.ravel(np.asarray(values, np.float64)))

    for task in _ordered(gates):
        mean = gates[task]["mean"]
        label = f"{task} (step {gates[task]['step']})" if "step" in gates[task] else task
        lines.append(
            f"| {label} | {flat(mean['mean_weight'])} | "
            f"{flat(mean['top_choice_share'])} | "
            f"{_num(mean['entropy'])} / {_num(mean['max_entropy'])} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Writing results/


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _copy(src: str, dst: str) -> None:
    if os.path.exists(dst) and os.path.samefile(src, dst):
        return
    shutil.copyfile(src, dst)


def _mirror(workdir: str, run_dir: str, names: list[str]) -> None:
    """Copies the files `names` the workdir has, and removes those it lacks from an earlier
    generation of the run folder (they would describe another run)."""
    for fname in names:
        src, dst = os.path.join(workdir, fname), os.path.join(run_dir, fname)
        if os.path.exists(src):
            _copy(src, dst)
        elif os.path.exists(dst):
            os.remove(dst)


def _run_info(name: str, workdir: str, config: dict, kind: str) -> dict:
    info = {
        "name": name,
        "title": config.get("name"),
        "kind": kind,
        "reference_run": config.get("reference_run"),
        "source": os.path.normpath(workdir),
    }
    previous = os.path.join(workdir, "run.json")
    if os.path.exists(previous):  # The workdir is itself a results folder: keep its source.
        info["source"] = files.read_json(previous)["source"]
    device = None
    for path in (os.path.join(workdir, "compute.json"), os.path.join(workdir, "comparison.json")):
        if os.path.exists(path):
            data = files.read_json(path)
            device = data.get("device") or next(
                (v.get("device") for v in data.values() if isinstance(v, dict) and "device" in v),
                None,
            )
            if device:
                break
    info["device"] = device
    return info


def write_grokking_run(name, workdir, config, run_dir, seed_runs, plots=True) -> dict:
    reference_run = config.get("reference_run")
    rerun = files.read_json(RERUNS[reference_run]) if reference_run in RERUNS else {}
    tasks = _config_tasks(config)
    task_records = {t: logs.read(os.path.join(workdir, t, "metrics.jsonl")) for t in tasks}
    table = run_table(config, task_records, seed_runs, rerun)
    for task, records in task_records.items():
        if records:
            os.makedirs(os.path.join(run_dir, task), exist_ok=True)
            _write_text(
                os.path.join(run_dir, task, "metrics.jsonl"),
                "".join(json.dumps(r) + "\n" for r in records),
            )
        elif os.path.isdir(os.path.join(run_dir, task)):  # logged in an earlier generation only
            shutil.rmtree(os.path.join(run_dir, task))
    # final_info.json holds the tasks logged to the config's last step (the reference's format).
    complete = {
        t: task_records[t]
        for t, e in table["tasks"].items()
        if e["status"] not in (NOT_RUN, UNFINISHED)
    }
    info = results.final_info(complete, config["num_steps"], config["eval"]["acc_threshold"])
    files.write_json(os.path.join(run_dir, "final_info.json"), info)
    files.write_json(os.path.join(run_dir, "table.json"), table)
    markdown = to_markdown(table, name)
    heatmaps = {
        f
        for d in (workdir, run_dir)
        for f in os.listdir(d)
        if f.startswith("gate_heatmap_") and f.endswith(".png")
    }
    _mirror(workdir, run_dir, ["compute.json", "gate_analysis.json", *sorted(heatmaps)])
    if os.path.exists(os.path.join(workdir, "gate_analysis.json")):
        markdown += gates_markdown(files.read_json(os.path.join(workdir, "gate_analysis.json")))
    _write_text(os.path.join(run_dir, "table.md"), markdown)
    if plots:
        plots_lib.plot_curves({config.get("name", name): task_records}, run_dir)
    return table


def write_experiment_run(workdir: str, run_dir: str, render) -> None:
    """The experiment's files, with comparison.md rendered anew from its comparison.json by
    `render` (None: copied)."""
    _mirror(workdir, run_dir, list(COMPARISON_FILES))
    data = os.path.join(workdir, "comparison.json")
    if render and os.path.exists(data):
        _write_text(os.path.join(run_dir, "comparison.md"), render(files.read_json(data)))


def _run_lines(out_dir: str, name: str) -> list[str]:
    run_dir = os.path.join(out_dir, name)
    info = files.read_json(os.path.join(run_dir, "run.json"))
    listing = sorted(os.listdir(run_dir))
    config = files.read_json(os.path.join(run_dir, "config.json"))
    lines = [
        f"## [{name}]({name}/): {info['title'] or info['kind']}",
        "",
        f"* source workdir: `{info['source']}`; kind: {info['kind'] or 'grokking'}; "
        f"device: {info['device'] or 'not recorded'}",
    ]
    if os.path.exists(os.path.join(run_dir, "table.json")):
        table = files.read_json(os.path.join(run_dir, "table.json"))
        lines.append(
            f"* reference: seed_runs.json `{info['reference_run']}`"
            + (" and the published rerun" if table["has_rerun"] else "")
        )
        for task, entry in table["tasks"].items():
            status = entry["status"] + (f" ({entry['note']})" if entry["note"] else "")
            verdict = f"; verdict: {entry['verdict']}" if entry["verdict"] else ""
            lines.append(f"* {task}: {status}{verdict}")
        num_plots = sum(f.endswith(".png") and not f.startswith("gate_") for f in listing)
        gate = "gate_analysis.json" in listing
        is_fusion = config.get("model", {}).get("name") == "fusion"
        lines.append(
            f"* files: table.md, table.json, final_info.json, {num_plots} plots"
            + (", gate analysis" if gate else "")
            + (
                " (gate analysis missing: run --mode=analyze on the workdir)"
                if is_fusion and not gate
                else ""
            )
            + ", config.json, logs (<task>/metrics.jsonl)"
        )
    else:
        setup = {
            "tasks": ", ".join(_ordered(_config_tasks(config))),
            "p": config.get("data", {}).get("p"),
            "domains": config.get("data", {}).get("domains"),
            "experts": config.get("data", {}).get("expert_domains"),
            "base": config.get("model", {}).get("base"),
            "seeds": config.get("num_seeds"),
        }
        lines.append(
            "* "
            + "; ".join(f"{k}: {v}" for k, v in setup.items() if v not in ("", None))
            + " (config.json has the rest)"
        )
        present = [f for f in COMPARISON_FILES if f in listing]
        if "comparison.md" not in present:
            lines.append("* unfinished: no comparison.md in the workdir")
        lines.append(f"* files: {', '.join(present + ['config.json'])}")
    return lines + [""]


def write_index(out_dir: str) -> str:
    """results/index.md: every run folder present in `out_dir` (with a run.json)."""
    names = sorted(
        n for n in os.listdir(out_dir) if os.path.exists(os.path.join(out_dir, n, "run.json"))
    )
    lines = [
        "# Results",
        "",
        "Written by `python main.py --mode=results` from the result workdirs named below; "
        "do not edit by hand. Verdicts and spreads: see each folder's table.md.",
        "",
    ]
    for name in names:
        lines += _run_lines(out_dir, name)
    text = "\n".join(lines)
    _write_text(os.path.join(out_dir, "index.md"), text)
    return text


def write_results(
    workdirs, out_dir: str, markdown_of, seed_runs_path: str = SEED_RUNS, plots: bool = True
) -> dict:
    """Writes `out_dir/<name>/` for every workdir and `out_dir/index.md`; returns the tables.
    `markdown_of(kind)`: the renderer of an experiment kind's comparison.json
    (`modes.markdown_of`)."""
    if os.path.exists(os.path.join(out_dir, "config.json")):
        raise UserError(f"--workdir={out_dir} is a training workdir; give a results folder")
    entries = []
    for name, workdir in parse_workdirs(workdirs):
        if not os.path.exists(os.path.join(workdir, "config.json")):
            raise UserError(f"{workdir} has no config.json: is it a fusion_jax workdir?")
        config = files.read_json(os.path.join(workdir, "config.json"))
        name = name or config.get("reference_run") or os.path.basename(os.path.normpath(workdir))
        entries.append((name, workdir, config))
    names = [e[0] for e in entries]
    if len(set(names)) < len(names):
        raise UserError(
            f"two workdirs would share a results folder ({names}): "
            "name them with name=path in --workdirs"
        )
    seed_runs = files.read_json(seed_runs_path)
    tables = {}
    for name, workdir, config in entries:
        run_dir = os.path.join(out_dir, name)
        if os.path.isdir(run_dir) and any(
            os.path.isdir(os.path.join(run_dir, d, "checkpoints")) for d in os.listdir(run_dir)
        ):
            raise UserError(f"{run_dir} holds checkpoints: it is a training workdir, not results")
        os.makedirs(run_dir, exist_ok=True)
        kind = config.get("experiment")
        info = _run_info(name, workdir, config, kind)
        _copy(os.path.join(workdir, "config.json"), os.path.join(run_dir, "config.json"))
        if kind is None:
            tables[name] = write_grokking_run(name, workdir, config, run_dir, seed_runs, plots)
        else:
            write_experiment_run(workdir, run_dir, markdown_of(kind))
        files.write_json(os.path.join(run_dir, "run.json"), info)
    write_index(out_dir)
    return tables
