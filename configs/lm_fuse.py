"""Dynamic fusion of Hugging Face language models (local directories) on local text.

    python main.py --config=configs/lm_fuse.py --workdir=runs/f \
        --config.models=DIR_A,DIR_B --config.data.sources='texts/**/*.txt'
    python main.py --config=configs/lm_fuse.py --workdir=runs/f --mode=generate \
        --config.generate.prompt='Once upon a time'   # the model comes from the workdir

The experts (same architecture and tokenizer) run as one vmapped module; a gated fusion
attention layer weighs their final hidden states per token and a fusion head (initialised as the
mean of the experts' heads) predicts the next token. Only the gate and head train unless
`--config.train.end_to_end=True`.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(
            f"configs/lm_fuse.py has no variants, got {arg!r}; set fields with --config.<field>"
        )
    config = ml_collections.ConfigDict()
    config.experiment = "lm_fuse"
    # Expert checkpoint directories, comma-separated (at least 2).
    config.models = ""
    config.seed = 0
    # Activations' dtype (float32 or bfloat16).
    config.compute_dtype = "float32"
    # Matmul precision (jax.default_matmul_precision): "highest" computes float32 as transformers
    # does; "default" lets a TPU take one bfloat16 pass (and a GPU TF32) for speed.
    config.matmul_precision = "highest"

    config.data = ml_collections.ConfigDict()
    # Training text: comma-separated files, directories or globs.
    config.data.sources = ""
    # "" (a file is a document) or "%" (fortune files: records separated by % lines).
    config.data.record_separator = ""
    # "model" (the first expert's tokenizer.json), "bytes", or a tokenizer.json path.
    config.data.tokenizer = "model"
    # Each document with the special tokens transformers' tokenizer adds (Llama's begin-of-
    # sequence token), as the experts saw text in training; False: the text's own tokens only.
    config.data.special_tokens = True
    # Tokens per training window.
    config.data.seq_len = 256
    # Fraction of documents held out for validation (split fixed by config.seed).
    config.data.val_fraction = 0.1

    config.fusion = ml_collections.ConfigDict()
    # Width of the gate's query/key space.
    config.fusion.gate_dim = 64
    # Softmax temperature over experts; top_k > 0 keeps only the k best experts per token.
    config.fusion.temperature = 1.0
    config.fusion.top_k = 0
    # Switch-style balance loss and gate-entropy weights (0 = off).
    config.fusion.balance_weight = 0.0
    config.fusion.entropy_weight = 0.0

    config.train = ml_collections.ConfigDict()
    # Train the experts too (and checkpoint them); False trains the gate and head only.
    config.train.end_to_end = False
    config.train.num_steps = 1000
    # Windows per step.
    config.train.batch_size = 8
    # Local devices the batch is split over (data parallelism, each device holding the whole
    # model); 0 = all, e.g. the 8 cores of a Colab TPU. batch_size must divide by it.
    config.train.num_devices = 0
    # The device mesh: "auto" (data parallelism over num_devices) or axis sizes such as
    # "data:2,model:4", which also split each expert's kernels over 4 devices (fusion_jax/mesh.py:
    # RULES) for experts that do not fit on one. batch_size must divide by the data axis.
    config.train.mesh = "auto"
    config.train.learning_rate = 1e-3
    config.train.weight_decay = 0.0
    config.train.log_every = 50
    config.train.checkpoint_every = 200
    # Stop at start-up if JAX finds only the CPU (e.g. a Colab runtime without its GPU or TPU).
    config.train.require_accelerator = False

    config.generate = ml_collections.ConfigDict()
    config.generate.prompt = ""
    config.generate.max_new_tokens = 64
    # 0 = greedy; otherwise sample from softmax(logits / temperature).
    config.generate.temperature = 0.0
    config.generate.seed = 0
    return config
