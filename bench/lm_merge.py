"""Benchmark: streaming merges of Hugging Face Llama checkpoints, end to end, against mergekit.

    python bench/lm_merge.py [--case random|7b|smollm2] [--dir DIR] [--params 97.5] \
        [--methods ties,weight_average] [--runner cli|api|both] \
        [--mergekit /tmp/mk/bin/mergekit-yaml] [--skip-write]

Writes (or reuses, if `--dir` already holds them) a base and three "fine-tunes" (base + small
Gaussian perturbations), saved with `hf_checkpoint.save`. The base of `--case`:
* `random`: a random fp32 Llama of about `--params` million parameters (few, large tensors);
* `7b`: the tensor shapes of Llama-2-7B (width 4096, intermediate 11008, vocab 32000) with 2
  layers, bf16: the largest tensors of a 7B merge, so its peak memory;
* `smollm2`: the real SmolLM2-135M (`pretrained.resolve("smollm2")`) in fp32: 272 tensors,
  so a per-tensor cost cannot hide.
Then it times every merge in a fresh subprocess:

* runner `cli`: the real CLI, `python main.py --config=configs/lm_merge.py ...`, which also
  hashes every input file (sha256) for merge_info.json;
* runner `api`: `python -c` importing `streaming_merge` and calling it, which times its imports
  and the merge separately.

TIES runs at density 0.5, lam 1.0 against the base (K + 1 = 4 checkpoints read); the linear merge
is `weight_average` of the three fine-tunes, uniform (K = 3 read). Peak RSS is the child's own
(`os.wait4`), printed in GB and as a multiple of one checkpoint's size; GB/s is the bytes of the
checkpoints a merge reads over its wall seconds. "startup" is the time from spawning the child to
the end of its imports (api runner), or a separate child that only imports what the CLI imports
(cli runner). With `--mergekit PATH/mergekit-yaml`, mergekit merges the same files with the same
methods in the same run (YAML configs printed), and its output is compared with ours tensor by
tensor. All checkpoints sit in the page cache after being written, for both tools alike. Peak
RSS counts the mmapped checkpoint pages that safetensors' readers touch (both tools read that
way), so the anonymous and file-backed peaks, sampled from /proc, are printed too. The
anonymous peak, less that of a child that only imports, is printed beside the streaming bound
(K + 3) x the largest tensor + one output shard. GB/s is printed beside the machine's own copy
bandwidth (`np.copyto` of 512 MB, best of 3) as a fraction of it.

mergekit is never a dependency of this project; for the comparison, in a scratch venv (torch
first, pinned to the local CPU wheel, or pip fetches a multi-GB CUDA build):

    python -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0
    /tmp/mk/bin/pip install mergekit
"""

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fusion_jax import hf_checkpoint as hc  # noqa: E402
from fusion_jax.models.lm import LMConfig  # noqa: E402

NUM_EXPERTS = 3
HPARAMS = {"ties": {"density": 0.5, "lam": 1.0}, "weight_average": {"weights": None}}
MERGEKIT_METHOD = {"ties": "ties", "weight_average": "linear"}

# Runs inside the api child: times its imports and the merge, prints one JSON line.
API_DRIVER = """
import json, sys, time
t0 = time.time()
from fusion_jax.experiments.lm_merge import streaming_merge
t1 = time.time()
a = json.loads(sys.argv[1])
streaming_merge(a["method"], a["hparams"], a["models"], a["base"], a["out"], progress=False)
print("RESULT " + json.dumps({"start": t0, "imported": t1, "merged": time.time()}))
"""
# What main.py imports before it runs anything: the cli runner's startup.
CLI_IMPORTS = (
    "import main; from fusion_jax import modes; from fusion_jax.experiments import lm_merge"
)
API_IMPORTS = "from fusion_jax.experiments.lm_merge import streaming_merge"


def llama_config(params_m: float, hidden: int, vocab: int, heads: int) -> dict:
    """An untied Llama of about `params_m` million parameters: width, heads and vocabulary as
    given, layers and intermediate size (a multiple of 32) solved for the count."""
    target = params_m * 1e6 - 2 * vocab * hidden - hidden  # embeddings, head, final norm
    if target <= 0:
        raise ValueError(f"--params {params_m} is below the embeddings' {2 * vocab * hidden:,}")
    fixed = 4 * hidden * hidden + 2 * hidden  # attention and the two norms of one layer
    layers = max(1, round(target / (fixed + 3 * hidden * 2048)))
    inter = max(32, round((target / layers - fixed) / (3 * hidden) / 32) * 32)
    return {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "intermediate_size": inter,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "torch_dtype": "float32",
        "architectures": ["LlamaForCausalLM"],
    }


