"""Check that peft loads an adapter of `--mode=extract_lora` into the same model (DEV-ONLY).

peft, PyTorch and transformers are NOT dependencies of fusion_jax: install them in a scratch
environment only, and never add them to requirements.txt or CI:

    python -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.13.0 transformers peft

Usage (from the repository root, with fusion_jax's own Python):

    python scripts/check_peft_adapter.py --torch-python /tmp/torchenv/bin/python \
        [--base tests/fixtures/lm/llama] [--rank 4]

It writes, in a temporary folder, a fine-tune of `--base` (every matrix plus a rank-`--rank`
update, NumPy), extracts its adapter with `python main.py --mode=extract_lora`, and writes what
fusion_jax reads that adapter as (`lora.LoraReader` over the base, as lm_merge reads an adapter
input). Then, in the scratch Python, peft loads the base with the adapter (`PeftModel.
from_pretrained`), merges it (`merge_and_unload`), and every weight is compared with the
fine-tune and with fusion_jax's reading. Exits 1 if a max |difference| exceeds 1e-5.
"""

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
from safetensors.numpy import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fusion_jax import hf_checkpoint as hc  # noqa: E402
from fusion_jax import lora  # noqa: E402

# Runs in the scratch Python: peft's merged weights against both references.
CHECK = """
import sys, numpy as np, torch
from peft import PeftModel
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM
base, adapter, tuned, ours = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
worst = 0.0
for name, ref in (("fine-tune", load_file(tuned)), ("fusion_jax", load_file(ours))):
    diffs = {k: float(np.abs(state[k] - x).max()) for k, x in ref.items() if k in state}
    top = max(diffs, key=diffs.get)
    print(f"peft vs {name}: {len(diffs)} tensors, max |diff| {diffs[top]:.3g} ({top})")
    worst = max(worst, diffs[top])
sys.exit(int(worst > 1e-5))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--torch-python", required=True, help="python of the scratch venv")
    parser.add_argument("--base", default=os.path.join(ROOT, "tests/fixtures/lm/llama"))
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        base = hc.TensorReader(args.base)
        tuned = {}
        for name in base.files:
            x = base.get(name)
            if x.ndim == 2 and name.split(".")[-2] not in lora.NOT_LINEAR:
                u = rng.standard_normal((x.shape[0], args.rank))
                v = rng.standard_normal((args.rank, x.shape[1]))
                x = x + (0.01 * u @ v).astype(x.dtype)
            tuned[name] = x
        tuned_dir = os.path.join(tmp, "tuned")
        subprocess.run(["cp", "-r", args.base, tuned_dir], check=True)
        save_file(tuned, os.path.join(tuned_dir, "model.safetensors"), metadata={"format": "pt"})
        workdir = os.path.join(tmp, "w")
        subprocess.run([sys.executable, os.path.join(ROOT, "main.py"),
                        "--config=" + os.path.join(ROOT, "configs/lm_merge.py"),
                        "--mode=extract_lora", f"--workdir={workdir}", f"--config.base={args.base}",
                        f"--config.models={tuned_dir}", f"--config.lora_rank={args.rank}"],
                       check=True, cwd=ROOT)  # fmt: skip
        adapter = os.path.join(workdir, "lora", "tuned")
        reader = lora.LoraReader(adapter, base)
        ours = os.path.join(tmp, "ours.safetensors")
        save_file({n: reader.get(n) for n in reader.files}, ours)
        tuned_file = os.path.join(tuned_dir, "model.safetensors")
        check = [args.torch_python, "-c", CHECK, args.base, adapter, tuned_file, ours]
        sys.exit(subprocess.run(check).returncode)


if __name__ == "__main__":
    main()
