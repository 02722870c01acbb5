"""`--mode=results`: the results/ tables from the logs, exactly, and committed tables reproduced.

The fixture (tests/fixtures/results/, made by its make_fixture.py) holds synthetic result workdirs
and expected/, the folder the command wrote for them (PNGs left out). Once a real results/ folder
is committed, the regeneration test checks it too.
"""

import json
import os
import shutil

import pytest

from fusion_jax import modes
from fusion_jax import workdir as workdir_lib
from fusion_jax.errors import UserError
from fusion_jax.evaluate import results
from fusion_jax.evaluate import results_report as rr
from fusion_jax.train import logs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join("tests", "fixtures", "results")
FIXTURE_WORKDIRS = ",".join(
    os.path.join(FIXTURE, "workdirs", w) for w in ("baseline", "dyn_fusion", "compare")
)

CONFIG = {"name": "Baseline", "reference_run": "run_0", "tasks": "x_plus_y", "num_steps": 7500,
          "num_seeds": 2, "data": {"p": 97},
          "eval": {"mode": "exact", "acc_threshold": 0.99}}  # fmt: skip
SEED_RUNS = {"run_0": {"title": "Baseline", "means": {
    "x_plus_y": {"final_train_loss_mean": 0.1, "final_val_loss_mean": 0.5,
                 "final_train_acc_mean": 1.0, "final_val_acc_mean": 0.99,
                 "step_val_acc_99_mean": 3000.0},
    "permutation": {"final_train_loss_mean": 0.1, "final_val_loss_mean": 0.5,
                    "final_train_acc_mean": 1.0, "final_val_acc_mean": 0.5,
                    "step_val_acc_99_mean": 7500.0}}}}  # fmt: skip
RERUN = {"x_plus_y": {
    "means": {"final_train_loss_mean": 0.25, "final_val_loss_mean": 0.5,
              "final_train_acc_mean": 1.0, "final_val_acc_mean": 0.99,
              "step_val_acc_99_mean": 3000.0},
    "final_info_dict": {"final_train_loss": [0.2, 0.3], "final_val_loss": [0.4, 0.6],
                        "final_train_acc": [1.0, 1.0], "final_val_acc": [0.98, 1.0],
                        "step_val_acc_99": [2000, 4000]}}}  # fmt: skip


def rec(step, seed, train_loss, train_acc, val_loss, val_acc):
    return {"step": step, "seed": seed, "train_loss": train_loss, "train_acc": train_acc,
            "val_loss": val_loss, "val_acc": val_acc}  # fmt: skip


# Seed 0 first exceeds 0.99 at step 7500, seed 1 at 2500: step_val_acc_99 = 5000 ± 2500.
RECORDS = [rec(2500, 0, 1.0, 0.9, 2.0, 0.5), rec(2500, 1, 0.5, 1.0, 0.2, 0.995),
           rec(7500, 0, 0.25, 1.0, 1.0, 1.0), rec(7500, 1, 0.75, 1.0, 1.0, 1.0)]  # fmt: skip

EXPECTED_TABLE = """\
# run_0: Baseline

Our config: 2 seeds, 7500 steps, p = 97, validation: exact. Source: reference/seed_runs.json `run_0` (Baseline), the mean over its 3 seeds (7500 steps, p = 97; no per-seed values published).
Rerun: reference/reference_baseline_rerun.json, its mean and [min, max] over its seeds.

Ours: mean ± standard error over our seeds (std with ddof = 1, divided by sqrt(n)), from the logs at the last logged step; step_val_acc_99 counts a seed that never exceeds the threshold as the last step (the source's convention).
Spread: [min, max] of the source's mean and each per-seed value of the rerun. A metric is inside when our mean ± 2 standard errors overlaps the spread. A task's verdict is inside when final_val_acc and step_val_acc_99 are both inside; the other metrics are marked but not part of it. Verdicts are given only to tasks run at the source's full length (7500 steps, p = 97) with every seed logged to the last step; other tasks show their numbers without marks.

| task | status | seeds | last step | verdict |
|---|---|---|---|---|
| x_plus_y | full length (2 of the source's 3 seeds) | 2 | 7500 | inside |
| permutation | not run (not among the config's tasks) | 0 | – | – |

## x_plus_y

| metric | ours | source | rerun mean [min, max] | spread | in spread |
|---|---|---|---|---|---|
| final_train_loss | 0.5 ± 0.25 | 0.1 | 0.25 [0.2, 0.3] | [0.1, 0.3] | inside |
| final_val_loss | 1 ± 0 | 0.5 | 0.5 [0.4, 0.6] | [0.4, 0.6] | outside |
| final_train_acc | 1 ± 0 | 1 | 1 [1, 1] | [1, 1] | inside |
| final_val_acc | 1 ± 0 | 0.99 | 0.99 [0.98, 1] | [0.98, 1] | inside |
| step_val_acc_99 | 5000 ± 2500 | 3000 | 3000 [2000, 4000] | [2000, 4000] | inside |

## permutation

Not run (not among the config's tasks).
"""  # noqa: E501


