"""Trustworthy runs: config validation, workdir binding, damaged checkpoints, the lock, one-line
user errors (DESIGN.md §5, issue 9)."""

import dataclasses
import functools
import glob
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import baseline, compare, dyn_fusion
from fusion_jax import modes, schema
from fusion_jax import workdir as workdir_lib
from fusion_jax.errors import UserError
from fusion_jax.experiments import stages
from fusion_jax.train import checkpoint, logs, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA = os.path.join(ROOT, "tests", "fixtures", "lm", "llama")
GROKKING_SAFE = (
    "name, num_steps (increase only), tasks (reorder only), train.log_every, "
    "train.checkpoint_every, train.max_to_keep, train.num_devices, train.num_processes, "
    "train.coordinator_address, train.process_id, train.checkpoint_every_secs, "
    "train.require_accelerator, data.source, data.tfds_dir"
)

# Every config file and its variants. A new config file must be added here, and its kind needs
# a table in its spec module (fusion_jax/specs/).
CONFIG_VARIANTS = {
    "baseline": [None, "quick", "tiny"],
    "dyn_fusion": [None, "layers4", "heads6", "layers5", "quick", "tiny", "layers4,tiny",
                   "heads6,quick", "layers5,tiny"],
    "compare": [None, "quick", "tiny"],
    "lm_merge": [None],
    "lm_fuse": [None],
    "lm_study": [None, "quick", "smollm2", "smollm2_full", "tiny"],
}  # fmt: skip


def tiny():
    config = baseline.get_config("tiny")
    config.train.num_devices = 1
    return config


def all_configs():
    for name, variants in CONFIG_VARIANTS.items():
        module = importlib.import_module(f"configs.{name}")
        for variant in variants:
            yield f"{name}:{variant}", module.get_config(variant)


def with_inputs(config):
    """LM configs name checkpoint directories and text domains; give them the test fixtures
    (the fortunes packages may be missing)."""
    kind = config.get("experiment")
    if kind == "lm_study":
        config.data.domains = f"a={LLAMA}/config.json,b={LLAMA}/generation_config.json"
        if config.data.expert_domains:
            config.data.expert_domains = "a,b"
    if kind == "lm_merge":
        config.base, config.models = LLAMA, f"{LLAMA},{LLAMA}"
    if kind == "lm_fuse":
        config.models = f"{LLAMA},{LLAMA}"
        config.data.sources = f"{LLAMA}/config.json,{LLAMA}/generation_config.json"
    return config


def set_field(config, field, value):
    *parents, name = field.split(".")
    for part in parents:
        config = config[part]
    config[name] = value


