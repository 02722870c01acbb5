"""Files written whole or not at all, and never with NaN or Inf in them.

Each file goes to a temporary name beside its target and is renamed into place (`os.replace` is
atomic on POSIX), so a kill at any moment leaves either the old file or the new one, never a torn
one. JSON is strict: NaN and Inf have no JSON spelling, and a reader in another language (or
`json.loads(..., parse_constant=...)`) would reject the file, so they are refused instead.
"""

import json
import os

from fusion_jax import errors
from fusion_jax.errors import UserError

_REQUIRED = object()


def read_json(path: str, default=_REQUIRED):
    """The JSON file at `path`; `default` (None included) if it does not exist and one is given."""
    if default is not _REQUIRED and not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with errors.naming(path), open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str, obj, **dump_kwargs) -> None:
    """Writes `obj` as strict JSON (indent 2 unless told otherwise) to `path`, atomically."""
    try:
        text = json.dumps(obj, allow_nan=False, **{"indent": 2, **dump_kwargs})
    except ValueError as e:  # NaN or Inf somewhere in obj
        raise UserError(f"{path} was not written: its values include NaN or Inf ({e})") from e
    write_text(path, text)


def default_file_mode() -> int:
    """0666 less the process's umask: the mode `open()` gives a new file (0644 under umask 022).
    Some writers (safetensors) create files 0600, which a server running as another user cannot
    read."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies inside it (links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def check_apart(output: str, inputs: list[str], workdir: str | None = None) -> None:
    """Refuses an `output` path that is an input, contains one or lies inside one (writing it
    would replace, delete or add to a model that the run reads and the user keeps), and a
    `workdir` inside an input."""
    for path in inputs:
        if _inside(output, path) or _inside(path, output) or (workdir and _inside(workdir, path)):
            raise UserError(
                f"the output {workdir or output} overlaps the input {path} (the same path, or "
                "one inside the other); choose a --workdir apart from every input"
            )
