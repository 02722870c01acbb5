"""Static merging and DAM against dynamic fusion: multi-task experts from a shared base.

    python main.py --config=configs/compare.py --workdir=runs/compare
    python main.py --config=configs/compare.py:quick --workdir=runs/compare_quick   # 2-core CPU

Pipeline: base model on the task mixture -> one expert per task fine-tuned from it (and a
control set trained from unrelated random inits) -> every combination method -> comparison.md.
"""

import ml_collections

from configs import baseline


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = baseline.get_config()
    # What `--mode=train` (the default) runs for this config: fusion_jax.modes.EXPERIMENTS.
    config.experiment = "merge_compare"
    config.name = "Merging comparison"
    config.reference_run = None
    config.tasks = "x_plus_y,x_minus_y,x_div_y,permutation"
    # One process and one device. Training in progress is saved every
    # train.checkpoint_every_secs (at the end of a train.log_every chunk) and when each part of a
    # stage ends; the training loop's device, process and step-schedule fields do not apply.
    for field in ("num_processes", "coordinator_address", "process_id", "checkpoint_every",
                  "max_to_keep", "num_devices"):  # fmt: skip
        del config.train[field]
    # Fraction of each task's training split held out for choosing merge hyper-parameters.
    config.data.holdout_frac = 0.1
    # Independent runs of the whole pipeline; run r uses seed `seed + r` (its own split, inits and
    # batches). All seeds train as one vmapped program; stages are saved per seed, so a rerun with
    # more seeds trains only the new ones. Tables give mean ± standard error over seeds.
    config.num_seeds = 3

    config.base = ml_collections.ConfigDict()
    # Updates of the shared base model on the mixture of all tasks' training data.
    config.base.num_steps = 3000
    config.experts = ml_collections.ConfigDict()
    # Fine-tuning updates per expert, on its own task.
    config.experts.num_steps = 3000

    config.grid = ml_collections.ConfigDict()
    # Scale of the summed task vectors (task arithmetic, TIES, DARE).
    config.grid.lams = (0.3, 0.5, 0.7, 1.0)
    # TIES: fraction of each task vector kept.
    config.grid.densities = (0.2, 0.5)
    # DARE: drop rate of task-vector entries.
    config.grid.drop_rates = (0.5, 0.9)
    # SLERP interpolation points between the first two experts.
    config.grid.slerp_ts = (0.3, 0.5, 0.7)

    config.dam = ml_collections.ConfigDict()
    config.dam.num_steps = 1000
    config.dam.learning_rate = 1e-3  # the DAM repo's value
    # Examples per expert per DAM step.
    config.dam.batch_size = 128
    config.dam.temperature = 2.0
    config.dam.similarity_weight = 0.01
    config.dam.l1_weight = 0.0
    config.dam.l2_weight = 0.0
    # f in W = sum_k f(c_k) W_k: tanh, sigmoid, relu or none.
    config.dam.nonlinearity = "tanh"

    config.fusion = ml_collections.ConfigDict()
    # Updates of the fusion models (gate only, and end to end) on the mixture.
    config.fusion.num_steps = 2000
    config.fusion.gate_dim = 64
    # Switch load-balancing weight of the gate.
    config.fusion.balance_weight = 0.01

    if arg == "quick":
        # Under 15 minutes on 2 cores: two small tasks (p = 31) that start to generalise within
        # ~1500 updates at 70 % training data; four p = 97 tasks need thousands of updates each.
        config.tasks = "x_plus_y,x_minus_y"
        config.data.p = 31
        config.data.frac_train = 0.7
        config.base.num_steps = 1500
        config.experts.num_steps = 1500
        config.dam.num_steps = 300
        config.fusion.num_steps = 600
        config.model.dim = 64
        config.train.batch_size = 256
        config.grid.lams = (0.5, 1.0)
        config.grid.densities = (0.5,)
        config.grid.drop_rates = (0.5,)
        config.grid.slerp_ts = (0.5,)
    elif arg == "tiny":
        config.tasks = "x_plus_y,x_minus_y,permutation"
        config.num_seeds = 2
        config.data.p = 7
        config.base.num_steps = config.experts.num_steps = 20
        config.dam.num_steps = config.fusion.num_steps = 20
        config.model.dim, config.model.num_heads = 16, 2
        config.train.log_every = 10  # two chunks per part: a resume can start mid-part
        config.fusion.gate_dim = 8
        config.train.batch_size = config.dam.batch_size = 32
        config.grid.lams, config.grid.densities = (0.5, 1.0), (0.5,)
        config.grid.drop_rates, config.grid.slerp_ts = (0.5,), (0.5,)
    elif arg:
        raise ValueError(f"Unknown config variant {arg!r}; known: quick, tiny.")
    return config