def snapshot(directory):
    """Every file under `directory` with its bytes, to show that nothing was written."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, directory)] = (fh.read(), os.path.getmtime(path))
    return out


# --- every config value is checked before any work ---------------------------------------------


def test_config_files_are_all_listed():
    found = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))}
    assert found - {"__init__"} == set(CONFIG_VARIANTS), (
        "list a new config file's variants in CONFIG_VARIANTS and give its kind a rules table"
    )


@pytest.mark.parametrize(
    "name, arg, message",
    [
        ("dyn_fusion", "layer4", "Unknown config variant 'layer4'; known: heads6, layers4, "
         "layers5, quick, tiny."),
        ("baseline", "layers4", "Unknown config variant 'layers4'; known: quick, tiny."),
        ("lm_merge", "quick", "configs/lm_merge.py has no variants, got 'quick'; set fields with "
         "--config.<field>"),
        ("lm_fuse", "tiny", "configs/lm_fuse.py has no variants, got 'tiny'; set fields with "
         "--config.<field>"),
    ],
)  # fmt: skip
def test_a_misspelt_variant_names_the_known_ones(name, arg, message):
    module = importlib.import_module(f"configs.{name}")
    with pytest.raises(ValueError) as e:
        module.get_config(arg)
    assert str(e.value) == message


def test_every_field_of_every_config_has_a_rule_and_every_rule_a_field():
    seen = {kind: set() for kind in modes.KINDS}
    for label, config in all_configs():
        kind = modes.kind_of(config)
        fields = set(schema.flatten(config))
        missing = fields - set(modes.KINDS[kind].spec.rules)
        assert not missing, f"{label}: fields without a validation rule: {sorted(missing)}"
        seen[kind] |= fields
    for kind, entry in modes.KINDS.items():
        rules = entry.spec.rules
        assert set(rules) == seen[kind], (
            f"rules of {kind!r} for no field: {set(rules) - seen[kind]}"
        )


@pytest.mark.parametrize(
    "kind, message",
    [("lm_fuse", "config.models='': must be 2 or more existing checkpoint directories or "
      ".gguf files, comma-separated"),
     ("lm_merge", "config.models='': must be 1 or more existing checkpoint directories or "
      ".gguf files, comma-separated"),
     ("lm_study", "config.seed=-1: must be an integer >= 0"),
     ("merge_compare", "config.seed=-1: must be an integer >= 0")],
)  # fmt: skip
def test_experiments_called_from_python_check_the_config_before_writing(tmp_path, kind, message):
    runners = {k: entry.run for k, entry in modes.KINDS.items() if entry.run is not None}
    assert set(runners) == {"lm_fuse", "lm_merge", "lm_study", "merge_compare"}
    file = modes.KINDS[kind].spec.config_files
    config = importlib.import_module(file[: -len(".py")].replace("/", ".")).get_config()
    config.seed = -1
    with pytest.raises(UserError) as e:
        runners[kind](config, str(tmp_path / "w"))
    assert str(e.value) == message
    assert not (tmp_path / "w").exists()


def test_shipped_configs_are_valid():
    for _, config in all_configs():
        modes.validate(with_inputs(config), devices=4)


def lm_merge_config(**changes):
    from configs import lm_merge

    config = with_inputs(lm_merge.get_config())
    for field, value in changes.items():
        set_field(config, field, value)
    return config


BAD_VALUES = [
    ("baseline", {"opt.learning_rate": -1e-3}, "config.opt.learning_rate=-0.001: must be a "
     "number > 0"),
    ("baseline", {"opt.weight_decay": -0.5}, "config.opt.weight_decay=-0.5: must be a number "
     ">= 0"),
    ("baseline", {"opt.warmup_steps": -5}, "config.opt.warmup_steps=-5: must be an integer >= 0"),
    ("baseline", {"opt.b2": 1.0}, "config.opt.b2=1.0: must be a number in [0, 1)"),
    ("baseline", {"tasks": "x_div_y", "data.p": 10}, "config.data.p=10: must be a prime for task "
     "x_div_y (b^(p-2) is the inverse of b mod p only when p is prime)"),
    ("baseline", {"data.frac_train": 1.0}, "config.data.frac_train=1.0: must be a number in "
     "(0, 1)"),
    ("baseline", {"data.frac_train": 0.005}, "config.data.frac_train=0.005: must be a fraction "
     "that leaves training and validation pairs among the 121 pairs of x_plus_y"),
    ("baseline", {"train.checkpoint_every": 15}, "config.train.checkpoint_every=15: must be a "
     "multiple of config.train.log_every=10"),
    ("baseline", {"eval.acc_threshold": 1.5}, "config.eval.acc_threshold=1.5: must be a number "
     "in [0, 1]"),
    ("baseline", {"model.name": "mystery"}, "config.model.name='mystery': must be one of "
     "'transformer', 'fusion'"),
    ("baseline", {"model.name": "fusion"}, "config.model.name='fusion': must be 'transformer' "
     "unless the config has the fusion model's fields (configs/dyn_fusion.py)"),
    ("dyn_fusion", {"model.top_k": 4}, "config.model.top_k=4: must be <= "
     "config.model.num_experts=3 (0 = all experts)"),
    ("dyn_fusion", {"model.fusion_context": "words"}, "config.model.fusion_context='words': must "
     "be one of 'experts', 'tokens'"),
    ("compare", {"data.holdout_frac": 0.001}, "config.data.holdout_frac=0.001: must be a "
     "fraction that leaves fitting and held-out pairs among the 24 training pairs of x_plus_y"),
    ("compare", {"grid.densities": (0.5, 0.0)}, "config.grid.densities=(0.5, 0.0): must be a "
     "non-empty tuple, each a number in (0, 1]"),
    ("compare", {"dam.nonlinearity": "gelu"}, "config.dam.nonlinearity='gelu': must be one of "
     "'tanh', 'sigmoid', 'relu', 'none'"),
    ("lm_merge", {"method": "ties", "base": ""}, "config.base='': must be a checkpoint directory "
     "for config.method='ties'"),
    ("lm_merge", {"density": 0.0}, "config.density=0.0: must be a number in (0, 1]"),
    ("lm_merge", {"max_shard_size": "2 parsecs"}, "config.max_shard_size='2 parsecs': must be a "
     "size like '2GB', '500MB', '100KB' or bytes >= 1"),
    ("lm_merge", {"models": "/no/such/model"}, "config.models='/no/such/model': must be 1 or "
     "more existing checkpoint directories or .gguf files, comma-separated"),
    ("lm_fuse", {"fusion.top_k": 3}, "config.fusion.top_k=3: must be <= the 2 experts in "
     "config.models (0 = all experts)"),
    ("lm_fuse", {"generate.temperature": -1.0}, "config.generate.temperature=-1.0: must be a "
     "number >= 0"),
    ("lm_study", {"model.num_kv_heads": 3}, "config.model.num_kv_heads=3: must be a divisor of "
     "config.model.num_heads=2"),
]  # fmt: skip


@pytest.mark.parametrize("name,changes,message", BAD_VALUES)
def test_values_out_of_range_are_refused_in_one_line_before_any_work(
    tmp_path, name, changes, message
):
    variant = None if name.startswith("lm_") and name != "lm_study" else "tiny"
    config = with_inputs(importlib.import_module(f"configs.{name}").get_config(variant))
    config.lock()  # as main.py's flags give it: no new fields
    for field, value in changes.items():
        set_field(config, field, value)
    with pytest.raises(UserError) as e:
        modes.train(config, str(tmp_path / "w"))
    assert str(e.value) == message
    assert not (tmp_path / "w").exists()


def test_unknown_missing_and_unknown_kind_fields_are_refused():
    config = tiny()
    config.train.tran = 8
    with pytest.raises(UserError) as e:
        modes.validate(config)
    assert str(e.value) == (
        "config.train.tran=8: not a field of configs/baseline.py, configs/dyn_fusion.py configs "
        "(every field needs a rule in fusion_jax/specs/grokking.py)"
    )
    config = tiny()
    del config.train["batch_size"]
    with pytest.raises(UserError) as e:
        modes.validate(config)
    assert str(e.value) == (
        "config.train.batch_size is missing: configs/baseline.py, configs/dyn_fusion.py configs "
        "need it"
    )
    config = lm_merge_config(experiment="lm_mystery")
    with pytest.raises(UserError) as e:
        modes.validate(config)
    assert str(e.value) == (
        "config.experiment='lm_mystery': must be one of 'merge_compare', 'lm_merge', 'lm_fuse', "
        "'lm_study'"
    )


# --- each config runs its own experiment; a mode says which config or mode to use --------------


def test_compare_config_runs_the_merging_experiment_by_default(tmp_path, monkeypatch):
    calls = []
    ran = lambda c, w: calls.append(w) or "ran"  # noqa: E731
    kind = dataclasses.replace(modes.KINDS["merge_compare"], run=ran)
    monkeypatch.setitem(modes.KINDS, "merge_compare", kind)
    assert modes.train(compare.get_config("tiny"), str(tmp_path)) == "ran"
    assert calls == [str(tmp_path)]
    assert json.load(open(tmp_path / "config.json"))["experiment"] == "merge_compare"


@pytest.mark.parametrize(
    "mode,config,message",
    [
        ("eval", compare.get_config("tiny"), "--mode=eval does not run configs/compare.py "
         "configs: their modes are train, merge_compare; --mode=eval is for configs/baseline.py, "
         "configs/dyn_fusion.py"),
        ("merge_compare", baseline.get_config("tiny"), "--mode=merge_compare does not run "
         "configs/baseline.py, configs/dyn_fusion.py configs: their modes are train, eval, "
         "analyze, report; --mode=merge_compare is for configs/compare.py, configs/lm_study.py"),
        ("generate", dyn_fusion.get_config("tiny"), "--mode=generate does not run "
         "configs/baseline.py, configs/dyn_fusion.py configs: their modes are train, eval, "
         "analyze, report; --mode=generate is for configs/lm_fuse.py"),
        ("train", None, "--config is required for --mode=train"),
    ],
)  # fmt: skip
def test_a_mode_that_cannot_run_a_config_names_what_to_use(tmp_path, mode, config, message):
    with pytest.raises(UserError) as e:
        modes.MODES[mode](config, str(tmp_path / "w"))
    assert str(e.value) == message
    assert not (tmp_path / "w").exists()


# --- a workdir is bound to its config ----------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny baseline trained through the train mode: checkpoints at steps 10 and 20."""
    workdir = str(tmp_path_factory.mktemp("bound"))
    modes.train(tiny(), workdir)
    return workdir


