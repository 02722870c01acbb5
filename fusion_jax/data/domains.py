"""Text domains that exist offline on any Debian/Ubuntu machine (and Colab).

English, German, Spanish and Italian come from the Debian `fortunes*` packages (records separated
by `%` lines); Python is the interpreter's own standard library. `domain_files(name)` lists a
domain's files or fails with a message that names the package to install.
"""

import dataclasses
import glob
import os
import sysconfig
from collections.abc import Callable

from fusion_jax.data import text
from fusion_jax.errors import UserError

FORTUNES = "/usr/share/games/fortunes"
INSTALL_ALL = "apt-get install fortunes fortunes-de fortunes-es fortunes-it"


def _plain_files(directory: str) -> list[str]:
    """Regular files directly in `directory`: no links (fortunes-it links its files into the
    English folder), no `.dat` indexes, no `.u8` aliases."""
    if not os.path.isdir(directory):
        return []
    names = sorted(os.listdir(directory))
    paths = [os.path.join(directory, n) for n in names if not n.endswith((".dat", ".u8"))]
    return [p for p in paths if os.path.isfile(p) and not os.path.islink(p)]


def _stdlib_modules() -> list[str]:
    return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))


@dataclasses.dataclass(frozen=True)
class Domain:
    description: str
    files: Callable[[], list[str]]
    record_separator: str | None
    package: str | None  # Debian package that provides the files


DOMAINS = {
    "en": Domain("English fortunes", lambda: _plain_files(FORTUNES), "%", "fortunes"),
    "de": Domain("German fortunes", lambda: _plain_files(f"{FORTUNES}/de"), "%", "fortunes-de"),
    "es": Domain("Spanish fortunes", lambda: _plain_files(f"{FORTUNES}/es"), "%", "fortunes-es"),
    "it": Domain("Italian fortunes", lambda: _plain_files(f"{FORTUNES}/it"), "%", "fortunes-it"),
    "python": Domain("Python standard library source", _stdlib_modules, None, None),
}


def parse_domains(spec: str) -> list[tuple[str, list[str], str | None]]:
    """`"en,de"` or custom `"name=glob1|glob2"` items -> [(name, files, record separator)].

    Custom domains take files, directories or globs (separated by `|`); each file is a document.
    """
    out = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        if "=" in item:
            name, sources = item.split("=", 1)
            out.append((name, text.expand_sources(sources.split("|")), None))
            continue
        if item not in DOMAINS:
            raise UserError(
                f"unknown domain {item!r}; known: {', '.join(DOMAINS)} (or name=glob for your own)"
            )
        domain = DOMAINS[item]
        files = domain.files()
        if not files:
            raise FileNotFoundError(
                f"domain {item!r} ({domain.description}) has no files: "
                f"install the Debian package with `apt-get install {domain.package}`"
            )
        out.append((item, files, domain.record_separator))
    if len({name for name, _, _ in out}) != len(out):
        raise UserError(f"domains must be distinct, got {spec!r}")
    return out
