"""The learning rate at every optimizer step.

Linear warmup to the peak, then half a cosine down to ``min_lr`` at the last step. A pure function
of the step (:func:`lr_at`), written into the optimizer's groups before each update (:func:`set_lr`),
so resuming needs nothing but the step counter.
"""

from __future__ import annotations

import math


def lr_at(step: int, peak: float, min_lr: float, warmup_iters: int, max_iters: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Warmup: ``peak * (step + 1) / warmup_iters``, so step ``warmup_iters - 1`` reaches the peak and
    step 0 already moves. Then cosine from the peak at ``warmup_iters`` to ``min_lr`` at the last
    step, ``max_iters - 1``.
    """
    if step < warmup_iters:
        return peak * (step + 1) / warmup_iters
    decay_steps = max(1, max_iters - 1 - warmup_iters)
    progress = min(1.0, (step - warmup_iters) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - min_lr)


def set_lr(engine, lr: float) -> None:
    """Write ``lr`` into every optimizer group (ZeRO wrappers expose the inner optimizer's groups)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