def drift_message(workdir, changes):
    return (
        f"--config differs from the config of {workdir} (config.json) in fields that change "
        f"results: {changes}. Use a new --workdir, or the workdir's values; fields that may "
        f"change: {GROKKING_SAFE}"
    )


def test_resume_with_a_different_config_is_refused_before_writing(trained):
    config = tiny()
    config.num_steps, config.seed = 30, 5  # the mix of seeds [0, 1, 5, 6]
    config.model.num_heads, config.data.frac_train = 2, 0.6
    before = snapshot(trained)
    with pytest.raises(UserError) as e:
        modes.train(config, trained)
    assert str(e.value) == drift_message(
        trained, "seed: 0 → 5, data.frac_train: 0.5 → 0.6, model.num_heads: 4 → 2"
    )
    assert snapshot(trained) == before


def test_extending_num_steps_continues_the_run_exactly(trained, tmp_path):
    extended, straight = str(tmp_path / "extended"), str(tmp_path / "straight")
    shutil.copytree(trained, extended)
    config = tiny()
    config.num_steps = 30
    config.train.log_every = config.train.checkpoint_every = 5  # safe: chunking and saving only
    loop.train(config, extended)
    loop.train(config, straight)
    assert json.load(open(os.path.join(extended, "config.json")))["num_steps"] == 30
    read = lambda w: logs.read(os.path.join(w, "x_plus_y", "metrics.jsonl"))  # noqa: E731
    assert [r["step"] for r in read(extended)][-2:] == [30, 30]
    np.testing.assert_allclose(
        [[r[k] for k in logs.METRICS] for r in read(extended)],
        [[r[k] for k in logs.METRICS] for r in read(straight)],
        rtol=1e-5,
    )
    config.num_steps = 20  # shrinking would leave results past the end
    with pytest.raises(UserError) as e:
        loop.train(config, extended)
    assert str(e.value) == drift_message(extended, "num_steps: 30 → 20 (only an increase is safe)")


