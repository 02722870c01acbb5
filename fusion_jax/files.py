"""Files written whole or not at all, and never with NaN or Inf in them.

Each file goes to a temporary name beside its target and is renamed into place (`os.replace` is
atomic on POSIX), so a kill at any moment leaves either the old file or the new one, never a torn
one. JSON is strict: NaN and Inf have no JSON spelling, and a reader in another language (or
`json.loads(..., parse_constant=...)`) would reject the file, so they are refused instead.
"""

import contextlib
import json
import os

import jax.numpy as jnp
import numpy as np

from fusion_jax.errors import UserError

_REQUIRED = object()


def read_json(path: str, default=_REQUIRED):
    """The JSON file at `path`; `default` (None included) if it does not exist and one is given."""
    if default is not _REQUIRED and not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


@contextlib.contextmanager
def naming(path: str):
    """Names `path` in an OSError raised while it is written (errors.disk_error then says which
    file): a write that fills the disk raises one without a file name, and one raised for the
    temporary file beside `path` would name that."""
    try:
        yield
    except OSError as e:
        if e.errno is None or e.filename == path:
            raise
        raise OSError(e.errno, e.strerror, path) from e


def write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with naming(path), open(tmp, "w") as f:
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


def check_finite(array: np.ndarray, what: str) -> None:
    """Raises a UserError naming `what` if the float `array` holds NaN or Inf (after a cast to
    float16 or bfloat16, an overflow shows as Inf here)."""
    if not jnp.issubdtype(array.dtype, jnp.floating):
        return
    bad = np.size(array) - int(np.count_nonzero(np.isfinite(array)))
    if bad:
        raise UserError(
            f"{what}: {bad} of its {np.size(array)} {array.dtype} values are NaN or Inf "
            "(a non-finite input, a merge that is not finite, or an overflow of the output "
            "dtype); nothing is written from it"
        )
