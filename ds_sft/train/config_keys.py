"""The keys of a ``ds-sft train`` config, as data: each flag's default and domain, where DeepSpeed
keeps it, and what ds-sft does with DeepSpeed's own keys (known, refused, pinned to one value, the
ones that make DeepSpeed write files).

:mod:`ds_sft.train.config` merges by these tables and :mod:`ds_sft.train.config_checks` checks by
them: a new flag, or a DeepSpeed key ds-sft must refuse, is one row here.
"""

from __future__ import annotations

from ds_sft.model.config import KERNEL_BACKENDS
from ds_sft.options import INT32_MAX, INT64_MAX, SEED, Bool, Choice, Float, Int, Names, Pair, Text
from ds_sft.train.compatibility import IDENTITY_KEYS
from ds_sft.train.metrics import WANDB_MODES, WANDB_PROJECT_NAME

# Every `ds-sft train` setting: (built-in default, domain). The defaults are the seed recipe: AdamW 7e-5
# betas 0.9/0.95, wd 0.05 on linear weights, clip 1.0, warmup 10, cosine to 1e-5, micro-batch 16 and
# ROWS_PER_STEP rows per optimizer step, ZeRO-2, bf16 where the hardware has it, fp8 where it pays.
# The domain checks a flag (as argparse's type=) and a JSON value alike (see ds_sft/options.py).
OPTIONS: dict[str, tuple] = {
    "data_dir": (None, Text()),
    "base_model": (None, Text()),
    "model": (None, Text()),
    "out_dir": ("runs/train", Text()),
    "fp8": ("auto", Choice("off", "auto", "torch", "te")),
    "kernels": ("auto", Choice(*KERNEL_BACKENDS)),
    "compile": (False, Bool()),
    "activation_checkpointing": (False, Bool()),
    "zero_stage": (2, Int(0, 3)),
    "precision": ("auto", Choice("auto", "bf16", "fp32")),
    "micro_batch_size": (16, Int(1, 2**16)),
    "grad_accum": (None, Int(1, 2**16)),  # None: ROWS_PER_STEP / (micro x ranks)
    "learning_rate": (7e-5, Float(0, 10, min_open=True)),
    "min_lr": (1e-5, Float(0, 10)),
    "warmup_iters": (10, Int(0, INT32_MAX)),
    "max_iters": (100, Int(1, INT32_MAX)),
    "weight_decay": (0.05, Float(0, 10)),
    "grad_clip": (1.0, Float(0, 1e6)),
    "seed": (1337, SEED),
    "dist_timeout": (600, Int(1, 7 * 24 * 3600)),  # a week; timedelta(seconds=1e20) overflows
    "eval_interval": (10, Int(1, INT32_MAX)),
    "eval_iters": (8, Int(1, INT32_MAX)),
    "log_interval": (1, Int(1, INT32_MAX)),
    "save_interval": (50, Int(1, INT32_MAX)),
    "keep_last": (2, Int(1, 10**6)),
    "resume": (None, Text()),
    "allow_change": (None, Names(*IDENTITY_KEYS)),  # run identity keys a resume may change
    "wandb_project": (None, WANDB_PROJECT_NAME),
    "wandb_mode": (None, Choice(*WANDB_MODES)),
    "alarm_rising_evals": (3, Int(1, INT32_MAX)),
    "alarm_gap": (0.5, Float(0, 1e6)),
    "max_nan_steps": (5, Int(1, INT32_MAX)),
}
DEFAULTS: dict = {flag: default for flag, (default, _) in OPTIONS.items()}
DOMAINS = {flag: domain for flag, (_, domain) in OPTIONS.items()}

# The recipe's AdamW moments, for an optimizer section that leaves them out. Filled, not left to torch's
# defaults (betas 0.9, 0.999): every other setting a DeepSpeed JSON leaves out is the recipe's (lr and
# weight_decay come from OPTIONS), so a section written to change the lr meant the recipe with another lr,
# not a second-moment horizon 20x as long. Not refused either: a short section is a valid DeepSpeed one.
RECIPE_ADAM_PARAMS = {"betas": [0.9, 0.95], "eps": 1e-8}

# The recipe's global batch: rows per optimizer step over all ranks together. Accumulation is
# derived from it (ROWS_PER_STEP / (micro x ranks)) unless --grad_accum or the JSON sets it.
ROWS_PER_STEP = 256
DEFAULT_CONFIG = "sft_recipe.json"  # in ds_configs/ (package data: found without a checkout)