def test_safe_changes_are_allowed_and_others_listed(tmp_path):
    config = tiny()
    config.tasks = "x_plus_y,x_minus_y"
    (tmp_path / "config.json").write_text(config.to_json())
    config.tasks, config.name, config.num_steps = "x_minus_y, x_plus_y", "Renamed", 40
    assert workdir_lib.check_binding(config, str(tmp_path), True, modes.spec_of(config)) == [
        "name: 'Baseline' → 'Renamed'",
        "tasks: 'x_plus_y,x_minus_y' → 'x_minus_y, x_plus_y'",
        "num_steps: 20 → 40",
    ]
    config.tasks, config.num_steps, config.opt.b1 = "x_minus_y", 10, 0.8
    with pytest.raises(UserError) as e:
        workdir_lib.check_binding(config, str(tmp_path), True, modes.spec_of(config))
    assert str(e.value) == drift_message(
        str(tmp_path),
        "tasks: 'x_plus_y,x_minus_y' → 'x_minus_y' (only a reordering is safe), num_steps: 20 → "
        "10 (only an increase is safe), opt.b1: 0.9 → 0.8",
    )
    # A mode that only reads the workdir uses its values: a shorter num_steps does not matter.
    config = tiny()
    config.tasks, config.num_steps = "x_plus_y,x_minus_y", 10
    assert workdir_lib.check_binding(config, str(tmp_path), False, modes.spec_of(config)) == [
        "num_steps: 20 → 10"
    ]


@pytest.mark.parametrize(
    "config_file, field",
    [("lm_study", "model.matmul_precision"), ("lm_fuse", "matmul_precision"),
     ("lm_merge", "dam.matmul_precision")],
)  # fmt: skip
def test_a_workdir_from_before_a_field_reads_as_what_the_code_then_did(
    tmp_path, config_file, field
):
    # These workdirs ran at JAX's default matmul precision before the field existed.
    config = importlib.import_module(f"configs.{config_file}").get_config()
    if config_file == "lm_merge":
        config.method = "dam"  # the only merge that reads the field
    stored = json.loads(config.to_json())
    *parents, leaf = field.split(".")
    del functools.reduce(dict.__getitem__, parents, stored)[leaf]
    (tmp_path / "config.json").write_text(json.dumps(stored))
    with pytest.raises(UserError, match=rf"results: {field}: 'default' → 'highest'\. "):
        workdir_lib.check_binding(config, str(tmp_path), True, modes.spec_of(config))
    config.update_from_flattened_dict({field: "default"})
    assert workdir_lib.check_binding(config, str(tmp_path), True, modes.spec_of(config)) == []


def test_the_fields_each_lm_merge_method_never_reads():
    config = importlib.import_module("configs.lm_merge").get_config()
    dam_fields = {f for f in schema.flatten(config) if f.startswith("dam.")}
    later = {"gamma", "epsilon", "select_topk", "max_iter", "tol"}  # the mergekit methods' fields
    static = {"weights", "lam", "density", "drop_rate", "combine", "t"} | later
    expected = {
        "weight_average": {"lam", "density", "drop_rate", "combine", "t", "seed"} | later,
        "task_arithmetic": {"weights", "density", "drop_rate", "combine", "t", "seed"} | later,
        "ties": {"weights", "drop_rate", "combine", "t", "seed"} | later,
        "dare": {"weights", "t"} | later,
        "slerp": {"weights", "lam", "density", "drop_rate", "combine", "seed"} | later,
        "breadcrumbs": static - {"density", "gamma", "lam"} | {"seed"},
        "breadcrumbs_ties": static - {"density", "gamma", "lam"} | {"seed"},
        "della": static - {"density", "epsilon", "lam"},
        "della_linear": static - {"density", "epsilon", "lam"},
        "model_stock": static | {"seed"},
        "sce": static - {"select_topk"} | {"seed"},
        "multislerp": static - {"weights"} | {"seed"},
        "karcher": static - {"max_iter", "tol"} | {"seed"},
    }
    # lora_rank is read by --mode=extract_lora only; overrides by every static merge.
    expected = {m: u | dam_fields | {"lora_rank"} for m, u in expected.items()}
    expected["dam"] = static | {"overrides", "lora_rank", "tokenizer_source"}
    for method, unused in expected.items():
        config.method = method
        assert modes.spec_of(config).unused(config) == unused, method
    assert (
        len(dam_fields) == 20
        and modes.spec_of(dyn_fusion.get_config()).unused(dyn_fusion.get_config()) == set()
    )


