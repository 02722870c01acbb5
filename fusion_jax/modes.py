"""One entry function per `--mode` of main.py, each `(config, workdir, **flags)`, and the one
registry of experiment kinds (`KINDS`): a config's kind (`config.experiment`; None is grokking
training) -> its spec (fusion_jax/specs/: field rules, safe changes, back-compat defaults), the
modes that run it, its runner and the renderer of its comparison.json. Adding an experiment: its
spec module, its runner under experiments/, its config file and one line in `KINDS`.

Every mode that writes into a workdir holds its lock, and checks the config against the
workdir's config.json first (fusion_jax/workdir.py). Modes that read a trained workdir (eval,
analyze, report) use its config.json; `--config` is optional there and must agree with it.
"""

import dataclasses
import os
from collections.abc import Callable

import ml_collections

from fusion_jax import pretrained, runtime, schema
from fusion_jax import workdir as workdir_lib
from fusion_jax.data import tasks as tasks_lib
from fusion_jax.errors import UserError
from fusion_jax.evaluate import compare as compare_lib
from fusion_jax.evaluate import comparisons, eval_loop, results, results_report
from fusion_jax.experiments import lm_fuse, lm_merge, lm_study
from fusion_jax.experiments import merge_compare as merge_compare_lib
from fusion_jax.specs import grokking
from fusion_jax.specs import lm_fuse as lm_fuse_spec
from fusion_jax.specs import lm_merge as lm_merge_spec
from fusion_jax.specs import lm_study as lm_study_spec
from fusion_jax.specs import merge_compare as merge_compare_spec
from fusion_jax.train import loop


@dataclasses.dataclass(frozen=True)
class Kind:
    spec: schema.Spec
    modes: tuple[str, ...]  # `compare`, `results` and `fetch` need no config
    # The main job (`--mode=train`); None: grokking training (train/loop.py).
    run: Callable | None = None
    markdown: Callable[[dict], str] | None = None  # comparison.json -> comparison.md


KINDS: dict[str | None, Kind] = {
    None: Kind(grokking.SPEC, ("train", "eval", "analyze", "report")),
    "merge_compare": Kind(merge_compare_spec.SPEC, ("train", "merge_compare"),
                          merge_compare_lib.run, comparisons.merge_markdown),
    "lm_merge": Kind(lm_merge_spec.SPEC, ("train", "extract_lora"), lm_merge.run),
    "lm_fuse": Kind(lm_fuse_spec.SPEC, ("train", "generate"), lm_fuse.train),
    "lm_study": Kind(lm_study_spec.SPEC, ("train", "merge_compare", "export"), lm_study.run,
                     comparisons.study_markdown),
}  # fmt: skip


def kind_of(config) -> str | None:
    """The config's kind; refuses unknown ones."""
    kind = config.get("experiment")
    if kind not in KINDS:
        raise UserError(
            f"config.experiment={kind!r}: must be one of "
            + ", ".join(repr(k) for k in KINDS if k is not None)
        )
    return kind


def spec_of(config) -> schema.Spec:
    return KINDS[kind_of(config)].spec


def validate(config, devices: int | None = None) -> None:
    """`Spec.validate` of the config's kind."""
    spec_of(config).validate(config, devices)


def stored_config(workdir: str) -> dict | None:
    """The workdir's config.json with the fields added since it was written filled in (its
    kind's `added_fields`), or None if the workdir has none."""
    return workdir_lib.stored_config(workdir, spec_of)


def markdown_of(kind: str | None):
    """The renderer of the kind's comparison.json (None: the kind writes none)."""
    return KINDS[kind].markdown if kind in KINDS else None


def check_mode(config, mode: str) -> None:
    """Refuses a config that `mode` cannot run, naming the modes and configs to use instead."""
    if config is None:
        raise UserError(f"--config is required for --mode={mode}")
    kind = KINDS[kind_of(config)]
    if mode in kind.modes:
        return
    runs = [k.spec.config_files for k in KINDS.values() if mode in k.modes]
    raise UserError(
        f"--mode={mode} does not run {kind.spec.config_files} configs: their modes are "
        f"{', '.join(kind.modes)}; --mode={mode} is for {', '.join(runs)}"
    )


def _trained_config(config, workdir: str, mode: str):
    """The workdir's own config for a mode that reads it; a `--config` given must agree."""
    if config is not None:
        check_mode(config, mode)
    config = workdir_lib.read_config(config, workdir, spec_of)
    check_mode(config, mode)
    return config


def train(config, workdir: str, **_):
    """Trains (resuming if possible) every task, then writes final_info.json, logs and plots.

    A config naming an `experiment` (configs/lm_merge.py, ...) runs that experiment instead.
    """
    check_mode(config, "train")
    validate(config)  # Before jax.distributed reads config.train.
    runtime.start(config)
    with workdir_lib.claim(config, workdir, spec_of(config)):
        if (run := KINDS[kind_of(config)].run) is not None:
            return run(config, workdir)
        task_records = loop.train(config, workdir)
        info = results.write_report(config, workdir, task_records) if runtime.is_primary() else None
        eval_loop.analyze(config, workdir)
        runtime.wait_for_all("fusion_jax train done")
        return info


