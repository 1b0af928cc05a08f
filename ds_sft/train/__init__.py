"""``ds-sft train``: the DeepSpeed engine around a :class:`ds_sft.model.llama.LlamaModel`.

The engine does what it is built for (ZeRO partitioning, gradient accumulation, clipping, the
optimizer step, checkpoints); ds-sft owns what DeepSpeed cannot know: the token-normalized loss,
the learning-rate schedule, which parameters get weight decay, evaluation per source, and resume.

    config.py         defaults <- DeepSpeed JSON <- CLI flags: the one effective config of a run
    config_keys.py    its keys as data: each flag's default and domain, DeepSpeed's keys ds-sft
                      knows, refuses, pins or keeps from writing outside the run folder
    config_checks.py  every check of it, before anything heavy is loaded (DeepSpeed's reader too)
    memory.py         will a micro-batch fit? checked before anything is allocated
    preflight.py      what the flags and files alone refuse, before the group, the weights and the engine
    run_dir.py        the run directory: ds-sft's own, apart from its inputs, one writer, --overwrite
    compatibility.py  refuse a data/model/checkpoint mix that does not belong together
    distributed.py    the process group (torchrun, deepspeed, Slurm), its collectives, the preemption flag
    build_lock.py     DeepSpeed's JIT builds of its ops, in turns: a lock a killed build left is cleared
    param_groups.py   which parameters AdamW decays, and the table that shows it
    schedule.py       the learning rate at every step (warmup, cosine to min_lr)
    engine.py         deepspeed.initialize with those groups, then ds-sft's changes to the engine: the
                      bf16 wrapper's AdamW step at construction undone; at ZeRO 1/2 overflow found by
                      the gradient norm, computed in one pass; at ZeRO 2 one reduction per update; at
                      ZeRO 3 the LM-head registration
    step.py           one optimizer step: the token-normalized loss over micro-batches and ranks
    resume.py         where a run starts: a fresh state, or a checkpoint loaded into engine and sampler
    state_transfer.py resume into another ZeRO stage or precision: the state carried by parameter name
    loop.py           the run: each step's bookkeeping, evaluation, preemption, saves
    trainer_state.py  trainer_state.json: each field once (a fresh run's value, the check a saved one passes)
    checkpointing.py  save a checkpoint tag (every rank, then rank 0 publishes), replace, prune
    checkpoint_check.py is a tag intact and free of pickled code? which tag --resume takes
    checkpoint_load.py  load a tag into the engine: weights-only unpickling, universal format, NaN check
    final.py          RUN/final/: the consolidated fp32 weights and the run's tokenizer
    metrics.py        FLOPs per token, peak FLOP/s, the metrics.jsonl + wandb sink
    run_log.py        each step's record (tokens/s, MFU, ETA), the console lines, alarms
    report.py         report.md and PNG plots
    cli.py            the command (``ds-sft train`` and ``python -m ds_sft.train``)
"""