def test_an_lm_study_workdir_from_before_capped_windows_kept_the_first_ones(tmp_path):
    config = importlib.import_module("configs.lm_study").get_config("quick")
    stored = json.loads(config.to_json())
    del stored["data"]["capped_windows"]
    (tmp_path / "config.json").write_text(json.dumps(stored))
    with pytest.raises(UserError, match=r"results: data.capped_windows: 'first' → 'spread'\. "):
        workdir_lib.check_binding(config, str(tmp_path), True, modes.spec_of(config))
    config.data.capped_windows = "first"
    assert workdir_lib.check_binding(config, str(tmp_path), True, modes.spec_of(config)) == []


@pytest.mark.parametrize("name, field", [("lm_fuse", "data"), ("lm_merge", "dam")])
def test_an_lm_workdir_from_before_special_tokens_keeps_the_plain_text_tokens(
    tmp_path, name, field
):
    config = importlib.import_module(f"configs.{name}").get_config()
    if name == "lm_merge":
        config.method = "dam"  # the one method that reads dam.*
    stored = json.loads(config.to_json())
    del stored[field]["special_tokens"]
    (tmp_path / "config.json").write_text(json.dumps(stored))
    message = rf"results: {field}.special_tokens: False → True\. "
    with pytest.raises(UserError, match=message):
        workdir_lib.check_binding(config, str(tmp_path), True, modes.spec_of(config))
    config[field].special_tokens = False
    assert workdir_lib.check_binding(config, str(tmp_path), True, modes.spec_of(config)) == []


def test_an_lm_merge_workdir_may_change_what_its_method_never_reads(tmp_path):
    # A TIES workdir written before dam.matmul_precision existed, rerun with other unused values.
    config = importlib.import_module("configs.lm_merge").get_config()
    stored = json.loads(config.to_json())
    del stored["dam"]["matmul_precision"], stored["dam"]["special_tokens"]
    (tmp_path / "config.json").write_text(json.dumps(stored))
    config.t, config.dam.seq_len = 0.25, 64
    assert workdir_lib.check_binding(config, str(tmp_path), True, modes.spec_of(config)) == [
        "t: 0.5 → 0.25",
        "dam.special_tokens: False → True",
        "dam.seq_len: 256 → 64",
        "dam.matmul_precision: 'default' → 'highest'",
    ]
    config.density = 0.2
    with pytest.raises(UserError, match=r"results: density: 0\.5 → 0\.2\. Use a new"):
        workdir_lib.check_binding(config, str(tmp_path), True, modes.spec_of(config))
    # Another method reads other fields: the method's change is refused with theirs.
    config.density, config.method = 0.5, "slerp"
    with pytest.raises(UserError, match=r"results: method: 'ties' → 'slerp', t: 0\.5 → 0\.25\. "):
        workdir_lib.check_binding(config, str(tmp_path), True, modes.spec_of(config))


def test_eval_reads_the_workdir_config_and_refuses_a_different_one(trained):
    config = tiny()
    config.model.num_heads = 2
    with pytest.raises(UserError) as e:
        modes.evaluate(config, trained)
    assert str(e.value) == drift_message(trained, "model.num_heads: 4 → 2")
    assert not os.path.exists(os.path.join(trained, "eval_latest.json"))
    # Without --config, and with a safe difference, eval uses config.json.
    config = tiny()
    config.num_steps = 10
    for given in (None, config):
        out = modes.evaluate(given, trained)["x_plus_y"]
        assert out["step"] == 20 and out["seeds"] == [0, 1]


def test_report_refuses_a_different_config_and_keeps_final_info(trained):
    config = tiny()
    config.tasks = "x_minus_y"
    before = snapshot(trained)
    with pytest.raises(UserError) as e:
        modes.report(config, trained)
    assert str(e.value) == drift_message(
        trained, "tasks: 'x_plus_y' → 'x_minus_y' (only a reordering is safe)"
    )
    assert snapshot(trained) == before
    assert modes.report(None, trained) == json.load(open(os.path.join(trained, "final_info.json")))