def evaluate(config, workdir: str, step: int | None = None, **_):
    """Restores checkpoints and recomputes train/validation metrics on the full splits."""
    config = _trained_config(config, workdir, "eval")
    runtime.check_devices(config)  # One process reads the workdir.
    with workdir_lib.lock(workdir):
        return eval_loop.evaluate(config, workdir, step)


def analyze(config, workdir: str, step: int | None = None, **_):
    """Compute accounting (params, FLOPs/example, examples/s) and, for fusion, gate analysis."""
    config = _trained_config(config, workdir, "analyze")
    runtime.check_devices(config)  # One process reads the workdir.
    with workdir_lib.lock(workdir):
        return eval_loop.analyze(config, workdir, step)


def report(config, workdir: str, **_):
    """Rewrites final_info.json and the plots from the logs in the workdir (no computation)."""
    config = _trained_config(config, workdir, "report")
    names = tasks_lib.parse_task_names(config.tasks)
    task_records = results.read_task_records(workdir, names)
    if not any(task_records.values()):
        raise UserError(f"{workdir} has no training logs (<task>/metrics.jsonl) for tasks {names}")
    with workdir_lib.lock(workdir):
        return results.write_report(config, workdir, task_records)


def compare(config, workdir: str, workdirs: str = "", **_):
    """Overlays the curves of finished workdirs and tabulates them beside the seed's numbers."""
    del config  # Each workdir carries its own config.json.
    if os.path.exists(os.path.join(workdir, workdir_lib.CONFIG_FILE)):
        # Its own plots and tables would be overwritten by the comparison's.
        raise UserError(f"--workdir={workdir} is a training workdir; give a comparison folder")
    with workdir_lib.lock(workdir):
        return compare_lib.compare([w for w in workdirs.split(",") if w], workdir)


def results_folder(config, workdir: str, workdirs: str = "", **_):
    """Writes the results/ folder (--workdir) from result workdirs: per run its tables beside
    the source's numbers, final_info.json, plots and gate analysis; reads the workdirs only."""
    del config  # Each workdir carries its own config.json.
    with workdir_lib.lock(workdir):
        return results_report.write_results(workdirs, workdir, markdown_of)


def merge_compare(config, workdir: str, **_):
    """The merging experiment (configs/compare.py; the LM study of configs/lm_study.py too):
    what `--mode=train` runs for these configs."""
    check_mode(config, "merge_compare")
    return train(config, workdir)


def export(config, workdir: str, **_):
    """Writes the trained experts of a study on a pretrained base (configs/lm_study.py:smollm2)
    as checkpoint folders with a GGUF file each, under `<workdir>/export/`."""
    config = _trained_config(config, workdir, "export")
    with workdir_lib.lock(workdir):
        return lm_study.export(config, workdir)


def generate(config, workdir: str, **_):
    """Continues `config.generate.prompt` with a trained LM fusion workdir (configs/lm_fuse.py):
    the model is the workdir's (its config.json); --config supplies the generate section."""
    check_mode(config, "generate")
    workdir_lib.check_exists(workdir)
    stored = stored_config(workdir)
    if stored is not None:
        # The workdir's config describes the trained model; only the generate section (prompt,
        # length, sampling) comes from --config, so training flags need not be repeated.
        generate_section = config.generate
        config = ml_collections.ConfigDict(stored)
        config.generate = generate_section
    validate(config)
    return lm_fuse.generate(config, workdir)


def extract_lora(config, workdir: str, **_):
    """Writes a rank-`config.lora_rank` LoRA adapter (PEFT's layout) of each of
    `config.models` against `config.base` under `<workdir>/lora/` (configs/lm_merge.py)."""
    check_mode(config, "extract_lora")
    if not config.base:  # first: else the rule of the default method (TIES) would name it
        raise UserError("config.base='': must be the checkpoint the fine-tunes are taken against "
                        "for --mode=extract_lora")  # fmt: skip
    return lm_merge.extract_lora(config, workdir)


def fetch(config, workdir, model: str | None = None, **_):
    """Downloads a pretrained model by name (fusion_jax/pretrained.py) and prints its path."""
    del config, workdir  # The model goes to the cache, whatever the workdir.
    if not model:
        raise UserError(f"--mode=fetch needs --model: one of {', '.join(pretrained.MODELS)}")
    path = pretrained.fetch(model)
    print(path)
    return path


# Modes that need no --workdir.
NO_WORKDIR = ("fetch",)

MODES = {
    "fetch": fetch,
    "train": train,
    "eval": evaluate,
    "analyze": analyze,
    "report": report,
    "compare": compare,
    "results": results_folder,
    "merge_compare": merge_compare,
    "generate": generate,
    "export": export,
    "extract_lora": extract_lora,
}
