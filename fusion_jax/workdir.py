"""A workdir belongs to one config and has one writer at a time.

* Binding: `<workdir>/config.json` is the config the workdir's results come from. A run that
  extends the workdir (`claim`) or reads it (`read_config`) refuses a config that differs in any
  field outside its kind's safe changes that the runs read (`schema.Spec`: `safe_changes`,
  `unused`), listing the differences as `field: old → new`. The caller gives the spec
  (`modes.spec_of` maps a config to it), so this module knows no kind.
* Lock: `<workdir>/.lock`, held with `fcntl.flock` for as long as a process writes there. The OS
  drops the lock when its holder exits, even by kill -9, so a dead process never blocks the
  workdir; the file keeps the holder's pid for the message another process gets.
Nothing is written into a workdir before its checks pass, and a folder the lock created is
removed again when its holder wrote nothing there (a call that failed).
"""

import contextlib
import fcntl
import functools
import json
import os

import jax
import ml_collections
from absl import logging

from fusion_jax import files, schema
from fusion_jax.errors import UserError

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
_ABSENT = "(absent)"

# Workdirs this process holds the lock of -> nesting depth, so nested claims do not deadlock.
_HELD: dict[str, int] = {}


def check_not_file(workdir: str) -> None:
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir={workdir} is a file, not a directory")


def check_exists(workdir: str) -> None:
    check_not_file(workdir)
    if not os.path.isdir(workdir):
        raise UserError(f"--workdir={workdir} does not exist; train into it first")


def stored_config(workdir: str, spec_of) -> dict | None:
    """The workdir's config.json as a dict (fields added since it was written filled in with the
    values that reproduce it: `spec_of(stored).upgrade`), or None if the workdir has none."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            stored = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); restore it or use a new --workdir") from e
    return spec_of(stored).upgrade(stored)


def _items(value) -> list[str] | None:
    return (
        sorted(v.strip() for v in value.split(",") if v.strip()) if isinstance(value, str) else None
    )


def _grows(old, new) -> bool:
    return all(isinstance(v, int | float) for v in (old, new)) and new > old


# How each kind of safe field may change (`Spec.safe_changes`): a test of
# `(old, new, extending)`, and what a refusal adds. Reading a workdir ignores an "increase"
# field's value, so only a run that extends the workdir must not shrink it.
_SAFE_KINDS = {
    "any": (lambda old, new, extending: True, ""),
    "increase": (
        lambda old, new, extending: not extending or _grows(old, new),
        " (only an increase is safe)",
    ),
    "reorder": (
        lambda old, new, extending: _items(old) is not None and _items(old) == _items(new),
        " (only a reordering is safe)",
    ),
}


def _show(value) -> str:
    return value if value is _ABSENT else repr(value)


def _differences(stored: dict, config, extending: bool, spec) -> tuple[list[str], list[str]]:
    """(refused, allowed) differences of `config` from `stored`, each as `field: old → new`."""
    old = schema.flatten(stored)
    new = schema.flatten(json.loads(config.to_json()))
    safe = spec.safe_changes
    # Fields that neither the workdir's run nor this one reads change no result (a kind that
    # differs is refused: `experiment` differs).
    same_kind = stored.get("experiment") == spec.kind
    unused = spec.unused(stored) & spec.unused(config) if same_kind else set()
    refused, allowed = [], []
    for field in list(new) + [f for f in old if f not in new]:
        a, b = old.get(field, _ABSENT), new.get(field, _ABSENT)
        if a == b:
            continue
        change = f"{field}: {_show(a)} → {_show(b)}"
        if field in unused:
            allowed.append(change)
            continue
        if field not in safe:
            refused.append(change)
            continue
        ok, refusal = _SAFE_KINDS[safe[field]]
        if ok(a, b, extending):
            allowed.append(change)
        else:
            refused.append(change + refusal)
    return refused, allowed


def _safe_list(spec) -> str:
    safe = spec.safe_changes
    return ", ".join(f if how == "any" else f"{f} ({how} only)" for f, how in safe.items())


def check_binding(config, workdir: str, extending: bool, spec) -> list[str]:
    """Refuses a config that differs from the workdir's config.json in a field that changes
    results (`spec`: the config's kind's); returns the allowed differences. `extending`: the run
    continues the workdir (a safe "increase only" field may then not decrease)."""
    stored = stored_config(workdir, lambda _: spec)
    if stored is None:
        return []
    refused, allowed = _differences(stored, config, extending, spec)
    if refused:
        raise UserError(
            f"--config differs from the config of {workdir} ({CONFIG_FILE}) in fields that "
            f"change results: {', '.join(refused)}. Use a new --workdir, or the workdir's "
            f"values; fields that may change: {_safe_list(spec)}"
        )
    return allowed


def read_config(config, workdir: str, spec_of) -> ml_collections.ConfigDict:
    """The workdir's own config, for modes that read a workdir; a `config` given too must agree.
    `spec_of(config)`: the spec of a config's kind.

    Differences in safe fields are ignored (with a warning): the workdir's values describe it.
    """
    check_exists(workdir)
    stored = stored_config(workdir, spec_of)
    if stored is None:
        raise UserError(
            f"{workdir} has no {CONFIG_FILE}: it is not a fusion_jax workdir, or its training "
            "never started"
        )
    if config is not None:
        spec_of(config).validate(config)
        for change in check_binding(config, workdir, False, spec_of(config)):
            logging.warning("ignoring --config %s: %s describes this workdir", change, CONFIG_FILE)
    return ml_collections.ConfigDict(stored)


def _write_config(config, workdir: str, spec) -> None:
    """Records the config; atomically, so an interruption never leaves half a config.json."""
    path = os.path.join(workdir, CONFIG_FILE)
    text = config.to_json(indent=2)
    if stored_config(workdir, lambda _: spec) == json.loads(text):
        return
    files.write_text(path, text)


@contextlib.contextmanager
def lock(workdir: str):
    """Holds the workdir's exclusive lock; fails at once, naming the holder, if another has it."""
    key = os.path.realpath(workdir)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    check_not_file(workdir)
    created = not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, LOCK_FILE), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise UserError(
                f"--workdir={workdir} is in use by another process (pid {holder}); wait for "
                "it to finish or stop it"
            ) from None
        except OSError as e:  # Some network and FUSE file systems have no flock.
            logging.warning("cannot lock %s (%s): make sure one process writes there", workdir, e)
        else:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
            # A call that failed before writing (e.g. a bad --workdirs) leaves no empty folder.
            # Best effort: a process opening the lock in between keeps the folder (rmdir refuses
            # a folder that is not empty), and this must not hide the call's own error.
            if created and os.listdir(workdir) == [LOCK_FILE]:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(workdir, LOCK_FILE))
                    os.rmdir(workdir)


