"""What a language-model merge promises when inputs or the process misbehave: no input is touched,
nothing non-finite is written, every file lands whole (issue 26)."""

import errno
import json
import os
import shutil
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from configs import lm_merge as lm_merge_config
from fusion_jax import errors, files, gguf_checkpoint
from fusion_jax import hf_checkpoint as hc
from fusion_jax.errors import UserError, disk_error
from fusion_jax.experiments import lm_merge, stages
from fusion_jax.train import checkpoint, logs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA = os.path.join(os.path.dirname(__file__), "fixtures", "lm", "llama")
NAME = "model.layers.0.mlp.up_proj.weight"  # the tensor the tests spoil


def _config(**fields):
    config = lm_merge_config.get_config()
    config.method = "weight_average"
    for key, value in fields.items():
        config[key] = value
    return config


def _copy(tmp_path, name, fn=None):
    """A copy of the fixture, with `fn` applied to tensor NAME (torch layout) if given."""
    out = str(tmp_path / name)
    shutil.copytree(LLAMA, out)
    if fn:
        reader = hc.open_tensors(LLAMA)
        tensors = {n: reader.get(n) for n in reader.files}
        tensors[NAME] = fn(tensors[NAME].copy())
        save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return out


def _snapshot(directory):
    out = {}
    for root, _, names in os.walk(directory):
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                out[os.path.relpath(os.path.join(root, n), directory)] = f.read()
    return out


def test_an_input_at_the_output_path_is_refused_and_kept(tmp_path):
    work = tmp_path / "w"
    inside = _copy(work, "merged")  # an input model where the merge would go
    other = _copy(tmp_path, "other")
    before = _snapshot(inside)
    with pytest.raises(UserError) as e:
        lm_merge.run(_config(models=f"{inside},{other}"), str(work))
    assert str(e.value) == (
        f"the output {work} overlaps the input {inside} (the same path, or one inside the "
        "other); choose a --workdir apart from every input"
    )
    assert _snapshot(inside) == before and sorted(os.listdir(work)) == ["merged"]


@pytest.mark.parametrize("where", ["merged.partial/x", "", "sub"])
def test_a_workdir_that_overlaps_an_input_is_refused_before_binding(tmp_path, where):
    model = _copy(tmp_path, "model")
    other = _copy(tmp_path, "other")
    # An input inside merged.partial/ (deleted at start), the workdir as the input, or inside it.
    work = str(tmp_path / "w")
    if where.startswith("merged"):
        model = _copy(tmp_path / "w" / "merged.partial", "x")
    else:
        work = os.path.join(model, where) if where else model
    before = _snapshot(tmp_path)
    with pytest.raises(UserError, match=r"overlaps the input .*; choose a --workdir apart"):
        lm_merge.run(_config(models=f"{model},{other}"), work)
    assert _snapshot(tmp_path) == before


def test_an_input_inside_the_workdir_but_apart_from_the_output_is_fine(tmp_path):
    model = _copy(tmp_path / "w" / "experts", "a")
    lm_merge.run(_config(models=f"{model},{LLAMA}"), str(tmp_path / "w"))
    assert os.path.isfile(tmp_path / "w" / "merged" / "model.safetensors")


@pytest.mark.parametrize(
    "method, hparams",
    [
        ("weight_average", {}),
        ("task_arithmetic", {"lam": 0.5}),
        ("ties", {"density": 0.5, "lam": 1.0}),
        ("dare", {"drop_rate": 0.5, "lam": 1.0, "combine": "ties", "density": 0.5}),
        ("slerp", {"t": 0.5}),
    ],
)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_input_is_named_and_nothing_is_written(tmp_path, method, hparams, bad):
    def spoil(x):
        x[0, 0] = bad
        return x

    spoilt = _copy(tmp_path, "spoilt", spoil)
    base = LLAMA if method in ("task_arithmetic", "ties", "dare") else None
    out = str(tmp_path / "out")
    with pytest.raises(UserError) as e:
        lm_merge.streaming_merge(method, hparams, [LLAMA, spoilt], base, out, progress=False)
    n = hc.open_tensors(LLAMA).get(NAME).size
    assert str(e.value) == (
        f"{spoilt}: tensor {NAME}: 1 of its {n} float32 values are NaN or Inf (a non-finite "
        "input, a merge that is not finite, or an overflow of the output dtype); nothing is "
        "written from it"
    )
    # No shard holds the spoilt tensor's merge (the one-shard fixture: no shard at all).
    assert not os.path.exists(os.path.join(out, "model.safetensors"))


