"""The run loop: set-up, then each optimizer step (:func:`~ds_sft.train.step.train_step`: the
token-normalized loss, steps without trained tokens, non-finite ones), its bookkeeping, evaluation
and saves.

Preemption: SIGTERM/SIGINT/SIGHUP set a flag (:func:`~ds_sft.train.distributed.preemption_flag`); at
the end of the step every rank agrees (all-reduce) to save a checkpoint and leave, so no rank is
caught half-way through a collective.

Top to bottom: evaluation, the forwards' fp8 context, non-finite steps, the best checkpoint;
:func:`train` strings them together with set-up and resume (:func:`~ds_sft.train.resume.start_engine`)
and the run's log (:class:`~ds_sft.train.run_log.RunLog`), and saves.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from pathlib import Path

from ds_sft.errors import UserError
from ds_sft.run_layout import tag_for
from ds_sft.train import checkpointing, compatibility
from ds_sft.train.distributed import StopSignal, preemption_flag
from ds_sft.train.resume import optimizer_groups, start_engine, val_sample
from ds_sft.train.run_log import RunLog, StepMeter, announce_eta
from ds_sft.train.schedule import lr_at, set_lr
from ds_sft.train.step import collate, train_step
from ds_sft.train.trainer_state import snapshot


def evaluate(
    engine, dataset, rows: list[int], micro_batch_size: int, forward_context=contextlib.nullcontext
) -> dict:
    """Loss, perplexity and next-token accuracy on the fixed val sample ``rows``
    (:mod:`ds_sft.data.val_sample`), overall and per source, by the one evaluator
    (:mod:`ds_sft.model.scoring`) that ``ds-sft eval`` uses too. Rank ``r`` of ``W`` scores
    ``rows[r::W]``; every rank runs the same number of forwards (ZeRO 3 gathers weights
    collectively inside each one), and the per-source sums meet in one all-reduce."""
    import torch.distributed as dist

    from ds_sft.model.scoring import score_rows, summarize

    rank, world = dist.get_rank(), dist.get_world_size()
    forwards = math.ceil(math.ceil(len(rows) / world) / micro_batch_size)
    engine.eval()
    totals = score_rows(
        engine, dataset, rows[rank::world], micro_batch_size, engine.device, forward_context, forwards
    )
    engine.train()
    dist.all_reduce(totals)
    summary = summarize(totals, list(dataset.sources))

    def record(metrics: dict) -> dict:
        return {
            "loss": metrics["loss"],
            "ppl": metrics["perplexity"],
            "acc": metrics["token_accuracy"],
            "tokens": metrics["tokens"],
        }

    overall = record(summary["overall"])
    return {
        **{f"val_{key}": value for key, value in overall.items()},
        "per_source": {name: record(metrics) for name, metrics in summary["by_source"].items()},
    }


def fp8_forward_context(s, device):
    """What every forward runs inside: ``fp8_autocast`` with ``--fp8`` on (mode ``te`` needs it).

    ``auto`` is resolved here, once: resolving tries to import Transformer Engine, and a failed
    import is not cached, so resolving per forward would search for it on every micro-batch."""
    if s.fp8 == "off":
        return contextlib.nullcontext
    from ds_sft.model.fp8 import Fp8Recipe, fp8_autocast, resolve_fp8_mode

    recipe = Fp8Recipe.from_dict(s.fp8_recipe or {})
    return functools.partial(fp8_autocast, resolve_fp8_mode(s.fp8, device), recipe)


def count_non_finite_step(s, state: dict, record: dict, result: dict, log, engine, ckpt_dir: Path) -> None:
    """A non-finite loss, or non-finite gradients under a finite one: the engine skipped the update
    (it lands only where the DeepSpeed config turned bf16's check_grad_overflow off, and the alarm
    says so). Alarm, and stop after ``--max_nan_steps`` in a row."""
    done = record["step"]
    state["nan_streak"] += 1
    record["skipped"] = result["skipped"]
    cause = (
        f"non-finite loss ({record['loss']})"
        if not result["finite_loss"]
        else f"non-finite gradients under a finite loss ({record['loss']:.4f})"
    )
    outcome = "update skipped" if result["skipped"] else "update applied"
    if not result["skipped"] and getattr(engine.optimizer, "check_grad_overflow", True) is False:
        outcome += ' (the DeepSpeed config sets "bf16": {"check_grad_overflow": false})'
    message = f"step {done}: {cause}, {outcome} ({state['nan_streak']}/{s.max_nan_steps} in a row)"
    log.alarm(done, message, message)
    if state["nan_streak"] >= s.max_nan_steps:
        log.sink.log(record)
        log.sink.close()
        engine.destroy()
        raise UserError(
            f"loss or gradients were NaN/inf for {state['nan_streak']} steps in a row (last at step "
            f"{done}): lower --learning_rate, check the data, or resume from "
            f"{ckpt_dir / 'latest'}"
        )


def keep_if_best(state: dict, done: int, val_loss: float) -> bool:
    """Record step ``done``'s val loss as the best when it is lower; True when it is the best."""
    if state["best_val"] is None or val_loss < state["best_val"]:
        state["best_val"], state["best_tag"] = val_loss, tag_for(done)
    return state["best_tag"] == tag_for(done)


