"""The run's log: each step's record, and where records and console lines go.

:class:`StepMeter` turns a step's result into its ``train`` record (tokens/s, MFU, ETA; the arithmetic
is :mod:`ds_sft.train.metrics`'s). :class:`RunLog` writes every record to ``metrics.jsonl`` and wandb
(:class:`~ds_sft.train.metrics.MetricsSink`) and prints rank 0's console: a step line every
``--log_interval`` steps, each evaluation, the alarms (:class:`Alarms`), all above the progress bar
(:class:`LinesAboveBar`). :func:`announce_eta` prints the run's length early in its first step.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from ds_sft.train.metrics import MetricsSink, flops_per_token, format_duration, peak_flops


class StepMeter:
    """Tokens/s, MFU and ETA of each optimizer step of this process's segment of the run."""

    def __init__(self, s, ds_config: dict, model_config, seq_len: int, world: int, first_step: int, say):
        bf16 = ds_config.get("bf16", {}).get("enabled", False)
        self.peak, self.peak_source = peak_flops(bf16)
        self.flops_token = flops_per_token(
            model_config.matmul_parameters(),
            model_config.n_layers,
            model_config.n_heads * model_config.head_dim,
            seq_len,
        )
        say(
            f"MFU peak: {self.peak / 1e12:.3g} TFLOP/s per rank ({self.peak_source}); "
            f"{self.flops_token / 1e6:.1f} MFLOP/token"
        )
        self.tokens_per_step = s.micro_batch_size * s.grad_accum * world * seq_len
        self.world, self.first_step, self.max_iters = world, first_step, s.max_iters
        self.run_start = None

    def start(self) -> None:
        self.run_start = time.perf_counter()

    def record(self, done: int, lr: float, result: dict, step_time: float) -> dict:
        """The ``train`` record of step ``done`` (metrics.jsonl), from ``train_step``'s result. A step
        without trained tokens ran nothing: no throughput to measure (None), not a near-zero time
        read as millions of tokens/s."""
        ran = result["trained_tokens"] > 0
        tokens_per_s = self.tokens_per_step / step_time if ran else None
        elapsed = time.perf_counter() - self.run_start
        return {
            "type": "train",
            "step": done,
            "loss": result["loss"],
            "lr": lr,
            "grad_norm": result["grad_norm"],
            "tokens_per_s": tokens_per_s,
            "trained_tokens": result["trained_tokens"],
            "mfu": self.flops_token * tokens_per_s / (self.peak * self.world) if ran else None,
            "elapsed_s": elapsed,
            "eta_s": elapsed / (done - self.first_step) * (self.max_iters - done),
        }


