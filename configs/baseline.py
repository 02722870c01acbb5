"""The reference grokking baseline (run 0): a 2-layer post-LN Transformer per task, 3 seeds.

    python main.py --config=configs/baseline.py --workdir=runs/baseline
    python main.py --config=configs/baseline.py:quick --workdir=runs/quick      # minutes on a CPU
    python main.py --config=configs/baseline.py --workdir=runs/baseline --mode=eval

Variants (after the colon): `quick` (x_plus_y, 1 seed, 1000 updates), `tiny` (used by tests).
Any field can be overridden, e.g. `--config.num_steps=300 --config.tasks=x_plus_y`.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Title of this experiment in plots and tables.
    config.name = "Baseline"
    # Key of this experiment in shared/reference/seed_runs.json, for comparison tables.
    config.reference_run = "run_0"
    # Comma-separated task names: x_plus_y, x_minus_y, x_div_y, permutation.
    config.tasks = "x_div_y,x_minus_y,x_plus_y,permutation"
    # Optimiser updates per run.
    config.num_steps = 7500
    # Runs per task; run r uses seed `seed + r`. All runs of a task train as one vmapped program.
    config.num_seeds = 3
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    # Modulus of the arithmetic tasks (permutation is always S5).
    config.data.p = 97
    # Fraction of all pairs used for training; the rest is validation.
    config.data.frac_train = 0.5
    # "tfds": tables from the TFDS array_record builder; "algebra": computed in memory (identical).
    config.data.source = "tfds"
    # Where TFDS prepares its array_record files.
    config.data.tfds_dir = "~/tensorflow_datasets"

    config.model = ml_collections.ConfigDict()
    # Registered model name (fusion_jax.models.MODELS).
    config.model.name = "transformer"
    config.model.num_layers = 2
    config.model.dim = 128
    config.model.num_heads = 4
    config.model.mlp_ratio = 4
    # Skip what the reference computes and discards (last block off the last position).
    config.model.last_position_only = True
    # Train only non-expert parameters (fusion models); see configs/dyn_fusion.py.
    config.model.freeze_experts = False
    # Matmul passes on accelerators: "highest" (full float32, as the PyTorch reference computes),
    # "high" (TPU: 3 bfloat16 passes; GPU: TF32) or "default" (TPU: 1 bfloat16 pass). No effect
    # on CPU. See BUILD_NOTES.md.
    config.model.matmul_precision = "highest"
    # "float32", or "bfloat16": the forward and backward run in bfloat16 while the parameters and
    # the optimiser state stay float32 (logits and loss are float32).
    config.model.compute_dtype = "float32"

    config.opt = ml_collections.ConfigDict()
    config.opt.learning_rate = 1e-3
    config.opt.b1 = 0.9
    config.opt.b2 = 0.98
    config.opt.eps = 1e-8
    config.opt.weight_decay = 0.5
    # Linear warm-up from lr 0 over this many updates.
    config.opt.warmup_steps = 50

    config.train = ml_collections.ConfigDict()
    # Global batch (split over devices), drawn with replacement from the train split.
    config.train.batch_size = 512
    # Updates between validation passes (the reference logs every 10 updates).
    config.train.eval_every = 10
    # Updates per compiled chunk: the host syncs, logs progress and may checkpoint in between.
    config.train.log_every = 500
    # Updates between checkpoints (a multiple of log_every); the last step is always saved.
    config.train.checkpoint_every = 500
    # Checkpoints kept per task.
    config.train.max_to_keep = 2
    # Devices for pmap data parallelism; 0 = all local devices.
    config.train.num_devices = 0
    # Also save when this many seconds have passed since the last save (0 = off), shortening the
    # compiled chunks on a slow device so that one takes at most a quarter of it: a lost runtime
    # then costs minutes. Results do not depend on it.
    config.train.checkpoint_every_secs = 600.0
    # Fail at start-up unless JAX finds a GPU or TPU (instead of running on the CPU).
    config.train.require_accelerator = False
    # Multi-process runs (a TPU pod slice, several GPU hosts): 1 = one process; 0 = let
    # jax.distributed detect the cluster (TPU pods, SLURM, Open MPI); N > 1 = N processes that
    # meet at `coordinator_address` ("host:port"), this one being `process_id`.
    config.train.num_processes = 1
    config.train.coordinator_address = ""
    config.train.process_id = 0

    config.eval = ml_collections.ConfigDict()
    # "exact": the whole validation split; "sampled": the reference's batches with replacement.
    config.eval.mode = "exact"
    # Sampled mode only: number and size of validation batches.
    config.eval.num_batches = 8
    config.eval.batch_size = 512
    # Accuracy threshold of step_val_acc_99.
    config.eval.acc_threshold = 0.99

    return apply_variant(config, arg)


# The CPU sizes `apply_variant` knows.
SIZES = ("quick", "tiny")


def apply_variant(config: ml_collections.ConfigDict, arg: str | None):
    """Small variants for CPUs and tests, shared by every experiment config."""
    if arg in (None, ""):
        return config
    if arg == "quick":
        config.tasks = "x_plus_y"
        config.num_seeds = 1
        config.num_steps = 1000
        config.train.log_every = 100
        config.train.checkpoint_every = 500
    elif arg == "tiny":
        # Seconds on a CPU: what the tests run.
        config.tasks = "x_plus_y"
        config.data.p = 11
        config.data.source = "algebra"
        config.num_seeds = 2
        config.num_steps = 20
        # Keeps the variant's head count (e.g. heads6) with 8 dimensions per head.
        config.model.dim = 8 * config.model.num_heads
        if "gate_dim" in config.model:
            config.model.gate_dim = 8
        config.train.batch_size = 32
        config.train.eval_every = 5
        config.train.log_every = 10
        config.train.checkpoint_every = 10
        config.eval.batch_size = 32
        config.eval.num_batches = 2
    else:
        raise ValueError(f"Unknown config variant {arg!r}; known: {', '.join(SIZES)}.")
    return config
