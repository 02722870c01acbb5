"""The comparison tables of the experiments (configs/compare.py, configs/lm_study.py), rendered
from their comparison.json alone, so that `--mode=results` rewrites them from the data they
show and a changed renderer cannot leave a committed table behind."""

import numpy as np

from fusion_jax.evaluate import results


def mean_se(values, digits: int = 4) -> str:
    """`mean ± standard error` of per-seed values (just the mean for one seed)."""
    v = np.asarray(values, float)
    if len(v) < 2:
        return f"{v.mean():.{digits}f}"
    return f"{v.mean():.{digits}f} ± {results.stderr(v):.{digits}f}"


def merge_markdown(out: dict) -> str:
    """comparison.md of configs/compare.py from its comparison.json."""
    names = out["tasks"]
    metrics = ("mean_acc", "mean_loss", "mean_train_acc")
    header = ["method"] + [f"{n} acc / loss" for n in names] + [
        "mean acc", "mean loss", "mean train acc", "params", "FLOPs/example", "examples/s",
        "training FLOPs",
    ]  # fmt: skip
    lines = [
        "# Static merging and DAM against dynamic fusion",
        "",
        f"Validation split of each task, mean ± standard error over {len(out['seeds'])} seeds "
        f"{out['seeds']} (each seed: its own split, inits and batches; mean train acc: the "
        f"training split without the held-out slice); measured on {out['device']}. Merge "
        "hyper-parameters were chosen per seed on a held-out slice of the training split "
        "(comparison.json lists the grids, the choices and every seed's values). Training "
        "FLOPs: the method's own training per seed (for end-to-end fusion, the experts' "
        "fine-tuning too); 0 for merges computed in closed form.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in out["rows"]:
        s = r["per_seed"]
        cells = [r["method"]]
        cells += [f"{mean_se(s[f'{n}_acc'])} / {mean_se(s[f'{n}_loss'], 3)}" for n in names]
        cells += [mean_se(s[m], 3 if m == "mean_loss" else 4) for m in metrics]
        cells += [str(r["params"]), f"{r['flops_per_example']:.3g}",
                  f"{r['examples_per_s']:.3g}", f"{r['train_flops']:.3g}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Hyper-parameters chosen on the held-out slice, per seed:", ""]
    for label, search in out["grid_search"].items():
        chosen = "; ".join(
            f"seed {seed}: " + ", ".join(f"{k}={v}" for k, v in hp.items())
            for seed, hp in zip(out["seeds"], search["chosen"], strict=True)
        )
        lines.append(f"* {label}: {chosen}")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text as one Markdown table cell: pipes escaped, line breaks shown as ⏎."""
    return text.replace("|", "\\|").replace("\r", "").replace("\n", " ⏎ ")


def study_markdown(out: dict) -> str:
    """comparison.md of configs/lm_study.py from its comparison.json."""
    names = out["domains"]
    experts = out.get("experts", names)
    base = out.get("base", "trained here")
    lines = [
        f"Validation bits per byte per domain (mean ± standard error over seeds {out['seeds']}); "
        f"measured on {out['device']}. Base: {base}. Static-merge hyper-parameters were chosen "
        "per seed on a holdout slice of the training documents. Training FLOPs: the whole "
        "pipeline the method needs, per seed (base, experts, its own training; a pretrained "
        "base's pretraining is not counted).",
        "",
        "| method | " + " | ".join(names) + " | mean | params | FLOPs/token | tokens/s "
        "| training FLOPs |",
        "|---|" + "---|" * (len(names) + 5),
    ]
    for row in out["rows"]:
        cells = [mean_se(row["bits_per_byte"][d]) for d in names]
        lines.append(
            f"| {row['method']} | " + " | ".join(cells)
            + f" | {mean_se(row['mean_bits_per_byte'])} | {row['params']} "
            f"| {row['flops_per_token']:.3g} | {row['tokens_per_s']:.3g} "
            f"| {row['training_flops']:.3g} |"
        )  # fmt: skip
    chosen = [r for r in out["rows"] if r.get("hparams")]
    if chosen:
        lines += ["", "Hyper-parameters chosen on the holdout slice, per seed:", ""]
        for r in chosen:
            per_seed = [", ".join(f"{k}={v}" for k, v in hp.items()) for hp in r["hparams"]]
            lines.append(f"* {r['method']}: " + "; ".join(per_seed))
    lines += ["", "Gate routing on each domain's validation text (mean gate weight per expert; "
              "rows: text domain, columns: experts), seed mean:", ""]  # fmt: skip
    for name, r in out["routing"].items():
        w = np.mean(np.asarray(r["mean_gate_weight"]), 0)
        lines += [f"**{name}** — top expert is the text's own: "
                  f"{mean_se(r['top_is_own_expert'])} of tokens", "",
                  "| text \\ expert | " + " | ".join(experts) + " |",
                  "|---|" + "---|" * len(experts)]  # fmt: skip
        lines += [f"| {d} | " + " | ".join(f"{x:.3f}" for x in w[i]) + " |"
                  for i, d in enumerate(names)]  # fmt: skip
        lines.append("")
    for name, c in out.get("fusion_selection", {}).items():
        curve = np.asarray(c["holdout_bits_per_byte"], float)
        kept = [c["steps"][int(np.nanargmin(seed))] for seed in curve]
        lines += [f"Fusion ({name}) on the holdout selection slice, seed mean, by step: "
                  + ", ".join(f"{s}: {v:.4f}" for s, v in zip(c["steps"], curve.mean(0),
                                                              strict=True))
                  + f"; step kept per seed: {kept}", ""]  # fmt: skip
    for domain, sample in out.get("samples", {}).items():
        lines += [f"Greedy continuations on {domain} (seed 0) of: {_cell(sample['prompt'])}", "",
                  "| model | continuation |", "|---|---|"]  # fmt: skip
        lines += [f"| {label} | {_cell(t)} |" for label, t in sample["continuations"].items()]
        lines.append("")
    return "\n".join(lines) + "\n"


# config.experiment -> comparison.md from comparison.json.
MARKDOWN = {"merge_compare": merge_markdown, "lm_study": study_markdown}
