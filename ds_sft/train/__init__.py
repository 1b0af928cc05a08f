"""``ds-sft train``: the DeepSpeed engine around a :class:`ds_sft.model.llama.LlamaModel`.

The engine does what it is built for (ZeRO partitioning, gradient accumulation, clipping, the
optimizer step, checkpoints); ds-sft owns what DeepSpeed cannot know: the token-normalized loss,
the learning-rate schedule, which parameters get weight decay, evaluation per source, and resume.

    config.py         DeepSpeed JSON <- CLI flags, validated before anything heavy is loaded
    engine.py         distributed init, parameter groups, lr schedule, deepspeed.initialize
    loop.py           the training step, evaluation, alarms, preemption
    checkpointing.py  save / resume / consolidate final fp32 weights
    metrics.py        tokens/s, MFU, console + metrics.jsonl + wandb
    report.py         report.md and PNG plots
    cli.py            the command (``ds-sft train`` and ``python -m ds_sft.train``)
"""