def test_a_non_finite_base_is_named(tmp_path):
    spoilt = _copy(tmp_path, "spoilt", lambda x: x * np.float32(np.inf))
    with pytest.raises(UserError, match=rf"^{spoilt}: tensor {NAME}: \d+ of its"):
        lm_merge.streaming_merge(
            "ties", {"density": 0.5, "lam": 1.0}, [LLAMA, LLAMA], spoilt, str(tmp_path / "o"),
            progress=False,
        )  # fmt: skip


@pytest.mark.parametrize("weights", ["0,0", "1,-1", "0.5,-0.5"])
def test_weights_that_sum_to_zero_are_refused_before_binding(tmp_path, weights):
    with pytest.raises(UserError) as e:
        lm_merge.run(_config(models=f"{LLAMA},{LLAMA}", weights=weights), str(tmp_path / "w"))
    assert str(e.value) == (
        f"config.weights={weights!r}: must be numbers whose sum is not 0 (they are divided by "
        "their sum)"
    )
    assert not (tmp_path / "w").exists()


def test_an_overflow_of_float16_is_refused(tmp_path):
    big = _copy(tmp_path, "big", lambda x: x + np.float32(1e6))  # float16 tops out at 65504
    with pytest.raises(UserError) as e:
        lm_merge.streaming_merge(
            "weight_average", {}, [big, big], None, str(tmp_path / "o"), dtype="float16",
            progress=False,
        )  # fmt: skip
    n = hc.open_tensors(LLAMA).get(NAME).size
    assert str(e.value) == (
        f"tensor {NAME} to be written to {tmp_path / 'o'}: {n} of its {n} float16 values are "
        "NaN or Inf (a non-finite input, a merge that is not finite, or an overflow of the "
        "output dtype); nothing is written from it"
    )


def test_written_shards_have_the_usual_file_mode(tmp_path):
    old = os.umask(0o022)
    try:
        lm_merge.streaming_merge(
            "weight_average", {}, [LLAMA, LLAMA], None, str(tmp_path / "o"),
            max_shard_size="100KB", progress=False,
        )  # fmt: skip
    finally:
        os.umask(old)
    shards = [n for n in os.listdir(tmp_path / "o") if n.endswith(".safetensors")]
    assert len(shards) > 1
    for n in shards:
        assert stat.S_IMODE(os.stat(tmp_path / "o" / n).st_mode) == 0o644, n


