"""Dynamic fusion (the seed's runs 1-4): K expert Transformers fused by a gated attention layer.

    python main.py --config=configs/dyn_fusion.py --workdir=runs/dyn_fusion            # run 1
    python main.py --config=configs/dyn_fusion.py:layers4 --workdir=runs/dyn_fusion_l4  # run 2
    python main.py --config=configs/dyn_fusion.py:heads6 --workdir=runs/dyn_fusion_h6   # run 3
    python main.py --config=configs/dyn_fusion.py:layers5 --workdir=runs/dyn_fusion_l5  # run 4

Variants combine with the CPU sizes of the baseline with a comma, e.g. `layers4,quick`.
Every model field is overridable: `--config.model.num_experts=2 --config.model.top_k=1`.
Experts and gate train end to end; `--config.model.freeze_experts=True` trains the gate only.
"""

import ml_collections

from configs import baseline

# The seed's run numbers and what each variant changes (the seed published numbers, not code).
VARIANTS = {
    None: ("run_1", "Dynamic Fusion", {}),
    "layers4": ("run_2", "Dynamic Fusion, 4 layers", {"num_layers": 4}),
    # 128 is not divisible by 6 (torch's MultiheadAttention refuses it too): 132 = 6 x 22 is the
    # nearest width that is, so the head count changes and the width barely does.
    "heads6": ("run_3", "Dynamic Fusion, 6 heads", {"num_heads": 6, "dim": 132}),
    "layers5": ("run_4", "Dynamic Fusion, 5 layers", {"num_layers": 5}),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    names = [a for a in (arg or "").split(",") if a]
    unknown = [n for n in names if n not in VARIANTS and n not in baseline.SIZES]
    if unknown:
        known = ", ".join(sorted(k for k in VARIANTS if k) + list(baseline.SIZES))
        raise ValueError(f"Unknown config variant {unknown[0]!r}; known: {known}.")
    model_variants = [n for n in names if n in VARIANTS]
    if len(model_variants) > 1:
        raise ValueError(f"Pick one of {sorted(k for k in VARIANTS if k)}, got {model_variants}.")
    variant = model_variants[0] if model_variants else None
    reference_run, name, changes = VARIANTS[variant]

    config = baseline.get_config()
    config.name = name
    # Key of this experiment in shared/reference/seed_runs.json, for comparison tables.
    config.reference_run = reference_run
    m = config.model
    m.name = "fusion"
    # Number of experts; each is a full Transformer of the sizes above.
    m.num_experts = 3
    # Gate query source: "experts" (mean expert state) or "tokens" (own context encoder).
    m.fusion_context = "experts"
    # Width of the gate's query/key space.
    m.gate_dim = 64
    # Softmax temperature of the gate over experts.
    m.temperature = 1.0
    # Keep only the top-k experts per position (0 = all).
    m.top_k = 0
    # Switch-style load-balancing loss weight (1e-2 is Switch's value); 0 = off.
    m.balance_weight = 0.0
    # Weight of the gate entropy in the loss (> 0 sharpens the gate); 0 = off.
    m.entropy_weight = 0.0
    # Train the gate, mixing and head only; the experts stay as initialised or restored.
    m.freeze_experts = False
    for key, value in changes.items():
        m[key] = value
    for size in (n for n in names if n not in VARIANTS):
        baseline.apply_variant(config, size)
    return config