# Workdir -> the config (JSON) its claim checked, while the claim is held by this process.
_CLAIMED: dict[str, str] = {}


@contextlib.contextmanager
def claim(config, workdir: str, spec):
    """For runs that write a workdir: validates the config against `spec` (its kind's), checks
    it against the workdir's, takes the lock and records the config. Nothing is written before
    the checks pass."""
    key, text = os.path.realpath(workdir), config.to_json()
    if _CLAIMED.get(key) == text:  # nested (`claims_workdir` under modes.train): checked
        yield
        return
    spec.validate(config, devices=jax.local_device_count())
    check_not_file(workdir)
    spec.outputs(config, workdir)
    check_binding(config, workdir, True, spec)
    if jax.process_index() > 0:
        # A multi-process run: process 0 holds the lock and records the config for all.
        yield
        return
    with lock(workdir):
        # Again under the lock: another process may have bound the workdir in the meantime.
        check_binding(config, workdir, True, spec)
        _write_config(config, workdir, spec)
        _CLAIMED[key] = text
        try:
            yield
        finally:
            del _CLAIMED[key]


def claims_workdir(spec):
    """Decorates an experiment's `run(config, workdir)` to hold `claim` (with its kind's `spec`)
    around it, so a call from Python validates the config and binds the workdir as main.py does
    (re-entrant: under main.py, `modes.train`'s claim is already held)."""

    def decorate(run):
        @functools.wraps(run)
        def claimed(config, workdir: str):
            with claim(config, workdir, spec):
                return run(config, workdir)

        return claimed

    return decorate