def train(
    s, ds_config: dict, model, train_set, val_set, run_dir: Path, sampler, checkpoint: Path | None
) -> dict:
    """Build the engine, resume from the tag folder ``checkpoint`` if given (what
    :func:`~ds_sft.train.checkpoint_check.find_checkpoint` found), run to ``s.max_iters`` (or
    preemption). Returns a summary:
    {"engine", "status": "finished" | "preempted", "stop_signal" (the signal's number, 0 when finished),
    "step", "last_eval", "alarms", "records", ...}
    (alarms and records of this process's segment; the report reads metrics.jsonl for the whole run)."""
    import torch.distributed as dist

    from ds_sft.model.fp8 import reduce_scaling_state

    world, is_main = dist.get_world_size(), dist.get_rank() == 0
    say = print if is_main else (lambda *a, **k: None)
    ckpt_dir = run_dir / "checkpoints"
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)

    # set-up: engine (resumed or fresh), fp8, meters, logs, the val sample
    engine, state, identity = start_engine(
        s, ds_config, model, train_set, run_dir, checkpoint, sampler, world, say
    )
    forward_context = fp8_forward_context(s, engine.device)
    first_step, last_eval, status, stopped_by = state["step"], None, "finished", 0
    meter = StepMeter(s, ds_config, model.config, train_set.seq_len, world, first_step, say)
    log = RunLog(s, run_dir, is_main, say)
    log.sink.log({"type": "start", "step": first_step})  # what metrics.jsonl held past it is left behind
    for change in state["changes"]:
        if change["step"] == first_step:  # this resume's (earlier ones are in metrics.jsonl already)
            log.sink.log({"type": "change", **change, "message": compatibility.describe(change)})
    meter.start()
    eta_context = announce_eta(forward_context, s.max_iters - first_step, s.grad_accum, say)
    val_rows = val_sample(s, val_set, state, identity["data"], say)

    def evaluate_and_alarm(done: int) -> dict:
        """Evaluate the val sample, then log, print and check the alarms; step 0 = before any update."""
        result = evaluate(engine, val_set, val_rows, s.micro_batch_size, forward_context)
        state["val_history"].append(result["val_loss"])
        log.evaluation(done, result, state["val_history"])
        return result

    def save(done: int) -> None:
        trainer_state = snapshot(
            state,
            sampler=sampler.state_dict(),
            world_size=world,
            zero_stage=engine.zero_optimization_stage(),
            run=identity,
            max_iters=s.max_iters,
            optimizer=compatibility.optimizer_settings(optimizer_groups(engine)),
        )
        tag = checkpointing.save(engine, ckpt_dir, done, trainer_state, s.keep_last)
        say(f"saved checkpoint {ckpt_dir / tag}")

    stop = StopSignal(engine.device)
    with preemption_flag() as flag, log.progress_bar(first_step):
        if first_step == 0:
            last_eval = evaluate_and_alarm(0)  # the baseline every later "val loss fell" is measured against
        for step in range(first_step, s.max_iters):
            # one optimizer step
            lr = lr_at(step, s.learning_rate, s.min_lr, s.warmup_iters, s.max_iters)
            set_lr(engine, lr)
            start = time.perf_counter()
            rows = sampler.step_indices(s.micro_batch_size, s.grad_accum)  # [grad_accum, micro_batch]
            batches = [collate([train_set[int(i)] for i in micro]) for micro in rows]
            context = eta_context if step == first_step else forward_context
            result = train_step(engine, batches, world, context)
            reduce_scaling_state(engine.module)  # --fp8 torch: every rank's amaxes
            sampler.advance(s.micro_batch_size * s.grad_accum * world)
            step_time = time.perf_counter() - start

            # its bookkeeping
            done = step + 1
            state["step"] = done
            state["train_tokens"] += result["trained_tokens"]
            state["elapsed_s"] += step_time
            record = meter.record(done, lr, result, step_time)
            if not result["finite"]:
                count_non_finite_step(s, state, record, result, log, engine, ckpt_dir)
            elif result["trained_tokens"]:  # a step without tokens ran nothing: no sign of recovery
                state["nan_streak"] = 0
            log.step(record)

            # evaluate, and keep the best weights even between save intervals
            if done % s.eval_interval == 0 or done == s.max_iters:
                last_eval = evaluate_and_alarm(done)
                is_best = keep_if_best(state, done, last_eval["val_loss"])
                if is_best and done % s.save_interval != 0 and done != s.max_iters:
                    save(done)

            # save: on preemption (then stop), every --save_interval steps and at the end
            stopped_by = stop.agreed(flag["stop"])
            if stopped_by:
                save(done)
                status = "preempted"
                break
            if done % s.save_interval == 0 or done == s.max_iters:
                save(done)
    log.close()
    return {
        "engine": engine,
        "status": status,
        "stop_signal": stopped_by,
        "step": state["step"],
        "last_eval": last_eval,
        "alarms": log.alarm_log,
        "records": log.sink.records,
        "best_val": state["best_val"],
        "best_tag": state["best_tag"],
        "peak_flops_source": meter.peak_source,
        "identity": identity,  # what the steps computed in (precision, fp8 layout): for the report
        "elapsed_s": state["elapsed_s"],  # the trainer state's: every segment's steps, not the last one's
    }
