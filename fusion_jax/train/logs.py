"""Per-step metric logs as JSON lines: one record per (logged step, seed)."""

import json
import os

import numpy as np

from fusion_jax import errors, files

METRICS = ("train_loss", "train_acc", "val_loss", "val_acc")


def append(path: str, records: list[dict]) -> None:
    with errors.naming(path), open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _lines(path: str) -> tuple[list[str], bool]:
    """The file's complete lines, and whether a last line was cut short (a kill mid-write, or a
    live run writing it now): such a line is not a record yet."""
    with open(path) as f:
        lines = f.readlines()
    torn = bool(lines) and not lines[-1].endswith("\n")
    return (lines[:-1] if torn else lines), torn


def read(path: str) -> list[dict]:
    """The records up to the last complete line."""
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in _lines(path)[0] if line.strip()]


def truncate(path: str, max_step: int) -> list[dict]:
    """Drops records past `max_step` (written after the checkpoint a resume starts from) and a
    last line cut short, so that the next append starts on a line of its own."""
    records = read(path)
    kept = [r for r in records if r["step"] <= max_step]
    if len(kept) < len(records) or not os.path.exists(path) or _lines(path)[1]:
        # Renamed into place: a kill while rewriting must not lose the history it keeps.
        files.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def to_arrays(records: list[dict]) -> dict[str, np.ndarray]:
    """Records -> {"step": [T], "seed": [R], metric: [R, T]} (steps and seeds sorted)."""
    steps = sorted({r["step"] for r in records})
    seeds = sorted({r["seed"] for r in records})
    out = {"step": np.array(steps), "seed": np.array(seeds)}
    t_index = {s: i for i, s in enumerate(steps)}
    r_index = {s: i for i, s in enumerate(seeds)}
    for name in METRICS:
        out[name] = np.full((len(seeds), len(steps)), np.nan)
    for r in records:
        for name in METRICS:
            out[name][r_index[r["seed"]], t_index[r["step"]]] = r[name]
    return out