def test_eval_of_a_checkpoint_of_other_shapes_names_the_config_fields(trained, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(trained, workdir)
    stored = json.load(open(os.path.join(workdir, "config.json")))
    stored["model"]["dim"] = 16  # as if config.json were edited, or copied from another run
    json.dump(stored, open(os.path.join(workdir, "config.json"), "w"))
    with pytest.raises(UserError) as e:
        modes.evaluate(None, workdir)
    assert str(e.value) == (
        f"checkpoint {workdir}/x_plus_y/checkpoints/20 does not fit the config: "
        "params/blocks_0/attn/bias has shape (2, 96) there but (2, 48) from the config. Its "
        "shapes follow config.num_seeds, config.data.p, config.tasks and config.model (dim, "
        "freeze_experts, last_position_only, mlp_ratio, name, num_heads, num_layers): restore it "
        "with the config it was trained with"
    )


def test_read_modes_need_an_existing_workdir_with_a_config(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = {
        "missing": f"--workdir={tmp_path}/missing does not exist; train into it first",
        "file": f"--workdir={tmp_path}/file is a file, not a directory",
        "empty": f"{tmp_path}/empty has no config.json: it is not a fusion_jax workdir, or its "
        "training never started",
    }
    for name, message in cases.items():
        with pytest.raises(UserError) as e:
            modes.evaluate(None, str(tmp_path / name))
        assert str(e.value) == message


# --- damaged checkpoints: detected, skipped with a warning, never deleted -----------------------


def damage(checkpoints: str, how: str) -> str:
    """Damages a step of a finished tiny run; returns the damaged step directory."""
    if how == "truncated_file":
        latest = os.path.join(checkpoints, "20")
        files = [os.path.join(r, f) for r, _, fs in os.walk(latest) for f in fs]
        largest = max(files, key=os.path.getsize)
        with open(largest, "r+b") as f:
            f.truncate(os.path.getsize(largest) // 2)
        return latest
    if how == "emptied_latest":
        latest = os.path.join(checkpoints, "20")
        shutil.rmtree(latest)
        os.makedirs(latest)
        return latest
    newer = os.path.join(checkpoints, "30")  # an empty numbered directory past the run's end
    os.makedirs(newer)
    return newer


# A failed TensorStore read leaves Orbax callbacks for an asyncio loop that is closed by then;
# Python reports them as unraisable. The restore itself failed cleanly and was handled.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", ["truncated_file", "emptied_latest", "empty_newer_step"])
def test_damaged_latest_checkpoint_falls_back_and_the_rerun_ends_as_undamaged(
    trained, tmp_path, caplog, how
):
    workdir = str(tmp_path / "w")
    shutil.copytree(trained, workdir)
    checkpoints = os.path.join(workdir, "x_plus_y", "checkpoints")
    bad = damage(checkpoints, how)
    damaged_files = snapshot(bad)
    good_step = 20 if how == "empty_newer_step" else 10

    out = modes.evaluate(None, workdir)["x_plus_y"]
    warning = f"checkpoint {bad} cannot be restored, it is damaged or incomplete"
    assert any(warning in r.getMessage() for r in caplog.records)
    assert out["step"] == good_step
    reference = modes.evaluate(None, trained, step=good_step)["x_plus_y"]
    assert out["val_loss"] == reference["val_loss"]
    assert snapshot(bad) == damaged_files  # eval only reads

    caplog.clear()
    modes.train(tiny(), workdir)
    assert json.load(open(os.path.join(workdir, "final_info.json"))) == json.load(
        open(os.path.join(trained, "final_info.json"))
    )
    read = lambda w: logs.read(os.path.join(w, "x_plus_y", "metrics.jsonl"))  # noqa: E731
    assert read(workdir) == read(trained)
    setup = loop.setup_task(tiny(), "x_plus_y")
    states = []
    for w in (workdir, trained):
        mngr = checkpoint.manager(os.path.join(w, "x_plus_y", "checkpoints"), 2)
        states.append(checkpoint.restore(mngr, setup.abstract_runs(), 20))
        mngr.close()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 states[0].params, states[1].params)  # fmt: skip
    if good_step == 10:  # step 20 was redone: the damaged one had to make room, kept by a rename
        assert snapshot(bad + ".damaged") == damaged_files
        moved = f"moved the damaged checkpoint {bad} aside to {bad}.damaged"
        assert any(moved in r.getMessage() for r in caplog.records)
    else:  # nothing to save: the empty directory stays where it is
        assert snapshot(bad) == damaged_files


def test_a_requested_damaged_step_is_an_error_naming_it(trained, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(trained, workdir)
    bad = damage(os.path.join(workdir, "x_plus_y", "checkpoints"), "emptied_latest")
    with pytest.raises(UserError) as e:
        modes.evaluate(None, workdir, step=20)
    assert str(e.value) == (
        f"checkpoint {bad} is damaged (ValueError: Unable to retrieve default item)"
    )


def test_stage_progress_past_the_stages_end_is_refused(tmp_path):
    """Saved progress beyond the steps a stage now trains (e.g. a control stage whose step count
    comes from another backend's FLOP count) is refused, not returned as if trained to the end."""
    mngr = checkpoint.manager(str(tmp_path / "progress"), max_to_keep=1)
    state = {"step": np.int32(50)}
    with pytest.raises(UserError) as e:
        stages.train_stage(
            "[test] stage", None, state, 30, chunk=10, progress=lambda s: (mngr, (50, s)),
            step_of=lambda s: int(s["step"]), report=None,
        )  # fmt: skip
    assert str(e.value) == (
        f"{tmp_path}/progress holds step 50, past the 30 steps this stage trains: move it aside "
        "to train the stage again"
    )


# --- one writer per workdir ---------------------------------------------------------------------


def test_second_writer_fails_at_once_naming_the_holder_and_a_dead_holder_does_not_block(
    tmp_path,
):
    workdir = str(tmp_path / "w")
    script = (
        "import sys, time\nfrom fusion_jax import workdir\n"
        "with workdir.lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(600)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, workdir], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        message = (
            f"--workdir={workdir} is in use by another process (pid {holder.pid}); wait for it "
            "to finish or stop it"
        )
        tic = time.perf_counter()
        with pytest.raises(UserError) as e:
            modes.train(tiny(), workdir)
        assert time.perf_counter() - tic < 5  # at once, not after a wait
        assert str(e.value) == message
        # The modes that write tables into a folder take the same lock.
        for mode in (modes.compare, modes.results_folder):
            with pytest.raises(UserError) as e:
                mode(None, workdir, workdirs="runs/a")
            assert str(e.value) == message
        assert sorted(os.listdir(workdir)) == [".lock"]  # the second writers wrote nothing
    finally:
        holder.kill()  # kill -9: the holder cannot release anything itself
        holder.wait()
    with workdir_lib.lock(workdir):
        assert open(os.path.join(workdir, ".lock")).read() == f"{os.getpid()}\n"


def test_a_failed_table_call_leaves_no_output_folder_behind(tmp_path):
    out, missing = str(tmp_path / "out"), str(tmp_path / "missing")
    for mode in (modes.compare, modes.results_folder):
        with pytest.raises(UserError) as e:
            mode(None, out, workdirs=missing)
        assert str(e.value) == f"{missing} has no config.json: is it a fusion_jax workdir?"
        assert not os.path.exists(out)
    # A folder that existed before the call stays, lock file and all.
    os.makedirs(out)
    with pytest.raises(UserError):
        modes.compare(None, out, workdirs=missing)
    assert os.listdir(out) == [".lock"]


def test_compare_refuses_a_training_workdir_as_output_and_other_experiments_as_input(tmp_path):
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "config.json").write_text(tiny().to_json())
    before = snapshot(str(trained))
    with pytest.raises(UserError) as e:
        modes.compare(None, str(trained), workdirs=str(trained))
    assert str(e.value) == f"--workdir={trained} is a training workdir; give a comparison folder"
    assert snapshot(str(trained)) == before
    study = tmp_path / "study"
    study.mkdir()
    (study / "config.json").write_text(json.dumps({"experiment": "lm_study"}))
    with pytest.raises(UserError) as e:
        modes.compare(None, str(tmp_path / "out"), workdirs=str(study))
    assert str(e.value) == (
        f"{study} is a lm_study workdir: --mode=compare reads grokking training workdirs "
        "(--mode=results tabulates the others)"
    )


# --- plain user errors are one line through main.py ---------------------------------------------


def run_main(*args):
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


@pytest.mark.parametrize(
    "args,line",
    [
        (["--config=configs/baseline.py:tiny", "--config.tran.batch_size=8"],
         "error: unknown config field 'tran' Did you mean \"train\" instead of \"tran\"?"),
        (["--config=configs/nope.py"],
         "error: --config: [Errno 2] No such file or directory: 'configs/nope.py'"),
        (["--config=configs/baseline.py:tiny", "--config.tasks=x_div_y", "--config.data.p=10"],
         "error: config.data.p=10: must be a prime for task x_div_y (b^(p-2) is the inverse of "
         "b mod p only when p is prime)"),
        (["--config=configs/baseline.py:tiny", "--config.opt.learning_rate=-0.001"],
         "error: config.opt.learning_rate=-0.001: must be a number > 0"),
        (["--mode=eval"], "error: --workdir={workdir} does not exist; train into it first"),
        (["--config=configs/compare.py:tiny", "--mode=eval"], "error: --mode=eval does not run "
         "configs/compare.py configs: their modes are train, merge_compare; --mode=eval is for "
         "configs/baseline.py, configs/dyn_fusion.py"),
    ],
)  # fmt: skip
def test_user_errors_are_one_line_without_traceback(tmp_path, args, line):
    workdir = str(tmp_path / "w")
    done = run_main(f"--workdir={workdir}", *args)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == line.format(workdir=workdir)
    assert not os.path.exists(workdir)


def test_cli_refuses_a_file_as_workdir_and_a_drifted_resume(trained, tmp_path):
    (tmp_path / "file").write_text("x")
    done = run_main("--config=configs/baseline.py:tiny", f"--workdir={tmp_path}/file")
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: --workdir={tmp_path}/file is a file, not a directory"
    )
    before = snapshot(trained)
    flags = ["--config.train.num_devices=1", "--config.num_steps=30", "--config.seed=5"]
    done = run_main("--config=configs/baseline.py:tiny", f"--workdir={trained}", *flags)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "error: " + drift_message(trained, "seed: 0 → 5")
    assert snapshot(trained) == before


INTERRUPTED = """
import os, signal, sys, threading
import jax, jax.numpy as jnp, numpy as np
from fusion_jax import runtime
from fusion_jax.train import checkpoint

signal.signal(signal.SIGTERM, runtime.raise_interrupt)  # main.py's set-up
with runtime.exit_on_interrupt(checkpoint.wait_for_saves):  # main.py's wrapper of every mode
    if sys.argv[1] == "compile":  # SIGTERM while JAX waits for XLA's compile thread
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
        for n in range(100):  # distinct programs of about a second each, until the signal
            def deep(x):
                for i in range(300):
                    x = jnp.sin(x @ x.T + i + n)
                return x
            jax.jit(deep).lower(jnp.ones((8, 8))).compile()
        print("compiled before the signal")
    else:  # an interrupt while an async save of 64 MB is still being written
        checkpoint.checkpointer().save(sys.argv[2], {"w": np.arange(2**24, dtype=np.float32)})
        raise KeyboardInterrupt(signal.SIGTERM)
"""


@pytest.mark.parametrize("during", ["compile", "save"])
def test_an_interrupted_process_saves_and_dies_by_the_signal(tmp_path, during):
    """Without `exit_on_interrupt`: a KeyboardInterrupt traceback, and sometimes a segmentation
    fault at interpreter shutdown while the compile thread finishes; without `wait_for_saves` the
    save in flight is lost."""
    path = str(tmp_path / "ckpt")
    done = subprocess.run([sys.executable, "-c", INTERRUPTED, during, path], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == -15, done.stderr[-2000:]  # killed by SIGTERM, as a shell shows
    assert "compiled before the signal" not in done.stdout
    assert "Traceback" not in done.stderr and "Segmentation" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.endswith("stopped by SIGTERM: a rerun continues from what was saved")
    if during == "save":
        restored = ocp.StandardCheckpointer().restore(path)
        np.testing.assert_array_equal(restored["w"], np.arange(2**24, dtype=np.float32))


# SIGTERM sent from inside a garbage-collector callback, so that the handler runs there (as when
# the signal lands during JAX's own callback): Python discards an exception raised in one.
SIGNAL_IN_GC_CALLBACK = """
import gc, os, signal, time
from fusion_jax import runtime

signal.signal(signal.SIGTERM, runtime.raise_interrupt)
sent = []

def callback(phase, info):
    if phase == "start" and not sent:
        sent.append(signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(1000))  # the handler runs here, inside the callback

with runtime.exit_on_interrupt():
    gc.callbacks.append(callback)
    gc.collect()
    for _ in range(500):
        time.sleep(0.01)
    print("not interrupted")
"""


def test_a_signal_handled_inside_a_garbage_collector_callback_still_stops_the_run():
    done = subprocess.run([sys.executable, "-c", SIGNAL_IN_GC_CALLBACK], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == -15, done.stdout + done.stderr[-2000:]
    assert "not interrupted" not in done.stdout
    assert "Exception ignored" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.endswith("stopped by SIGTERM: a rerun continues from what was saved")


def test_main_py_dies_by_sigterm_after_saying_so(tmp_path):
    proc = subprocess.Popen([sys.executable, "main.py", "--config=configs/baseline.py:tiny",
                             f"--workdir={tmp_path / 'w'}"], cwd=ROOT, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    lines = []
    for line in proc.stderr:  # start-up done: the signal lands in a compile or a chunk
        lines.append(line)
        if " on cpu: " in line:
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stderr.readlines()
    assert proc.wait(timeout=120) == -15, "".join(lines)[-2000:]
    assert lines[-1].rstrip().endswith("stopped by SIGTERM: a rerun continues from what was saved")