# Numbers DeepSpeed and torch take from the JSON as they are: their domains, so that a bad value is
# one line now instead of a traceback after the model is loaded. Bucket sizes are elements; 2**36 is
# 256 GiB of fp32, beyond any device. Any other number anywhere in the JSON must at least be finite
# and fit an int64; the other ZeRO keys get the bounds of DeepSpeed's own pydantic model (zero_domains).
BUCKET = Int(1, 2**36)
DS_DOMAINS: dict[tuple[str, ...], object] = {
    ("train_batch_size",): Int(1, INT32_MAX),
    ("steps_per_print",): Int(1, INT64_MAX),
    ("gradient_predivide_factor",): Float(0, 1e6, min_open=True),
    ("optimizer", "params", "eps"): Float(0, 1, min_open=True),
    ("optimizer", "params", "betas"): Pair(Float(0, 1, max_open=True)),
    # ZeRO 1-2 cut buckets at fp16 pairs: an odd size was an AssertionError once the model had loaded
    ("zero_optimization", "reduce_bucket_size"): Int(2, 2**36, multiple=2),
    ("zero_optimization", "allgather_bucket_size"): Int(2, 2**36, multiple=2),
    ("zero_optimization", "sub_group_size"): BUCKET,
    ("zero_optimization", "stage3_prefetch_bucket_size"): Int(0, 2**36),
    ("zero_optimization", "prefetch_bucket_size"): Int(0, 2**36),
    ("zero_optimization", "zero_hpz_partition_size"): Int(1, 2**16),
}

# flag -> its place in the DeepSpeed JSON.
FLAG_TO_DS_KEY: dict[str, tuple[str, ...]] = {
    "micro_batch_size": ("train_micro_batch_size_per_gpu",),
    "grad_accum": ("gradient_accumulation_steps",),
    "grad_clip": ("gradient_clipping",),
    "learning_rate": ("optimizer", "params", "lr"),
    "weight_decay": ("optimizer", "params", "weight_decay"),
    "zero_stage": ("zero_optimization", "stage"),
    "precision": ("bf16", "enabled"),  # "bf16" <-> true
}

# "run" is where the run that wrote an effective_config.json read and wrote, and sent its metrics (its
# COMMAND_LINE_FLAGS): a record, never applied when the file is passed back.
OWN_SECTIONS = ("ds_sft", "fp8", "run")
SECTIONS = ("optimizer", "zero_optimization", "bf16", "fp16", *OWN_SECTIONS)  # must be JSON objects

# The flags that name what a run reads and where it writes come from the command line only. A DeepSpeed
# JSON is a recipe, shared between runs and people: one that chose the run folder or the resume point
# would send a run into someone else's folder (or resume it from there) without a word on the command
# line, so the "ds_sft" section refuses them.
PATH_FLAGS = ("data_dir", "base_model", "out_dir", "resume")
# Where a run's metrics go is the user's choice too: a recipe that set these decided whether the run's
# config, paths and metrics leave the machine, and to which wandb project, over the user's $WANDB_MODE.
# They come from the command line, else the environment ($WANDB_MODE, $WANDB_PROJECT; metrics.py).
DESTINATION_FLAGS = ("wandb_mode", "wandb_project")
COMMAND_LINE_FLAGS = (*PATH_FLAGS, *DESTINATION_FLAGS)

# DeepSpeed keys that name a place DeepSpeed itself writes (read from DeepSpeed 0.19.8's
# monitor/config.py, profiling/config.py, autotuning/config.py, runtime/zero/offload_config.py and
# runtime/data_pipeline/constants.py; comms_logger and dump_state only print, and nebula is refused by
# DeepSpeed itself). They are refused, not redirected into the run folder: the run folder holds only
# files ds-sft writes and knows, so --overwrite and resume account for every one, and rewriting a path
# the recipe named would silently change what it asked for. ds-sft records what the monitors would
# (metrics.jsonl, report.md, --wandb_project). NVMe offload's swap folder is emptied by DeepSpeed
# (shutil.rmtree in runtime/swap_tensor), so it may not point anywhere at all.
DS_WRITER_PATHS: dict[tuple[str, ...], str] = {
    ("flops_profiler", "output_file"): "leave it out: the profile is printed to the log",
    ("tensorboard", "output_path"): "ds-sft logs to metrics.jsonl and --wandb_project",
    ("csv_monitor", "output_path"): "ds-sft logs to metrics.jsonl",
    ("autotuning", "results_dir"): "ds-sft does not run DeepSpeed's autotuner",
    ("autotuning", "exps_dir"): "ds-sft does not run DeepSpeed's autotuner",
    ("autotuning", "metric_path"): "ds-sft does not run DeepSpeed's autotuner",
    ("autotuning", "model_info_path"): "ds-sft does not run DeepSpeed's autotuner",
    ("zero_optimization", "offload_optimizer", "nvme_path"): "DeepSpeed empties its swap folder there",
    ("zero_optimization", "offload_param", "nvme_path"): "DeepSpeed empties its swap folder there",
    ("data_efficiency", "data_sampling", "curriculum_learning", "data_cluster_path"): (
        "ds-sft batches its own data; DeepSpeed's sampler is not used"
    ),
}
# DeepSpeed writers that, enabled without a path, write into the working directory (wandb and comet
# through their own clients).
DS_WRITERS = {
    "tensorboard": "ds-sft logs to metrics.jsonl and --wandb_project",
    "csv_monitor": "ds-sft logs to metrics.jsonl",
    "wandb": "use --wandb_project (ds-sft's own wandb run)",
    "comet": "ds-sft logs to metrics.jsonl and --wandb_project",
    "autotuning": "ds-sft does not run DeepSpeed's autotuner",
}

