"""PyTorch side of bench/lm_forward.py (DEV-ONLY: run by a scratch venv's python, never imported).

Needs torch, transformers, accelerate and gguf in that venv (never in requirements.txt or CI):

    /tmp/scratch/bin/python bench/torch_lm_step.py --gguf FILE.gguf --batch 8 --seq 256

Loads the GGUF file with transformers' own GGUF loader in float32, then times (median of
`--repeats` after a warm-up call) one forward pass (`torch.no_grad`, eval mode) and one training
step (forward, cross-entropy on the next tokens, backward, Adam), on the same random token ids
as the JAX side (seed 2, ids below 256), and prints one JSON line.
"""

import argparse
import json
import os
import statistics
import time

import torch
from transformers import AutoModelForCausalLM


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    folder, name = os.path.split(os.path.abspath(args.gguf))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 256, (args.batch, args.seq + 1), generator=generator)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    model.eval()

    def forward():
        with torch.no_grad():
            model(inputs).logits.sum().item()

    forward_s = median_time(forward, args.repeats)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)

    def step():
        logits = model(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 targets.reshape(-1))  # fmt: skip
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_s = median_time(step, args.repeats)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "forward_s": forward_s, "train_s": train_s}))  # fmt: skip


if __name__ == "__main__":
    main()