class RunLog:
    """Where the run's numbers go: metrics.jsonl (+ wandb), the progress bar and console, the alarms."""

    def __init__(self, s, run_dir: Path, is_main: bool, say):
        self.s, self.is_main, self.say = s, is_main, say
        self.sink = MetricsSink(run_dir, is_main, s.wandb_project, s.wandb_mode, config=vars(s))
        self.alarms = Alarms(s.alarm_rising_evals, s.alarm_gap)
        self.alarm_log: list[dict] = []
        # (loss, trained tokens) of each step since the last evaluation
        self.recent_train: list[tuple[float, int]] = []
        self.progress = None

    @contextlib.contextmanager
    def progress_bar(self, first_step: int):
        """The run's progress bar, open for the block and closed however it ends (so an error's message
        gets a line of its own). Whatever is printed meanwhile (saves, evals, alarms, notes, DeepSpeed's
        own prints) goes above the bar (:class:`LinesAboveBar`)."""
        import sys

        from tqdm import tqdm

        self.progress = tqdm(
            total=self.s.max_iters,
            initial=first_step,
            disable=not self.is_main,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        above = LinesAboveBar(sys.stdout, self.progress)
        with self.progress, contextlib.redirect_stdout(above):
            try:
                yield self.progress
            finally:
                above.close()

    def alarm(self, step: int, message: str, line: str) -> None:
        """Print ``line``, and keep ``message`` in the run's alarms and metrics.jsonl."""
        self.say(line)
        self.alarm_log.append({"step": step, "message": message})
        self.sink.log({"type": "alarm", "step": step, "message": message})

    def step(self, record: dict) -> None:
        """Log one optimizer step; print its line every ``--log_interval`` steps and at the last."""
        s, done = self.s, record["step"]
        if not record.get("skipped") and record["trained_tokens"]:
            self.recent_train.append((record["loss"], record["trained_tokens"]))
        self.sink.log(record)
        self.progress.update(1)
        loss = "n/a (no trained tokens)" if record["loss"] is None else f"{record['loss']:.4f}"
        self.progress.set_postfix(loss=loss, lr=f"{record['lr']:.2e}")
        if self.is_main and (done % s.log_interval == 0 or done == s.max_iters):
            norm = "n/a" if record["grad_norm"] is None else f"{record['grad_norm']:.3f}"
            speed = (
                "no update"
                if record["tokens_per_s"] is None
                else f"{record['tokens_per_s']:,.0f} tok/s | MFU {record['mfu']:.1%}"
            )
            self.say(
                f"step {done:>6}/{s.max_iters} | loss {loss} | lr {record['lr']:.3e} | "
                f"grad norm {norm} | {speed} | "
                f"{format_duration(record['elapsed_s'])} elapsed, ETA {format_duration(record['eta_s'])}"
            )

    def evaluation(self, done: int, result: dict, val_history: list[float]) -> None:
        """Log and print an evaluation against the train loss since the last one, then check the alarms.

        That train loss pools the steps' trained tokens, as the val loss pools its rows': a mean of
        the step means would weigh a step of 10 trained tokens like one of 10,000, and count a step
        with none (loss 0) as a perfect one."""
        tokens = sum(count for _, count in self.recent_train)
        train_mean = sum(loss * count for loss, count in self.recent_train) / tokens if tokens else None
        self.sink.log({"type": "eval", "step": done, **result, "train_loss": train_mean})
        per_source = ", ".join(f"{k} {v['loss']:.4f}" for k, v in result["per_source"].items())
        if self.is_main:
            self.say(
                f"eval step {done}: val loss {result['val_loss']:.4f} | ppl "
                f"{result['val_ppl']:.2f} | acc {result['val_acc']:.3f} | {per_source}"
            )
        for message in self.alarms.check(val_history, train_mean):
            self.alarm(done, message, f"ALARM step {done}: {message}")
        self.recent_train = []

    def close(self) -> None:
        self.sink.close()


class LinesAboveBar:
    """Standard output while a progress bar is open: each whole line is written above the bar (the bar
    is cleared, the line written, the bar redrawn). A plain print on a terminal lands at the end of the
    bar's line, as the bar (on stderr) ends without a newline. tqdm's own ``DummyTqdmFile`` clears only
    bars on ``sys.stdout`` or ``sys.stderr`` as they are when it writes, and with stdout redirected to
    it, that no longer names the stream the bar shares the terminal with. A disabled bar (every rank but
    the first) has no stream to clear: lines go straight out (a SIGTERM's line on rank 1 was an
    AttributeError that stopped that rank mid-step, and the job without its checkpoint)."""

    def __init__(self, out, bar) -> None:
        self.out, self.bar, self.partial = out, bar, ""

    def write(self, text: str) -> int:
        lines, newline, self.partial = (self.partial + text).rpartition("\n")
        if newline:
            clearing = (
                contextlib.nullcontext()
                if self.bar.disable
                else self.bar.external_write_mode(file=self.bar.fp)
            )
            with clearing:
                self.out.write(lines + newline)
                self.out.flush()
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:
        """Write out the end of a line left without its newline."""
        if self.partial:
            self.out.write(self.partial)
            self.partial = ""

    def __getattr__(self, name):  # encoding, isatty, fileno: the stream's own
        return getattr(self.out, name)


class Alarms:
    """Warnings about the run's health: val loss rising for N evals, train/val gap over a threshold."""

    def __init__(self, rising_evals: int, max_gap: float):
        self.rising_evals, self.max_gap = rising_evals, max_gap

    def check(self, val_history: list[float], recent_train_loss: float | None) -> list[str]:
        messages = []
        last = val_history[-(self.rising_evals + 1) :]
        if len(last) == self.rising_evals + 1 and all(b > a for a, b in zip(last, last[1:], strict=False)):
            messages.append(
                f"val loss rose for {self.rising_evals} evals in a row "
                f"({' -> '.join(f'{v:.4f}' for v in last)}): overfitting or lr too high?"
            )
        if recent_train_loss is not None and val_history[-1] - recent_train_loss > self.max_gap:
            messages.append(
                f"val loss {val_history[-1]:.4f} exceeds train loss {recent_train_loss:.4f} by more "
                f"than {self.max_gap}: overfitting?"
            )
        return messages


def announce_eta(forward_context, steps: int, micro_steps: int, say):
    """``forward_context`` that, entered for the third micro-batch of a step, prints the run's ETA
    from the second micro-step's time: on CPU a step of 16 micro-batches takes minutes, and the user
    should know the run's length before the first step line. Not from the first: it carries the
    one-time costs (on an H200 the flex_attention and Triton compiles took 23-40 s of it, against
    ~0.1 s for a later micro-step), which would announce hours for a run of minutes."""
    starts = []

    @contextlib.contextmanager
    def context():
        starts.append(time.perf_counter())
        if len(starts) == 3:
            micro = starts[2] - starts[1]
            say(
                f"ETA {format_duration(micro * micro_steps * steps)}: the second micro-step took "
                f"{micro:.2f} s (the first, {starts[1] - starts[0]:.2f} s, warmed up), {micro_steps} per "
                f"step x {steps} steps (the step lines refine it)"
            )
        with forward_context():
            yield

    return context
