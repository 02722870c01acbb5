"""Merge Hugging Face language-model checkpoints (local folders or .gguf files) into one.

    python main.py --config=configs/lm_merge.py --workdir=runs/m \
        --config.base=BASE_DIR --config.models=DIR_A,DIR_B,DIR_C \
        --config.method=ties --config.density=0.5 --config.lam=1.0

    python main.py --config=configs/lm_merge.py --workdir=runs/dam --config.method=dam \
        --config.models=DIR_A,DIR_B,DIR_C --config.dam.data='a/*.txt;b/*.txt;c/*.txt'

    # A GGUF file to a transformers folder, or a folder to GGUF: one model, averaged alone.
    python main.py --config=configs/lm_merge.py --workdir=runs/convert \
        --config.method=weight_average --config.models=MODEL.gguf --config.output_format=both

    # A rank-16 LoRA adapter (PEFT's layout) of each fine-tune, to <workdir>/lora/<its folder>/:
    python main.py --config=configs/lm_merge.py --workdir=runs/x --mode=extract_lora \
        --config.base=BASE_DIR --config.models=DIR_A --config.lora_rank=16

Writes `<workdir>/merged/` (config.json, safetensors, tokenizer files; loads in transformers and
vLLM; with output_format gguf or both also model.gguf) and `<workdir>/merge_info.json` (method,
hyper-parameters, inputs with sha256 per file). Methods: those of merging.MERGES (streamed tensor
by tensor) and dam. Inputs may be .gguf files (quantized tensors are dequantized to float32, or
config.dtype) or PEFT LoRA adapter folders over config.base.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(
            f"configs/lm_merge.py has no variants, got {arg!r}; set fields with --config.<field>"
        )
    config = ml_collections.ConfigDict()
    config.experiment = "lm_merge"
    # Base checkpoint directory (the task-vector merges, and model_stock and sce, need it).
    config.base = ""
    # Expert checkpoint directories, comma-separated.
    config.models = ""
    # One of weight_average, task_arithmetic, ties, dare, slerp, breadcrumbs, breadcrumbs_ties,
    # della, della_linear, model_stock, sce, multislerp, karcher (merging.MERGES), dam.
    config.method = "ties"
    # weight_average, multislerp: comma-separated weights, one per model ("" = uniform).
    config.weights = ""
    # The task-vector merges: scale of the combined task vector.
    config.lam = 1.0
    # ties, breadcrumbs, della (and dare with combine=ties): fraction of each task vector kept.
    config.density = 0.5
    # breadcrumbs: fraction of the largest task-vector entries dropped as outliers.
    config.gamma = 0.01
    # della: half-width of the keep probabilities around density, by magnitude rank.
    config.epsilon = 0.15
    # sce: fraction of the entries (those varying most across models) kept; 1 = all.
    config.select_topk = 1.0
    # karcher: iterations and tolerance of the Riemannian mean.
    config.max_iter = 10
    config.tol = 1e-5
    # dare: probability of dropping a task-vector entry; combine "linear" or "ties".
    config.drop_rate = 0.5
    config.combine = "linear"
    # slerp: interpolation point between the two models (0 = the first).
    config.t = 0.5
    # Other values of these fields for some tensors, like mergekit's filters: entries
    # FILTER:field=value[,field=value] separated by ';'. A tensor takes the first entry whose
    # FILTER is part of its Hugging Face name (e.g. 'self_attn:t=0.3;mlp:t=0.7' for slerp);
    # a filter must match some tensor.
    config.overrides = ""
    # Inputs whose vocabularies differ by added tokens or padded rows: the output's tokenizer,
    # "base", "union" (the base's, or the first model's, plus the others' added tokens) or the
    # path of one input; each input's embedding rows are matched to it by token. "" = the
    # inputs' vocabularies must be the same.
    config.tokenizer_source = ""
    # --mode=extract_lora: the rank of the LoRA adapter written for each model against base.
    config.lora_rank = 16
    # Seed of DARE's and DELLA's masks and of DAM's batches.
    config.seed = 0
    # Stored dtype of the output ("" = as the inputs; float32, bfloat16, float16).
    config.dtype = ""
    # Largest safetensors shard; more tensors go to further shards with an index.
    config.max_shard_size = "2GB"
    # What <workdir>/merged holds: "safetensors" (config.json, shards, tokenizer files),
    # "gguf" (model.gguf, llama.cpp's format, with the tokenizer in its metadata, beside the
    # tokenizer and config files) or "both".
    config.output_format = "safetensors"
    # The GGUF file's tensor type ("" = as config.dtype, else float32): float32, float16,
    # bfloat16 or q8_0 (8-bit blocks; norms stay float32).
    config.gguf_type = ""

    config.dam = ml_collections.ConfigDict()
    # Each model's own local text: one source per model, separated by ';' (each source is
    # comma-separated files, directories or globs).
    config.dam.data = ""
    # "bytes" (UTF-8 bytes as tokens), "model" (the first model's tokenizer.json) or a path.
    config.dam.tokenizer = "model"
    # Each document with the special tokens transformers' tokenizer adds (Llama's begin-of-
    # sequence token), as the models saw text in training; False: the text's own tokens only.
    config.dam.special_tokens = True
    # Tokens per training window.
    config.dam.seq_len = 256
    # Windows per model per step.
    config.dam.batch_size = 4
    # Local devices each step's windows are split over (data parallelism, each device holding
    # the K models); 0 = all. dam.batch_size must divide by their count: on an 8-core TPU set
    # num_devices=4 or batch_size=8 (refused at start otherwise, before any work).
    config.dam.num_devices = 0
    # The device mesh: "auto" (data parallelism over num_devices) or axis sizes such as
    # "data:2,model:4", which also split the K models' kernels over 4 devices (fusion_jax/mesh.py:
    # RULES). dam.batch_size must divide by the data axis.
    config.dam.mesh = "auto"
    # Coefficient updates; 0 = one epoch over the largest model's text (as the DAM repository).
    config.dam.num_steps = 0
    config.dam.learning_rate = 1e-3
    # KL temperature T (loss = sum_k T^2 KL(expert_k || merged) on expert k's text).
    config.dam.temperature = 2.0
    # Cosine-similarity regulariser: "per_layer" (the DAM repository's) or "whole_model".
    config.dam.similarity = "per_layer"
    config.dam.similarity_weight = 0.01
    # Sums of L1 / L2 norms of the coefficient vectors (off by default, as in DAM).
    config.dam.l1_weight = 0.0
    config.dam.l2_weight = 0.0
    # f in W = sum_k f(c_k) W_k: tanh, sigmoid, relu or none.
    config.dam.nonlinearity = "tanh"
    # Coefficient groups that train: linear, embedding, norm (DAM: linear only).
    config.dam.train = "linear"
    # Activations' dtype in the forward passes (float32 or bfloat16).
    config.dam.compute_dtype = "float32"
    # Matmul precision (jax.default_matmul_precision): "highest" computes float32 as transformers
    # does; "default" lets a TPU take one bfloat16 pass (and a GPU TF32) for speed.
    config.dam.matmul_precision = "highest"
    config.dam.log_every = 10
    config.dam.checkpoint_every = 100
    return config
