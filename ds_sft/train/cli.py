"""Fine-tune a LLaMA-style model on a prepared data directory with the DeepSpeed engine.

The same command runs in one process (``ds-sft train ...``) or several
(``deepspeed --num_gpus 2 -m ds_sft.train ...``, ``torchrun --nproc_per_node 2 -m ds_sft.train ...``,
Slurm: see launch/). Settings layer as built-in defaults <- --deepspeed_config JSON <- flags; the
flags below left unset take the JSON's value (printed as an override when a flag changes it).

    ds-sft prepare --base_model smollm2-135m-instruct --output_dir data_sft   # the model's tokenizer
    ds-sft train --data_dir data_sft --base_model smollm2-135m-instruct \\
        --deepspeed_config ds_configs/zero2.json --micro_batch_size 2 --grad_accum 2 --max_iters 10

Writes OUT_DIR/effective_config.json, checkpoints/, metrics.jsonl, final/ (fp32 safetensors +
tokenizer, for `ds-sft export` / `ds-sft eval`), report.md and plots.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from ds_sft.errors import UserError, several_ranks
from ds_sft.options import Ignored, Int, StoreOnce, refuse_ignored
from ds_sft.run_layout import EFFECTIVE_CONFIG
from ds_sft.safe_write import writable_dir, write_result_file
from ds_sft.train.config_keys import DEFAULT_CONFIG, OPTIONS, ROWS_PER_STEP
from ds_sft.train.run_dir import check_inputs_outside

# SIGTERM and SIGHUP keep their default outside the training loop, which catches them between steps
# itself (save a checkpoint, then stop): a rank waiting in its rendezvous or a collective is in C code,
# where a Python handler never runs, and a SIGTERM (torchrun's, Slurm's, kill's) must end it there.
UNWINDS_ON_SIGTERM = False
# the output a refusal that names no file is about (command.execute): where a full disk ran out
OUTPUT_FLAG = "out_dir"
# When a step runs out of memory (ds_sft.command.execute says so in one line): what needs less of it
OUT_OF_MEMORY_FIXES = (
    "pass a smaller --micro_batch_size (a larger --grad_accum keeps the global batch), add "
    "--activation_checkpointing, or spread the weights and optimizer state over the GPUs with "
    "--zero_stage 3; --resume continues from the last checkpoint"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def flag(group, name, help, **kwargs):
        """A setting of OPTIONS: its domain checks the value (one line, exit 2), unset means "not given"."""
        default, domain = OPTIONS[name.lstrip("-")]
        suffix = "" if default is None else f" (default: {default})"
        if kwargs.get("action") in (None, StoreOnce):  # a value: a setting, or an input given once
            kwargs["type"] = domain
            if hasattr(domain, "values"):
                kwargs["metavar"] = "{" + ",".join(map(str, domain.values)) + "}"
        group.add_argument(name, default=None, help=help + suffix, **kwargs)

    io = parser.add_argument_group("data, model and output")
    flag(io, "--data_dir", "prepared data directory (written by `ds-sft prepare`)", action=StoreOnce)
    flag(
        io,
        "--base_model",
        "weights to start from: a checkpoint file or directory, GGUF, a Hugging Face id "
        "(owner/name[@revision], e.g. Qwen/Qwen3-0.6B), or an alias such as smollm2-135m-instruct",
        action=StoreOnce,
    )
    flag(io, "--model", "random init from a preset instead (tiny, 112m, smollm2-135m)", action=StoreOnce)
    flag(io, "--out_dir", "run directory for checkpoints, metrics, final weights and the report")
    flag(
        io,
        "--fp8",
        "fp8 matmuls for the projections: auto (fp8 where the GPU has fp8 tensor cores and the GEMM "
        "is large enough to gain), torch (torch._scaled_mm; a quantize-dequantize emulation elsewhere), "
        'te (Transformer Engine) or off; the JSON\'s "fp8" section is the recipe',
    )
    flag(
        io,
        "--kernels",
        "RMSNorm and loss kernels: auto (Triton on CUDA, chunked PyTorch elsewhere), triton, torch "
        "(chunked, never holds the full logits) or eager (the reference)",
    )
    flag(io, "--compile", "torch.compile the engine's module", action="store_const", const=True)
    flag(
        io,
        "--activation_checkpointing",
        "recompute each block in backward to save activation memory",
        action="store_const",
        const=True,
    )

    eng = parser.add_argument_group("engine")
    eng.add_argument(
        "--deepspeed_config",
        action=StoreOnce,
        default=None,
        help=f"DeepSpeed JSON (default: ds_configs/{DEFAULT_CONFIG}, the seed recipe; see ds_configs/ "
        "for zero0-3, offload and bf16)",
    )
    flag(eng, "--zero_stage", "ZeRO stage 0-3 (zero_optimization.stage)")
    flag(
        eng,
        "--precision",
        "bf16, fp32, or auto: bf16 where the hardware computes in it (CUDA with bf16, a CPU with "
        "avx512_bf16 or AMX), else fp32 (bf16.enabled)",
    )
    flag(eng, "--micro_batch_size", "rows per rank per micro-step (train_micro_batch_size_per_gpu)")
    flag(
        eng,
        "--grad_accum",
        "micro-steps per optimizer step (gradient_accumulation_steps); default: the JSON's "
        f"train_batch_size (the recipe: {ROWS_PER_STEP} rows per step over all ranks) / (micro x ranks)",
    )
    flag(
        eng,
        "--dist_timeout",
        "seconds a collective waits for the other ranks before the run fails: a dead or frozen rank "
        "then stops the job instead of hanging it",
    )
    eng.add_argument(
        "--local_rank",
        type=Int(0, 2**16),
        default=None,
        help="set by the deepspeed launcher; the LOCAL_RANK environment variable is what is used",
    )

    opt = parser.add_argument_group("optimization")
    flag(opt, "--learning_rate", "peak AdamW learning rate (optimizer.params.lr)")
    flag(opt, "--min_lr", "learning rate at the last step, after the cosine decay")
    flag(opt, "--warmup_iters", "steps of linear warmup to the peak")
    flag(opt, "--max_iters", "optimizer steps in the run")
    flag(opt, "--weight_decay", "AdamW decay on the q/k/v/o and gate/up/down weights (others: 0)")
    flag(opt, "--grad_clip", "clip the global gradient norm to this (gradient_clipping; 0 = off)")
    flag(opt, "--seed", "seed for the model init and the data order")

    ev = parser.add_argument_group("evaluation, logging and alarms")
    flag(ev, "--eval_interval", "evaluate every N steps (and at the last step)")
    flag(ev, "--eval_iters", "val sample of eval_iters x micro_batch_size rows (stratified; any world size)")
    flag(ev, "--log_interval", "print a log line every N steps")
    # command line and environment only: a shared DeepSpeed JSON does not choose (config.DESTINATION_FLAGS)
    flag(
        ev, "--wandb_project", "wandb project name (default: $WANDB_PROJECT, else ds-sft; not from the JSON)"
    )
    flag(
        ev,
        "--wandb_mode",
        "offline, online or disabled (default: $WANDB_MODE, else online when "
        "WANDB_API_KEY is set, else offline; not from the JSON)",
    )
    flag(ev, "--alarm_rising_evals", "warn when val loss rises for this many evals in a row")
    flag(ev, "--alarm_gap", "warn when val loss exceeds the recent train loss by more than this")
    flag(
        ev,
        "--max_nan_steps",
        "stop after this many steps in a row whose loss or gradients are not finite (each is skipped)",
    )

    ck = parser.add_argument_group("checkpoints")
    flag(ck, "--save_interval", "save a checkpoint every N steps (and at the end, and on SIGTERM)")
    flag(ck, "--keep_last", "keep this many recent checkpoints (plus the best)")
    ck.add_argument(
        "--resume",
        type=OPTIONS["resume"][1],
        nargs="?",
        const="auto",
        default=None,
        help="continue a run: alone, from OUT_DIR/checkpoints/latest (a fresh start when OUT_DIR holds "
        "no run yet; refused when it holds one without a checkpoint); or from the given checkpoint "
        "directory (one of another folder only into an OUT_DIR that holds no run)",
    )
    flag(
        ck,
        "--allow_change",
        "with --resume: continue although these keys of the run differ from the checkpoint's (repeat the "
        "flag or separate by commas; keys: " + ", ".join(OPTIONS["allow_change"][1].values) + "); the run "
        "goes on from the same step and data position, prints each change and records it in its report. "
        "A new world size, or micro-batch at the same global batch, needs no flag: it resumes exactly",
        action="extend",
        type=OPTIONS["allow_change"][1],
        metavar="KEY[,KEY]",
    )
    ck.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in OUT_DIR (its checkpoints, final/, metrics.jsonl, report and plots "
        "are removed; other files are kept, and anything else inside what it removes is refused); "
        "without it or --resume, a run directory that holds a run is refused",
    )
    parser.add_argument(
        "--check_flags",
        action="store_true",
        help="read the flags, check each one's value against its domain, and exit without training: what "
        "the launch scripts run before they start any rank, so a mistyped flag stops there in one line, "
        "not on every node (the checks that need the ranks' environment, the data or the JSON run there)",
    )
    refuse_ignored(
        parser,
        Ignored(
            "--wandb_project",
            lambda args: args.wandb_mode == "disabled",
            "with --wandb_mode disabled, which starts no wandb run: drop one of the two",
        ),
    )


def build_model(s, tokens_per_micro_batch: int | None = None):
    """The model on CPU in fp32 (the engine moves and casts it), fp8 layers swapped in if asked
    (``tokens_per_micro_batch``: the GEMM height that fp8 ``select: "auto"`` weighs)."""
    import torch

    from ds_sft.model.checkpoint import load_model
    from ds_sft.model.config import ModelConfig
    from ds_sft.model.llama import LlamaModel

    torch.manual_seed(s.seed)  # every rank builds identical weights
    if s.base_model is not None:
        model = load_model(s.base_model, config_overrides={"kernels": s.kernels})
    else:
        model = LlamaModel(ModelConfig.preset(s.model, kernels=s.kernels))
    model.config.activation_checkpointing = bool(s.activation_checkpointing)
    if s.fp8 != "off":
        import torch.distributed as dist

        from ds_sft.model.fp8 import Fp8Recipe, apply_fp8

        recipe = Fp8Recipe.from_dict(s.fp8_recipe) if s.fp8_recipe else None
        quiet = dist.is_initialized() and dist.get_rank() != 0
        say = (lambda line: None) if quiet else print  # what auto resolved to, which layers run in fp8
        apply_fp8(model, s.fp8, recipe, tokens=tokens_per_micro_batch, say=say)
    return model


def make_sampler(dataset, seed: int):
    import torch.distributed as dist

    from ds_sft.data.sampler import ResumableSampler

    return ResumableSampler(len(dataset), seed=seed, rank=dist.get_rank(), world_size=dist.get_world_size())


def run(args: argparse.Namespace) -> int:
    from ds_sft.train import config as config_module
    from ds_sft.train.distributed import launch_environment, use_slurm_environment
    from ds_sft.train.preflight import check_run

    if args.check_flags:  # the launch node: the ranks' environment (world size, devices) is not here yet
        return 0
    use_slurm_environment()  # srun without torchrun: WORLD_SIZE & co. before the config checks read them
    ds_config, s, overrides = config_module.resolve(args)  # every check before anything heavy
    run_dir = writable_dir(s.out_dir, "--out_dir")
    check_inputs_outside(run_dir, s)
    if s.resume is not None and args.overwrite:
        raise UserError(
            "--resume continues the run in --out_dir and --overwrite replaces it: pass one of them"
        )
    if s.allow_change and s.resume is None:  # a fresh run has nothing to change: the user meant a resume
        raise UserError(
            f"--allow_change {','.join(s.allow_change)} lets a resume change its settings, but this run "
            "starts fresh: add --resume (or drop --allow_change)"
        )

    # the data, the model's files and the batch, before the process group and the weights load
    train_set, val_set, notes, checked_config = check_run(s, launch_environment()[1])

    import torch.distributed as dist

    from ds_sft.train import compatibility
    from ds_sft.train.checkpoint_check import find_checkpoint
    from ds_sft.train.distributed import collective_device, on_rank_zero, process_group
    from ds_sft.train.final import read_tokenizer, save_final
    from ds_sft.train.loop import train
    from ds_sft.train.memory import check_fits
    from ds_sft.train.report import write_report
    from ds_sft.train.run_dir import claim_run_dir

    with process_group(timeout_s=s.dist_timeout) as (rank, world):
        run_lock = claim_run_dir(run_dir, s.resume, args.overwrite)  # before any work, on every rank
        effective = config_module.effective_config(ds_config, s)
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            for line in overrides:
                print(line)
            print("effective config:\n" + json.dumps(effective, indent=2))
            write_result_file(run_dir / EFFECTIVE_CONFIG, json.dumps(effective, indent=2) + "\n")
            for note in notes:
                print(note)
        dist.barrier()

        # an intact checkpoint, in the claimed folder: found before any weights load
        checkpoint = find_checkpoint(s.resume, run_dir)
        # read by rank 0, which writes final/; a file it cannot read stops every rank
        tokenizer = on_rank_zero(lambda: read_tokenizer(train_set.tokenizer_dir), collective_device()) or {}
        model = build_model(s, tokens_per_micro_batch=s.micro_batch_size * train_set.seq_len)
        if checked_config is None:  # the files did not say the model's config: the built model's
            compatibility.check_fresh(s, model, train_set)
        check_fits(model, train_set.seq_len, s.micro_batch_size, s.precision == "bf16")
        sampler = make_sampler(train_set, s.seed)
        summary = train(s, ds_config, model, train_set, val_set, run_dir, sampler, checkpoint)
        engine = summary["engine"]
        if summary["status"] == "finished":
            save_final(engine, run_dir, tokenizer, train_set.manifest, summary["step"])
        if rank == 0:
            print(f"report: {write_report(run_dir, effective, summary)}")
        engine.destroy()
        run_lock.release()
        # stopped by a signal: its checkpoint is saved, but the run did not finish (`train && eval` must
        # not go on), so 128 + the signal, as a shell reports a process the signal ended
        code = 128 + summary["stop_signal"] if summary["status"] == "preempted" else 0
        if code and rank == 0:
            name = signal.Signals(summary["stop_signal"]).name
            print(f"stopped by {name} at step {summary['step']}: continue with --resume", file=sys.stderr)
        if world > 1:
            shutdown_multiprocess(code)
    return code


def leave_rank(code) -> None:
    """End this process with ``code``. A rank of several that ends in an error (its one line printed,
    or told to stop by rank 0) leaves by :func:`_exit_without_teardown`: else SIGABRT in the teardown
    replaced the exit code the launcher and Slurm go by."""
    if isinstance(code, int) and several_ranks():
        _exit_without_teardown(code)
    sys.exit(code)


def shutdown_multiprocess(code: int = 0) -> None:
    """A rank of several at the end of its run: every rank is past the last barrier, its part of the last
    checkpoint written, before any exits with ``code`` (``srun --kill-on-bad-exit`` ends the others when
    one exits non-zero); then the process group goes and the rank leaves by :func:`_exit_without_teardown`."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    _exit_without_teardown(code)


def _exit_without_teardown(code: int) -> None:
    """Flush the output and ``os._exit(code)``: with several ranks, DeepSpeed 0.19.8 on CPU sometimes
    aborts in the interpreter's teardown ("terminate called without an active exception") after the
    work is done; leaving this way after the process group is gone made 16/16 runs exit 0
    (shared/FACTS.md)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