def test_table_hand_computed():
    table = rr.run_table(CONFIG, {"x_plus_y": RECORDS}, SEED_RUNS, RERUN)
    assert rr.to_markdown(table, "run_0") == EXPECTED_TABLE
    # Without the rerun the spread is the seed's mean alone: 3000 is within 5000 ± 2 x 2500,
    # but final_val_acc 1 ± 0 misses the point 0.99.
    table = rr.run_table(CONFIG, {"x_plus_y": RECORDS}, SEED_RUNS, {})
    assert table["tasks"]["x_plus_y"]["verdict"] == "outside (final_val_acc)"
    # One seed: no standard error to widen by, so 7500 lies outside [2000, 4000].
    one_seed = [r for r in RECORDS if r["seed"] == 0]
    table = rr.run_table({**CONFIG, "num_seeds": 1}, {"x_plus_y": one_seed}, SEED_RUNS, RERUN)
    assert table["tasks"]["x_plus_y"]["verdict"] == "outside (step_val_acc_99)"


def test_unfinished_and_shortened_tasks_get_no_verdict():
    unfinished = [r for r in RECORDS if r["step"] == 2500]
    table = rr.run_table(CONFIG, {"x_plus_y": unfinished}, SEED_RUNS, RERUN)
    entry = table["tasks"]["x_plus_y"]
    assert (entry["status"], entry["note"], entry["verdict"]) == (
        "unfinished", "last logged step 2500 of 7500", None)  # fmt: skip
    step99 = entry["metrics"]["step_val_acc_99"]
    assert step99["ours"]["note"] == "reached 0.99 in 1 of 2 seeds by step 2500"
    assert all(m["inside"] is None for m in entry["metrics"].values())
    # A seed whose log lags is cut to the step every seed reached.
    lagging = RECORDS[:3]
    assert rr.run_table(CONFIG, {"x_plus_y": lagging}, SEED_RUNS, RERUN)["tasks"]["x_plus_y"][
        "last_step"] == 2500  # fmt: skip
    short = {**CONFIG, "num_steps": 2500, "data": {"p": 11}}
    entry = rr.run_table(short, {"x_plus_y": unfinished}, SEED_RUNS, RERUN)["tasks"]["x_plus_y"]
    assert (entry["status"], entry["verdict"]) == ("shortened", None)
    assert (
        entry["note"] == "2500 steps (source: 7500); p = 11 (source: 97); 2 of the source's 3 seeds"
    )


def _files(folder: str) -> set[str]:
    return {
        os.path.relpath(os.path.join(d, f), folder)
        for d, _, names in os.walk(folder)
        for f in names
        if not f.endswith(".png") and f != workdir_lib.LOCK_FILE
    }


def _assert_same(expected_dir: str, actual_dir: str, skip=()) -> None:
    expected = _files(expected_dir) - set(skip)
    assert expected == _files(actual_dir) - set(skip)
    for rel in sorted(expected):
        with open(os.path.join(expected_dir, rel), "rb") as f, \
                open(os.path.join(actual_dir, rel), "rb") as g:  # fmt: skip
            assert f.read() == g.read(), f"{rel} differs from the committed {expected_dir}/{rel}"


def test_mode_reproduces_fixture(tmp_path, monkeypatch):
    """The command over the fixture workdirs writes expected/ byte for byte, plots besides."""
    monkeypatch.chdir(ROOT)  # index.md and run.json record the workdirs as given.
    before = {w: sorted(_files(w)) for w in FIXTURE_WORKDIRS.split(",")}
    out = str(tmp_path / "results")
    tables = modes.MODES["results"](None, out, workdirs=FIXTURE_WORKDIRS)
    assert set(tables) == {"run_0", "run_1"}
    _assert_same(os.path.join(FIXTURE, "expected"), out)
    plots = sorted(f for f in os.listdir(os.path.join(out, "run_0")) if f.endswith(".png"))
    assert plots == sorted(f"{s}_{m}_{t}.png" for s in ("train", "val") for m in ("loss", "acc")
                           for t in ("x_div_y", "x_plus_y"))  # fmt: skip
    assert {w: sorted(_files(w)) for w in FIXTURE_WORKDIRS.split(",")} == before  # only read