def checkpoint_dirs(root: str) -> tuple[str, list[str]]:
    return os.path.join(root, "base"), [os.path.join(root, f"ft{k}") for k in range(NUM_EXPERTS)]


def random_base(hf_config: dict, seed: int) -> dict:
    """Flat {path: fp32 array}: N(0, 0.02) matrices and unit norm scales."""
    rng = np.random.default_rng(seed)
    base = {}
    for path, s in hc.abstract_params(LMConfig.from_hf(hf_config)).items():
        if path.endswith("/scale"):
            base[path] = np.ones(s.shape, np.float32)
        else:
            base[path] = rng.standard_normal(s.shape, np.float32)
            base[path] *= np.float32(0.02)
    return base


def write_checkpoints(root: str, hf_config: dict, base: dict, seed: int, delta: float,
                      dtype: str, source: str | None = None) -> None:  # fmt: skip
    """The base (flat fp32 params) and fine-tune k = base + N(0, delta) noise, saved in `dtype`
    (with `source`'s side files: its tokenizer)."""
    base_dir, expert_dirs = checkpoint_dirs(root)
    rng = np.random.default_rng(seed + 1)
    hc.save(hc.unflatten(base), hf_config, base_dir, dtype=dtype, source=source)
    for d in expert_dirs:
        expert = {}
        for path, x in base.items():
            noise = rng.standard_normal(x.shape, np.float32)
            noise *= np.float32(delta)
            expert[path] = noise + x
        hc.save(hc.unflatten(expert), hf_config, d, dtype=dtype, source=source)
        del expert


def write_all(root, hf_config, seed, delta, dtype, source) -> None:
    """`write_checkpoints` of the real weights of `source`, or of a random base."""
    weights = hc.flatten(hc.load(source, "float32")[1]) if source else random_base(hf_config, seed)
    write_checkpoints(root, hf_config, weights, seed, delta, dtype, source)


def have_checkpoints(root: str, hf_config: dict) -> bool:
    base_dir, expert_dirs = checkpoint_dirs(root)
    for d in [base_dir, *expert_dirs]:
        try:
            if hc.read_config(d) != json.loads(json.dumps(hf_config)):
                return False
            hc.tensor_files(d)
        except (FileNotFoundError, ValueError):
            return False
    return True


def checkpoint_bytes(directory: str) -> int:
    return sum(os.path.getsize(f) for f in set(hc.tensor_files(directory).values()))


def _rss_sampler(pid: int, peaks: dict, stop: threading.Event) -> None:
    """Peak RssAnon / RssFile (bytes) of `pid`, sampled from /proc every 20 ms."""
    while not stop.wait(0.02):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in ("RssAnon", "RssFile"):
                        peaks[key] = max(peaks.get(key, 0), int(value.split()[0]) * 1024)
        except (OSError, ValueError):
            return