# DeepSpeed keys that pass DeepSpeed's config reader yet conflict with what ds-sft sets, or that ds-sft's
# loop never drives (so a recipe would believe they act): path -> why, for the one-line refusal. Each was
# a traceback in deepspeed.initialize after the model had loaded, or a silent change of the run. A key
# counts as set unless it is null, false, {} or a section with "enabled": false (:func:`is_set`).
REFUSED_DS_KEYS: dict[tuple[str, ...], str] = {
    ("optimizer", "params", "foreach"): "ds-sft steps torch's fused AdamW, which torch refuses with foreach",
    ("optimizer", "params", "maximize"): "AdamW would ascend the loss ds-sft trains down",
    ("prescale_gradients",): "DeepSpeed's ZeRO reduce-scatter refuses it, once the model has loaded",
    ("checkpoint", "writer"): (
        "ds-sft hashes a checkpoint's files as soon as save_checkpoint returns, before a decoupled writer "
        "has written them"
    ),
    ("data_types", "grad_accum_dtype"): "--precision and ZeRO choose the gradient dtype, not the recipe",
    ("data_efficiency",): "ds-sft batches its own data; DeepSpeed's sampler and random-LTD never run",
    ("hybrid_engine",): "ds-sft has no generation loop for DeepSpeed's RLHF hybrid engine to drive",
    ("activation_checkpointing",): (
        "it configures deepspeed.checkpointing, which the model never calls; pass --activation_checkpointing "
        "(the model's layers then recompute through torch.utils.checkpoint)"
    ),
    ("dataloader_drop_last",): (
        "DeepSpeed's dataloader is not used: ds-sft reads every step's rows from one stream that runs on "
        "across epochs, so no batch is ever short and there is nothing to drop"
    ),
    ("compile",): (
        "it configures DeepSpeed's engine.compile, which runs only with --compile and then as torch.compile "
        "of the model; pass --compile"
    ),
    ("pipeline",): (
        "ds-sft has no pipeline parallelism: DeepSpeed reads this section only for a PipelineModule's "
        "engine, and every rank here holds the whole model (ZeRO shards it; --zero_stage 3)"
    ),
}

# DeepSpeed keys whose other values break an assumption of ds-sft's own loop: path -> (the one value ds-sft
# runs with, why). step.train_step backpropagates loss_sum x ranks / tokens because DeepSpeed *averages*
# the gradients over ranks; any other reduction leaves a gradient that is not the token-weighted mean over
# the global batch, and clipping then acts on the wrong norm. (gradient_predivide_factor is not here:
# DeepSpeed divides by it before the reduction and multiplies it back after, so the mean stays a mean.)
PINNED_DS_VALUES: dict[tuple[str, ...], tuple[object, str]] = {
    ("gradient_allreduce_op",): (
        "mean",
        "ds-sft's loss is a token-weighted mean over the global batch, which needs DeepSpeed to average the "
        "gradients over ranks; any other op scales every gradient by the number of ranks",
    ),
}

# ZeRO++'s quantized communication (DeepSpeed's zero/config.py): CUDA kernels only.
ZERO_PLUS_PLUS_QUANTIZED = (
    "zero_quantized_weights",
    "zero_quantized_nontrainable_weights",
    "zero_quantized_gradients",
)

# DeepSpeed's top-level keys (deepspeed/runtime/constants.py and the config docs) that a run may set.
KNOWN_DS_KEYS = {
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "optimizer",
    "scheduler",
    "fp16",
    "bf16",
    "amp",
    "torch_autocast",
    "gradient_clipping",
    "prescale_gradients",
    "gradient_predivide_factor",
    "sparse_gradients",
    "zero_optimization",
    "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer",
    "steps_per_print",
    "wall_clock_breakdown",
    "dump_state",
    "memory_breakdown",
    "flops_profiler",
    "activation_checkpointing",
    "aio",
    "tensorboard",
    "wandb",
    "csv_monitor",
    "comet",
    "comms_logger",
    "elasticity",
    "data_efficiency",
    "curriculum_learning",
    "communication_data_type",
    "seq_parallel_communication_data_type",
    "checkpoint",
    "data_types",
    "compression_training",
    "autotuning",
    "pipeline",
    "compile",
    "timers",
    "nebula",
    "disable_allgather",
    "dataloader_drop_last",
    "eigenvalue",
    "progressive_layer_drop",
    "sparse_attention",
    "hybrid_engine",
    "use_data_before_expert_parallelism",
    "graph_harvesting",
    "gradient_allreduce_op",
    "disable_python_gc",
}
KNOWN_OPTIMIZER_KEYS = {"type", "params"}
SUPPORTED_OPTIMIZERS = {"adamw", "adam"}