def test_a_kill_while_the_new_merge_is_renamed_in_loses_nothing(tmp_path, monkeypatch):
    """The old merged/ is moved aside before the new one comes in: a kill in between leaves it
    as merged.old/, and the rerun puts it back, merges again and ends with one merged/."""
    work = str(tmp_path / "w")
    config = _config(models=f"{LLAMA},{LLAMA}", method="weight_average")
    lm_merge.run(config, work)
    first = _snapshot(os.path.join(work, "merged"))
    real_replace = os.replace

    def killed(src, dst):
        if src.endswith("merged.partial"):
            raise KeyboardInterrupt  # the old merged/ is aside, the new not yet in place
        real_replace(src, dst)

    monkeypatch.setattr(lm_merge.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        lm_merge.run(config, work)
    monkeypatch.undo()
    assert sorted(os.listdir(work)) == [".lock", "config.json", "merged.old", "merged.partial"]
    assert _snapshot(os.path.join(work, "merged.old")) == first
    info = lm_merge.run(config, work)
    assert sorted(os.listdir(work)) == [".lock", "config.json", "merge_info.json", "merged"]
    assert _snapshot(os.path.join(work, "merged")) == first
    with open(os.path.join(work, "merge_info.json")) as f:
        assert json.load(f) == info


def test_a_kill_while_a_log_is_cut_back_keeps_its_history(tmp_path, monkeypatch):
    path = str(tmp_path / "metrics.jsonl")
    logs.append(path, [{"step": s} for s in (1, 2, 3)])
    with open(path) as f:
        before = f.read()

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        logs.truncate(path, 2)
    with open(path) as f:
        assert f.read() == before  # untouched; the rerun cuts it back
    monkeypatch.undo()
    assert logs.truncate(path, 2) == [{"step": 1}, {"step": 2}]
    assert logs.read(path) == [{"step": 1}, {"step": 2}]


def test_results_json_is_strict(tmp_path):
    path = str(tmp_path / "r.json")
    with pytest.raises(UserError) as e:
        files.write_json(path, {"val_loss": float("nan")})
    assert str(e.value) == (
        f"{path} was not written: its values include NaN or Inf (Out of range float values are "
        "not JSON compliant: nan)"
    )
    assert not os.path.exists(path)
    files.write_json(path, {"val_loss": 1.5})
    with open(path) as f:
        assert json.load(f) == {"val_loss": 1.5}


def test_a_merge_of_finite_inputs_is_unchanged_by_the_checks(tmp_path):
    out = str(tmp_path / "o")
    lm_merge.streaming_merge("weight_average", {}, [LLAMA, LLAMA], None, out, progress=False)
    _, params = hc.load(out)
    _, want = hc.load(LLAMA)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("out_type, scale", [("float16", 1e6), ("q8_0", 1e8)])
def test_a_gguf_export_that_overflows_is_refused_and_leaves_no_file(tmp_path, out_type, scale):
    big = _copy(tmp_path, "big", lambda x: x + np.float32(scale))
    path = str(tmp_path / "model.gguf")
    reader = hc.open_tensors(big)
    with pytest.raises(UserError) as e:
        gguf_checkpoint.write_gguf(path, hc.read_config(big), reader, out_type, big)
    qtype = "F16" if out_type == "float16" else "Q8_0"
    assert str(e.value).startswith(f"tensor {NAME} to be written to {path} as {qtype}: ")
    assert not os.path.exists(path)
    # Within range, the same export is written.
    gguf_checkpoint.write_gguf(path, hc.read_config(LLAMA), hc.open_tensors(LLAMA), out_type, LLAMA)
    assert os.path.getsize(path) > 0


def test_a_stage_whose_loss_turns_nan_stops_with_its_last_save_kept(tmp_path):
    """The one chunk loop of every study stage: a non-finite chunk is not saved or logged."""
    logged, mngrs = [], []

    def progress(state):
        mngrs.append(checkpoint.manager(str(tmp_path / "ckpt"), max_to_keep=3))
        return mngrs[-1], None

    def run_chunk(state, n):  # the loss turns NaN in the third chunk
        step = state["step"] + n
        return {"step": step}, jnp.where(step > 4, jnp.nan, 1.0) * jnp.ones(n)

    with pytest.raises(UserError) as e:
        stages.train_stage(
            "[t] experts", run_chunk, {"step": jnp.zeros((), jnp.int32)}, 10, chunk=2,
            progress=progress, every_secs=1e-9, step_of=lambda s: int(s["step"]),
            report=lambda metrics, done, rate, compile_secs: logged.append(done),
        )  # fmt: skip
    assert str(e.value) == (
        "[t] experts: the training loss is NaN or Inf by step 6; nothing past step 4 is saved: "
        "lower the learning rate or check the inputs, then rerun"
    )
    assert logged == [2, 4]
    assert checkpoint.manager(str(tmp_path / "ckpt"), max_to_keep=3).all_steps() == [2, 4]


TIED = os.path.join(os.path.dirname(LLAMA), "llama_tied_sharded")


def _damaged(tmp_path, how):
    """A copy of a fixture with one file damaged; returns (copy, the damaged file)."""
    source = TIED if how.startswith("index") else LLAMA
    out = str(tmp_path / "damaged")
    shutil.copytree(source, out)
    if how == "truncated":
        path = os.path.join(out, "model.safetensors")
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
    elif how == "garbage":
        path = os.path.join(out, "model.safetensors")
        with open(path, "wb") as f:
            f.write(b"\x00\x01 not a checkpoint " * 8)
    elif how == "config":
        path = os.path.join(out, "config.json")
        with open(path, "w") as f:
            f.write('{"model_type": "llama", ')
    elif how == "index":
        path = os.path.join(out, hc.INDEX_FILE)
        with open(path, "w") as f:
            f.write("[1, 2")
    elif how == "index_key":
        path = os.path.join(out, hc.INDEX_FILE)
        with open(path, "w") as f:
            json.dump({"metadata": {}}, f)
    return out, path


@pytest.mark.parametrize(
    "how, message",
    [
        ("truncated", "{path} is not a readable safetensors file (Error while deserializing "
         "header: incomplete metadata, file not fully covered); replace it"),
        ("garbage", "{path} is not a readable safetensors file (Error while deserializing "
         "header: header too large); replace it"),
        ("config", "{path} is not valid JSON (Expecting property name enclosed in double quotes: "
         "line 1 column 25 (char 24)): the file is damaged; replace it"),
        ("index", "{path} is not valid JSON (Expecting ',' delimiter: line 1 column 6 (char 5)): "
         "the file is damaged; replace it"),
        ("index_key", "{path} has no 'weight_map': the file is damaged or not a checkpoint's; "
         "replace it"),
    ],
)  # fmt: skip
def test_a_damaged_input_is_one_line_naming_the_file_before_binding(tmp_path, how, message):
    damaged, path = _damaged(tmp_path, how)
    other = TIED if how.startswith("index") else LLAMA
    with pytest.raises(UserError) as e:
        lm_merge.run(_config(models=f"{other},{damaged}"), str(tmp_path / "w"))
    assert str(e.value) == message.format(path=path)
    assert not (tmp_path / "w").exists()


def _retokenized(tmp_path, name, edit):
    """A copy of the tied fixture whose tokenizer.json is rewritten by `edit(tree)` (indented
    differently, so never byte-identical)."""
    out = str(tmp_path / name)
    shutil.copytree(TIED, out)
    path = os.path.join(out, "tokenizer.json")
    with open(path) as f:
        tree = json.load(f)
    edit(tree)
    with open(path, "w") as f:
        json.dump(tree, f, indent=4)
    return out


def test_models_whose_tokenizers_differ_are_refused_naming_the_first_difference(tmp_path):
    def rename(tree):
        tree["added_tokens"][1]["content"] = "<|end|>"

    other = _retokenized(tmp_path, "other", rename)
    with pytest.raises(UserError) as e:
        lm_merge.run(_config(models=f"{TIED},{other}"), str(tmp_path / "w"))
    assert str(e.value) == (
        f"models differ in their tokenizers, first at 'added_tokens[1].content': {TIED} and "
        f"{other} (their token ids would not mean the same)"
    )
    assert not (tmp_path / "w").exists()


def test_tokenizers_equal_in_content_but_not_in_bytes_are_accepted(tmp_path):
    same = _retokenized(tmp_path, "same", lambda tree: None)
    lm_merge.run(_config(models=f"{TIED},{same}"), str(tmp_path / "w"))
    assert os.path.isfile(tmp_path / "w" / "merged" / "tokenizer.json")


# --- a full disk and an unwritable folder: one line naming the file ------------------------------

# main.py with every fsync (the last step of each JSON and log write) failing as the disk would.
FAILING_FSYNC = """
import errno, os, sys
code = errno.{name}
def fsync(fd):
    raise OSError(code, os.strerror(code))
os.fsync = fsync
sys.argv = ["main.py"] + sys.argv[1:]
import main
from absl import app
app.run(main.main, flags_parser=main._parse_flags)
"""


@pytest.mark.parametrize(
    "name, advice",
    [
        ("ENOSPC", "No space left on device: free space on that disk, or use a --workdir on "
                   "another, then rerun (what was saved before is kept)"),
        ("EROFS", "Read-only file system: use a --workdir you can write to, then rerun"),
    ],
)  # fmt: skip
def test_a_full_disk_or_a_read_only_folder_is_one_line_naming_the_file(tmp_path, name, advice):
    workdir = tmp_path / "w"
    done = subprocess.run(
        [sys.executable, "-c", FAILING_FSYNC.replace("{name}", name),
         "--config=configs/baseline.py:tiny", f"--workdir={workdir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert (
        done.stderr.strip().splitlines()[-1]
        == f"error: cannot write {workdir}/config.json: {advice}"
    )
    assert not (workdir / "config.json").exists()


def test_a_shard_that_fills_the_disk_is_named(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write() raises it: no file

    monkeypatch.setattr(hc, "save_file", full)
    workdir = tmp_path / "w"
    with pytest.raises(OSError) as e:
        lm_merge.run(_config(models=f"{_copy(tmp_path, 'a')},{_copy(tmp_path, 'b')}"), str(workdir))
    assert str(disk_error(e.value)) == (
        f"cannot write {workdir}/merged.partial/model.safetensors: No space left on device: free "
        "space on that disk, or use a --workdir on another, then rerun (what was saved before is "
        "kept)"
    )
    assert not (workdir / "merged").exists()


def test_a_checkpoint_save_that_fills_the_disk_is_named():
    # The error Orbax 0.12.8 raised when a 512 KB tmpfs filled during a grokking save (copied from
    # that run: tensorstore reports the OS error inside a ValueError).
    raised = ValueError(
        'RESOURCE_EXHAUSTED: Error writing "opt_state.0.mu.blocks_0.attn.bias/0.0" in OCDBT '
        'database at local file "/mnt/tiny/w/x_plus_y/checkpoints/10.orbax-checkpoint-tmp/'
        'default.orbax-checkpoint-tmp/ocdbt.process_0/": Failed writing: "/mnt/tiny/w/x_plus_y/'
        "checkpoints/10.orbax-checkpoint-tmp/default.orbax-checkpoint-tmp/ocdbt.process_0/d/"
        'ffd0b7e89d8238e4bc8c06b31dc1d0d3": Failed to write 78010 bytes to file 12: No space left '
        "on device [os_error_code='28']"
    )
    assert str(disk_error(raised)) == (
        "cannot write /mnt/tiny/w/x_plus_y/checkpoints/10: No space left on device: free space "
        "on that disk, or use a --workdir on another, then rerun (what was saved before is kept)"
    )
    assert disk_error(ValueError("RESOURCE_EXHAUSTED: out of memory")) is None


def test_check_finite_counts_nan_and_inf_and_passes_finite_values_whose_sum_overflows():
    big = np.full(4, 3e38, np.float32)  # finite, but their float32 sum is Inf
    errors.check_finite(big, "big")
    for dtype in (np.float32, ml_dtypes.bfloat16, np.float16):
        x = np.array([1.0, np.nan, np.inf, -np.inf, 2.0]).astype(dtype)
        with pytest.raises(UserError) as e:
            errors.check_finite(x, "x")
        assert str(e.value).startswith(f"x: 3 of its 5 {np.dtype(dtype)} values are NaN or Inf")