COMMITTED = [os.path.join(FIXTURE, "expected"), "results"]


@pytest.mark.parametrize("committed", COMMITTED)
def test_committed_tables_regenerate(committed, tmp_path, monkeypatch):
    """Every run folder of a committed results folder regenerates from its own logs (and
    comparison.json)."""
    monkeypatch.chdir(ROOT)
    if not os.path.isdir(committed):
        pytest.skip(f"{committed}/ is not committed yet")
    runs = sorted(
        n for n in os.listdir(committed) if os.path.exists(os.path.join(committed, n, "run.json"))
    )
    assert runs
    copy = str(tmp_path / "committed")
    shutil.copytree(committed, copy)  # Regenerating in place must not need a clean folder.
    for n in runs:  # Comparison tables are rendered from their comparison.json, not copied.
        if os.path.exists(os.path.join(copy, n, "comparison.json")):
            with open(os.path.join(copy, n, "comparison.md"), "w") as f:
                f.write("stale\n")
    out = str(tmp_path / "regenerated")
    spec = ",".join(f"{n}={os.path.join(committed, n)}" for n in runs)
    rr.write_results(spec, out, markdown_of=modes.markdown_of, plots=False)
    # index.md counts the plots, which this check does not draw; README.md is written by hand.
    skip = {"index.md", "README.md"}
    _assert_same(committed, out, skip=skip)
    rr.write_results(
        ",".join(f"{n}={os.path.join(copy, n)}" for n in runs),
        copy,
        markdown_of=modes.markdown_of,
        plots=False,
    )
    _assert_same(committed, copy, skip=skip)


def test_refusals(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    baseline = os.path.join(FIXTURE, "workdirs", "baseline")
    with pytest.raises(UserError, match="share a results folder"):
        rr.write_results(
            f"{baseline},{baseline}",
            str(tmp_path / "out"),
            markdown_of=modes.markdown_of,
            plots=False,
        )
    with pytest.raises(UserError, match="training workdir"):
        rr.write_results(baseline, baseline, markdown_of=modes.markdown_of, plots=False)
    with pytest.raises(UserError, match="no config.json"):
        rr.write_results(
            str(tmp_path), str(tmp_path / "out"), markdown_of=modes.markdown_of, plots=False
        )
    with pytest.raises(UserError, match="at least one"):
        rr.write_results("", str(tmp_path / "out"), markdown_of=modes.markdown_of, plots=False)


def test_a_log_is_read_to_its_last_complete_line_and_a_resume_cuts_the_rest(tmp_path):
    # A live run writing its next line, or a kill mid-write, leaves a line cut short.
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(RECORDS[1])[:20])
    assert logs.read(str(path)) == RECORDS[:1]
    # A resume past the first record drops the cut line, so the next append is a line of its own.
    assert logs.truncate(str(path), RECORDS[0]["step"]) == RECORDS[:1]
    logs.append(str(path), RECORDS[1:2])
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in RECORDS[:2])


def test_final_info_of_an_unfinished_run_says_the_step_it_describes():
    # Seed 1 has not logged step 7500 yet: every seed is read at 2500, the last step all logged.
    info = results.task_final_info(RECORDS[:3], 7500, 0.99)
    assert info["last_step"] == 2500
    assert info["final_info_dict"]["final_val_acc"] == [0.5, 0.995]
    assert info["final_info_dict"]["step_val_acc_99"] == [7500, 2500]  # seed 0: not reached
    assert results.task_final_info(RECORDS, 7500, 0.99)["last_step"] == 7500


def test_regenerating_a_run_folder_removes_what_its_workdir_no_longer_has(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = str(tmp_path / "results")
    rr.write_results(FIXTURE_WORKDIRS, out, markdown_of=modes.markdown_of, plots=False)
    # As left by an earlier generation from a workdir that had more: gates, compute, a task.
    stale = ["gate_analysis.json", "compute.json", "gate_heatmap_x_plus_y.png"]
    for name in stale:
        open(os.path.join(out, "run_0", name), "w").write("{}")
    os.makedirs(os.path.join(out, "run_0", "x_minus_y"))
    open(os.path.join(out, "run_0", "x_minus_y", "metrics.jsonl"), "w").write("")
    open(os.path.join(out, "compare", "frontier.png"), "w").write("")
    rr.write_results(FIXTURE_WORKDIRS, out, markdown_of=modes.markdown_of, plots=False)
    _assert_same(os.path.join(FIXTURE, "expected"), out, skip={"index.md"})