def run_child(cmd: list[str], cwd: str = ROOT) -> dict:
    """wall seconds, peak RSS of that child alone (`wait4`), sampled peak anonymous and
    file-backed RSS, stdout; raises on failure."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    tic = time.time()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    # Threads drain the pipes and sample /proc while wait4 reaps the child with its own rusage.
    out_chunks, err_chunks, peaks, stop = [], [], {}, threading.Event()
    threads = [
        threading.Thread(target=lambda s=s, c=c: c.append(s.read()))
        for s, c in ((proc.stdout, out_chunks), (proc.stderr, err_chunks))
    ]
    threads.append(threading.Thread(target=_rss_sampler, args=(proc.pid, peaks, stop)))
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - tic
    stop.set()
    for t in threads:
        t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = "".join(out_chunks), "".join(err_chunks)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {
        "wall": wall,
        "rss": usage.ru_maxrss * 1024,
        "anon": peaks.get("RssAnon", 0),
        "file": peaks.get("RssFile", 0),
        "out": out,
    }


def ours(method: str, runner: str, base: str, experts: list[str], work: str) -> dict:
    hparams = HPARAMS[method]
    base = base if method != "weight_average" else None
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    if runner == "api":
        arg = {"method": method, "hparams": hparams, "models": experts, "base": base}
        arg["out"] = os.path.join(work, "merged")
        tic = time.time()
        r = run_child([sys.executable, "-c", API_DRIVER, json.dumps(arg)])
        times = json.loads(r["out"].split("RESULT ", 1)[1])
        r["startup"] = times["imported"] - tic
        r["merge"] = times["merged"] - times["imported"]
        imports = run_child([sys.executable, "-c", API_IMPORTS])
        r["import_rss"], r["import_anon"] = imports["rss"], imports["anon"]
    else:
        cmd = [
            sys.executable, "main.py", "--config=configs/lm_merge.py", f"--workdir={work}",
            f"--config.base={base or ''}", f"--config.models={','.join(experts)}",
            f"--config.method={method}",
        ]  # fmt: skip
        if method == "ties":
            cmd += [f"--config.density={hparams['density']}", f"--config.lam={hparams['lam']}"]
        r = run_child(cmd)
        startup = run_child([sys.executable, "-c", CLI_IMPORTS])
        r["startup"], r["import_rss"] = startup["wall"], startup["rss"]
        r["import_anon"] = startup["anon"]
        with open(os.path.join(work, "merge_info.json")) as f:
            r["merge"] = json.load(f)["seconds"]  # merge + sha256 of the inputs
    return r


def mergekit_yaml(method: str, base: str, experts: list[str]) -> str:
    lines = [f"merge_method: {MERGEKIT_METHOD[method]}"]
    if method == "ties":
        lines.append(f"base_model: {base}")
    lines.append("models:")
    for d in experts:
        lines.append(f"  - model: {d}")
        lines.append("    parameters:")
        lines.append("      weight: 1.0")
        if method == "ties":
            lines.append(f"      density: {HPARAMS['ties']['density']}")
    lines.append("dtype: float32")
    return "\n".join(lines) + "\n"


def mergekit(exe: str, method: str, base: str, experts: list[str], work: str) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    cfg = os.path.join(work, "config.yml")
    with open(cfg, "w") as f:
        f.write(mergekit_yaml(method, base, experts))
    r = run_child([exe, cfg, os.path.join(work, "merged")], cwd=work)
    python = os.path.join(os.path.dirname(exe), "python")
    startup = run_child([python, "-c", "import mergekit.merge, mergekit.scripts.run_yaml"])
    r.update(startup=startup["wall"], import_rss=startup["rss"], import_anon=startup["anon"],
             merge=None)  # fmt: skip
    return r


def extra_kept(tensor_dirs: list[str], base_dir: str, name: str, density: float) -> int:
    """Entries tied with the k-th largest |task vector| beyond k, summed over experts: TIES
    with a threshold (ours) keeps them, an argsort cut at k (mergekit) drops them."""
    b = hc.TensorReader(base_dir).get(name)
    extra = 0
    for d in tensor_dirs:
        tau = np.abs(hc.TensorReader(d).get(name) - b).reshape(-1)
        k = max(1, int(density * tau.size))
        if k < tau.size:
            extra += int(np.count_nonzero(tau >= np.partition(tau, tau.size - k)[tau.size - k])) - k
    return extra


def compare(ours_dir, theirs_dir, base_dir, experts=None, show: int = 4) -> None:
    """Max |ours - mergekit| per tensor and overall, next to the merged task vectors' scale;
    with `experts` (TIES), also the tied entries at the trim threshold (see `extra_kept`)."""
    a, b, c = hc.TensorReader(ours_dir), hc.TensorReader(theirs_dir), hc.TensorReader(base_dir)
    names = sorted(a.files)
    missing = sorted(set(names) ^ set(b.files))
    if missing:
        print(f"  tensor names differ: {missing[:5]}")
    worst, total, differ, rows = 0.0, 0, 0, []
    for name in names:
        if name not in b.files:
            continue
        x, y = a.get(name).astype(np.float64), b.get(name).astype(np.float64)
        tau = np.abs(x - c.get(name)).max()
        diff = np.abs(x - y)
        rows.append((name, diff.max(), tau, int(np.count_nonzero(diff > 1e-6)), x.size))
        worst, total = max(worst, diff.max()), total + x.size
        differ += rows[-1][3]
    picks = [rows[0], rows[len(rows) // 3], rows[2 * len(rows) // 3], rows[-1]][:show]
    picks = sorted({r[0]: r for r in picks + [max(rows, key=lambda r: r[1])]}.values())
    tied = f"{'ties@k':>8}" if experts else ""
    print(f"  {'tensor':<44}{'max|diff|':>11}{'max|merged-base|':>18}{'n >1e-6':>9}{tied}")
    for name, d, tau, n, _ in picks:
        tied = (
            f"{extra_kept(experts, base_dir, name, HPARAMS['ties']['density']):>8}"
            if experts
            else ""
        )
        print(f"  {name:<44}{d:>11.3g}{tau:>18.3g}{n:>9}{tied}")
    print(f"  all {len(rows)} tensors: max|diff| {worst:.3g}, {differ} of {total} entries > 1e-6")


def copy_bandwidth(nbytes: int = 512 * 2**20) -> float:
    """This machine's memory copy rate, bytes copied per second (`np.copyto`, best of 3)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(3):
        tic = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - tic)
    return nbytes / best


