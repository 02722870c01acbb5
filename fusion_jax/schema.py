"""How config fields are checked, and what each experiment kind declares about its fields.

A kind's `Spec` (one module per kind in fusion_jax/specs/) holds:
* `rules`: dotted field -> `Rule`. `Spec.validate` checks every leaf of a config against it, so
  a field without a rule is refused rather than left unchecked; then the cross-field rules.
  Every message is one line: `config.<field>=<value>: must be <allowed values>`;
* `safe_changes`: the fields a workdir's config may change between runs because they do not
  change results ("any", "increase" only, or "reorder"), and `unused(config)`, the fields a run
  never reads; fusion_jax/workdir.py refuses every other difference;
* `added_fields`: fields added after workdirs were written, with the value that reproduces what
  the code did before they existed (`Spec.upgrade` fills them into an old config.json);
* `outputs(config, workdir)`: checks of the workdir's place against the config's inputs.
`modes.KINDS` maps each kind to its spec, modes, runner and renderer.
"""

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from fusion_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Rule:
    """One field's allowed values: `ok(value)`, and words that complete "must be ..."."""

    ok: Callable[[Any], bool]
    allowed: str
    # Optional fields exist in some configs of a kind only (the fusion model's fields).
    required: bool = True


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)


def integer(low: int, required: bool = True) -> Rule:
    return Rule(lambda v: is_int(v) and v >= low, f"an integer >= {low}", required)


def number(
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    required: bool = True,
) -> Rule:
    """A finite int or float, at least `low` (if given) and at most `high` (only with a `low`),
    each bound open or closed."""

    def ok(v):
        if not is_number(v):
            return False
        above = low is None or (v > low if low_open else v >= low)
        below = high is None or (v < high if high_open else v <= high)
        return above and below

    if low is None:
        text = "a finite number"
    elif high is None:
        text = f"a number {'>' if low_open else '>='} {low:g}"
    else:
        text = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return Rule(ok, text, required)


def choice(*options, required: bool = True) -> Rule:
    return Rule(lambda v: v in options, "one of " + ", ".join(map(repr, options)), required)


def numbers(each: Rule) -> Rule:
    """A non-empty tuple (a list once read back from config.json) of values passing `each`."""
    return Rule(
        lambda v: isinstance(v, list | tuple) and len(v) > 0 and all(each.ok(x) for x in v),
        f"a non-empty tuple, each {each.allowed}",
    )


def split_list(value: str) -> list[str]:
    """The items of a comma-separated config field, stripped, empty ones dropped."""
    return [v.strip() for v in str(value).split(",") if v.strip()]


# A cross-field rule returns None, or (field, allowed values) for the first field it refuses.
# `devices` is the local device count when the config is about to run, else None.
Problem = tuple[str, str] | None


TEXT = Rule(lambda v: isinstance(v, str), "a string")
NAME = Rule(lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string")
FLAG = Rule(lambda v: isinstance(v, bool), "True or False")
POSITIVE = number(0, low_open=True)
NON_NEGATIVE = number(0)
FRACTION = number(0, 1, low_open=True, high_open=True)
SEED = integer(0)

# Names accepted by jax.default_matmul_precision, from the most to the least exact.
MATMUL_PRECISION = choice("highest", "high", "default")
COMPUTE_DTYPE = choice("float32", "bfloat16")

# The merge hyper-parameter grids of the studies (config.grid; merging.GRID_FIELDS).
MERGE_GRIDS = {
    "grid.lams": numbers(number()),
    "grid.densities": numbers(number(0, 1, low_open=True)),
    "grid.drop_rates": numbers(number(0, 1, high_open=True)),
    "grid.slerp_ts": numbers(number(0, 1)),
}


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` (a dict or a ConfigDict) -> `{"a.b": 1}`."""
    out = {}
    for key, value in tree.items():
        if hasattr(value, "items"):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def lookup(config, field: str):
    for part in field.split("."):
        config = config[part]
    return config


@dataclasses.dataclass(frozen=True)
class Spec:
    """What one experiment kind declares about its config fields (module docstring)."""

    kind: str | None  # `config.experiment`; None: grokking training
    config_files: str  # for messages that say which config to use
    rules: dict[str, Rule]
    cross_rules: tuple[Callable[[Any, int | None], Problem], ...] = ()
    safe_changes: dict[str, str] = dataclasses.field(default_factory=dict)
    added_fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    unused: Callable[[Mapping], set[str]] = lambda config: set()
    outputs: Callable[[Any, str], None] = lambda config, workdir: None
    # The module that declares it, named in the message for a field without a rule.
    module: str = ""

    def validate(self, config, devices: int | None = None) -> None:
        """Raises a one-line UserError for the first field (or field combination) out of range.

        `devices`: the local device count when the config is about to run (checks data
        parallelism and reads its inputs), None when it only reads a workdir.
        """
        values = flatten(config)
        for field, value in values.items():
            if field not in self.rules:
                raise UserError(
                    f"config.{field}={value!r}: not a field of {self.config_files} configs "
                    f"(every field needs a rule in {self.module})"
                )
            if not self.rules[field].ok(value):
                raise UserError(f"config.{field}={value!r}: must be {self.rules[field].allowed}")
        for field, rule in self.rules.items():
            if rule.required and field not in values:
                raise UserError(f"config.{field} is missing: {self.config_files} configs need it")
        for cross_rule in self.cross_rules:
            if problem := cross_rule(config, devices):
                field, allowed = problem
                raise UserError(f"config.{field}={lookup(config, field)!r}: must be {allowed}")

    def upgrade(self, stored: dict) -> dict:
        """A config.json dict with the fields added since it was written filled in."""
        out = json.loads(json.dumps(stored))
        for field, value in self.added_fields.items():
            *parents, leaf = field.split(".")
            node = out
            for part in parents:
                node = node.setdefault(part, {})
            node.setdefault(leaf, value)
        return out