def llama2_7b_shapes(layers: int) -> dict:
    """Llama-2-7B's config.json with `layers` layers, bf16."""
    return {
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
        "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 32,
        "intermediate_size": 11008, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
        "architectures": ["LlamaForCausalLM"],
    }  # fmt: skip


def the_case(args) -> tuple[dict, str, str | None]:
    """(config.json, dtype, source of the base's weights and tokenizer or None) of `--case`."""
    if args.case == "7b":
        return llama2_7b_shapes(2), "bfloat16", None
    if args.case == "smollm2":
        from fusion_jax import pretrained

        source = pretrained.resolve("smollm2")
        return dict(hc.read_config(source), torch_dtype="float32"), "float32", source
    return llama_config(args.params, args.hidden, args.vocab, args.heads), "float32", None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=("random", "7b", "smollm2"), default="random")
    parser.add_argument("--dir", help="checkpoints and outputs (default: a temp dir, removed)")
    parser.add_argument("--params", type=float, default=97.5, help="millions of parameters")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--delta", type=float, default=1e-3, help="std of fine-tune noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-write", action="store_true", help="use the checkpoints in --dir")
    parser.add_argument("--methods", default="ties,weight_average")
    parser.add_argument("--runner", choices=("cli", "api", "both"), default="both")
    parser.add_argument("--mergekit", help="path of mergekit-yaml: compare in the same run")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := [m for m in methods if m not in HPARAMS]:
        parser.error(f"unknown method {unknown[0]!r}; known: {', '.join(HPARAMS)}")
    runners = ("cli", "api") if args.runner == "both" else (args.runner,)

    root = args.dir or tempfile.mkdtemp(prefix="lm_merge_bench_")
    hf_config, dtype, source = the_case(args)
    base, experts = checkpoint_dirs(root)
    try:
        if args.skip_write:
            if not have_checkpoints(root, hf_config):
                parser.error(f"--skip-write: no checkpoints for these dims in {root}")
        elif have_checkpoints(root, hf_config):
            print(f"reusing checkpoints in {root}")
        else:
            tic = time.time()
            # In a spawned child: Linux counts the memory a process had when it forked in its
            # children's peak RSS (wait4), so this process stays small.
            child = multiprocessing.get_context("spawn").Process(
                target=write_all, args=(root, hf_config, args.seed, args.delta, dtype, source)
            )
            child.start()
            child.join()
            if child.exitcode:
                raise RuntimeError(f"writing the checkpoints failed ({child.exitcode})")
            print(f"wrote base + {NUM_EXPERTS} fine-tunes in {time.time() - tic:.1f} s to {root}")
        size = checkpoint_bytes(base)
        reader = hc.TensorReader(base)
        sizes = [
            int(np.prod(reader.shape_dtype(n)[0])) * reader.get_dtype(n).itemsize
            for n in reader.files
        ]
        print(
            f"Llama {sum(sizes) / reader.get_dtype(next(iter(reader.files))).itemsize / 1e6:.2f}M"
            f" params in {len(sizes)} tensors (hidden {hf_config['hidden_size']}, "
            f"{hf_config['num_hidden_layers']} layers, intermediate "
            f"{hf_config['intermediate_size']}, vocab {hf_config['vocab_size']}), {dtype}, "
            f"{size / 1e6:.1f} MB per checkpoint, largest tensor {max(sizes) / 1e6:.1f} MB; "
            f"{os.cpu_count()} CPUs, load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )
        rows = []
        for method in methods:
            reads = (NUM_EXPERTS + 1 if method == "ties" else NUM_EXPERTS) * size
            for runner in runners:
                r = ours(
                    method, runner, base, experts, os.path.join(root, f"ours_{method}_{runner}")
                )
                rows.append(("fusion_jax " + runner, method, reads, r))
            if args.mergekit:
                r = mergekit(
                    args.mergekit, method, base, experts, os.path.join(root, f"mk_{method}")
                )
                rows.append(("mergekit", method, reads, r))

        # After the runs: Linux counts the memory a process holds when it forks in its
        # children's peak RSS, and this takes 1 GB.
        bandwidth = copy_bandwidth()
        print(f"this machine copies memory at {bandwidth / 1e9:.1f} GB/s (np.copyto, 512 MB)")
        # The streaming bound: K inputs + 3 more of the largest tensor, and one output shard.
        shard = min(size, hc.parse_size("2GB"))
        bound = (NUM_EXPERTS + 3) * max(sizes) + shard
        print(f"{'tool':<16}{'method':<15}{'wall s':>7}{'startup s':>10}{'merge s':>8}"
              f"{'GB/s':>6}{'of copy':>8}{'RSS GB':>7}{'x ckpt':>7}{'anon GB':>8}{'file GB':>8}"
              f"{'import GB':>10}{'merge anon':>11}{'/ bound':>8}")  # fmt: skip
        for tool, method, reads, r in rows:
            merge = f"{r['merge']:>8.2f}" if r["merge"] is not None else f"{'-':>8}"
            own = r["anon"] - r["import_anon"]
            print(f"{tool:<16}{method:<15}{r['wall']:>7.2f}{r['startup']:>10.2f}{merge}"
                  f"{reads / r['wall'] / 1e9:>6.2f}{reads / r['wall'] / bandwidth:>8.3f}"
                  f"{r['rss'] / 1e9:>7.2f}{r['rss'] / size:>7.2f}"
                  f"{r['anon'] / 1e9:>8.2f}{r['file'] / 1e9:>8.2f}"
                  f"{r['import_rss'] / 1e9:>10.2f}{own / 1e9:>11.2f}"
                  f"{own / bound:>8.2f}")  # fmt: skip
        print(f"bound: (K + 3) x largest tensor + one output shard = {NUM_EXPERTS + 3} x "
              f"{max(sizes) / 1e6:.1f} MB + {shard / 1e6:.1f} MB = {bound / 1e9:.2f} GB; merge "
              "anon: peak anonymous RSS less that of a child that only imports.")  # fmt: skip
        if args.case == "7b":
            print(
                "a whole Llama-2-7B (32 layers) streams tensors of these same shapes: the same "
                f"bound, {bound / 1e9:.2f} GB with 2 GB output shards, plus the imports."
            )
        print("GB/s: checkpoint bytes read (K+1 = 4 for ties, K = 3 for linear) / wall seconds;")
        print("of copy: that over this machine's copy bandwidth.")
        print("startup: spawn to end of imports (api); a separate import-only child (cli,")
        print("mergekit). merge s: in-process merge (api); merge + sha256 of inputs (cli).")
        print("RSS GB / x ckpt: peak RSS (wait4), in GB and in checkpoints; anon / file: peak")
        print("anonymous and file-backed (mmapped checkpoint pages) RSS sampled every 20 ms;")
        print("import GB: peak RSS of a child that only imports.")

        if args.mergekit:
            print("ratios, fusion_jax / mergekit (same run):")
            by = {(t, m): r for t, m, _, r in rows}
            for method in methods:
                theirs = by[("mergekit", method)]
                for runner in runners:
                    r = by[("fusion_jax " + runner, method)]
                    print(f"  {method:<16}{runner:<5} time {r['wall'] / theirs['wall']:.2f}x, "
                          f"peak RSS {r['rss'] / theirs['rss']:.2f}x")  # fmt: skip
            for method in methods:
                print(f"mergekit config for {method}:")
                print("  " + mergekit_yaml(method, base, experts).rstrip().replace("\n", "\n  "))
                print(f"agreement, fusion_jax ({runners[0]}) vs mergekit, {method}:")
                if method == "ties":
                    print("  (ties@k: task-vector entries tied with the k-th largest magnitude")
                    print("  beyond k, summed over experts: kept by ours, dropped by mergekit)")
                compare(
                    os.path.join(root, f"ours_{method}_{runners[0]}", "merged"),
                    os.path.join(root, f"mk_{method}", "merged"),
                    base,
                    experts if method == "ties" else None,
                )
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
