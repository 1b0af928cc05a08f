"""One optimizer step: ``grad_accum`` micro-batches on each of ``world`` ranks, then the engine's update.

Token-normalized loss. The model returns the *sum* of token losses of a micro-batch. The loss we
want is ``sum over the global batch of token losses / trained tokens in the global batch``: a mean of
micro-batch means would weight a token in a short micro-batch more than one in a long one. So:

1. Before the first forward of a step, all-reduce the number of trained tokens ``N`` of this step's
   micro-batches over all ranks (labels are known up front).
2. Each micro-step backpropagates ``loss_sum * world / N`` with ``scale_wrt_gas=False``: the engine
   then does not divide by the accumulation steps, and its data-parallel *averaging* (a division by
   ``world``) cancels the ``world``. The gradient left in the engine is exactly
   ``d(sum of token losses) / d(theta) / N``, whatever the accumulation or world size.

The engine still owns accumulation (it steps only at the boundary), clipping and the update. At ZeRO 2
an update's micro-batches sum their gradients on the parameters and the engine reduces them once, after
the last (:func:`~ds_sft.train.engine.reduces_gradients_once_per_update`).

A step without trained tokens (every label of its rows on every rank is -100) has nothing to learn
from, yet an AdamW step on its zero gradients would still move every weight: the momentum carries
the earlier steps' direction, decoupled weight decay shrinks the decayed weights, and the step count
advances the bias correction. An lr of 0 would not help either: the moments would still decay. So
the step is skipped whole, before its first forward, on the all-reduced count that every rank
shares: the engine sees no micro-step (its accumulation boundary stays in phase) and AdamW nothing,
as a plain loop that skips ``optimizer.step()`` would. The step still counts for the schedule and
the sampler.

Non-finite loss. A ZeRO optimizer (and DeepSpeed's bf16 stage-0 wrapper) checks the gradients for inf/NaN
and skips the update by itself (ZeRO-1/2 by their norm, :mod:`ds_sft.train.engine`; in bf16 only while
``check_grad_overflow`` is on: with it off, the check runs for the non-finite update alone); the plain
torch AdamW of fp32 stage 0 would apply it, so there the gradients are dropped (``grad = None``, which
torch optimizers skip) before the step. Non-finite gradients under a finite loss (a backward that
overflowed where the forward did not) are skipped the same way: the engines find them, torch's AdamW by
ds-sft's own gradient norm; either cause is an alarm, and after ``--max_nan_steps`` non-finite steps in a
row the run stops with a clear message (:func:`~ds_sft.train.loop.count_non_finite_step`).
"""

from __future__ import annotations

import contextlib
import math

from ds_sft.labels import IGNORE_INDEX
from ds_sft.train.distributed import all_reduce_sum
from ds_sft.train.engine import reduces_gradients_once_per_update


def collate(rows: list[dict]) -> dict:
    import torch

    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def model_inputs(batch: dict, device) -> dict:
    """The model's tensors of ``batch`` on ``device``.

    Host tensors bound for CUDA go through pinned memory with ``non_blocking``: a plain copy from
    pageable memory makes the host wait until the GPU has finished all queued work (the previous
    micro-batch's backward) before it can queue the next forward; this one just takes its place in
    the queue. Safe: the pinned copy is a fresh tensor nobody writes, and torch keeps its block until
    the copy has run. Only host tensors can be pinned ("only dense CPU tensors can be pinned"): a
    batch already on a device (the benchmarks move theirs first) goes by a plain ``.to``."""
    import torch

    from ds_sft.model.scoring import MODEL_INPUTS

    to_cuda = torch.device(device).type == "cuda"

    def move(tensor):
        if to_cuda and tensor.device.type == "cpu":
            return tensor.pin_memory().to(device, non_blocking=True)
        return tensor.to(device)

    return {key: move(batch[key]) for key in MODEL_INPUTS if key in batch}


def local_grad_norm(engine) -> float:
    """2-norm of the (already data-parallel averaged) gradients, for stage 0 where the engine has none."""
    import torch

    norms = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0


def train_step(engine, batches: list[dict], world_size: int, forward_context=contextlib.nullcontext) -> dict:
    """Forward/backward every micro-batch of one optimizer step and let the engine update.
    ``forward_context``: what each forward runs inside (Transformer Engine's fp8 autocast for --fp8 te).

    Returns the global token-normalized loss, the trained-token count, the pre-clip grad norm,
    whether loss and gradients were finite (``finite``; ``finite_loss`` for the loss alone) and
    whether the engine left the weights alone (``skipped``). When no rank has a trained token nothing
    runs (see the module's docstring): loss and norm are None (there is no loss to report, not a
    loss of 0), and the engine and optimizer are untouched.
    """
    import torch

    device = engine.device
    local_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)  # labels are on the host
    trained_tokens = all_reduce_sum([local_tokens], device)
    if trained_tokens.item() == 0:  # the same answer on every rank, so all of them skip
        return {
            "loss": None,
            "trained_tokens": 0,
            "grad_norm": None,
            "finite": True,
            "finite_loss": True,
            "skipped": False,
        }
    scale = (world_size / trained_tokens).float()
    # the loss sum stays on the device, read once at the boundary (the fused loss's count of trained
    # rows is the one host sync a micro-batch makes: its length sizes the LM head's loop)
    local_loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    with micro_batches_of_one_update(engine, len(batches)) as micro_batch_done:
        for i, batch in enumerate(batches):
            with forward_context():
                loss_sum = engine(**model_inputs(batch, device))
            engine.backward(loss_sum * scale, scale_wrt_gas=False)
            local_loss_sum += loss_sum.detach().double()
            if i < len(batches) - 1:
                micro_batch_done()
    # The boundary: gradients are complete (and averaged over ranks) until engine.step() updates.
    global_loss_sum = all_reduce_sum(local_loss_sum.reshape(1), device)
    global_loss_sum, trained_tokens = torch.cat([global_loss_sum, trained_tokens]).tolist()
    finite = math.isfinite(global_loss_sum)
    own_norm = None
    if not hasattr(engine.optimizer, "overflow"):  # torch's AdamW itself (stage 0, fp32)
        own_norm = local_grad_norm(engine) if finite else math.nan
        if not math.isfinite(own_norm):  # AdamW would apply it: NaN weights from here on
            skip_next_update(engine.optimizer)
    with overflow_check_for(engine.optimizer, not finite):
        engine.step()
    grad_norm = engine.get_global_grad_norm()
    grad_norm = own_norm if grad_norm is None else float(grad_norm)
    # DeepSpeed reports a norm it found not finite as inf, or (ZeRO-1/2) as the -1 it masks it with
    gradients_finite = grad_norm is None or (math.isfinite(grad_norm) and grad_norm >= 0)
    return {
        "loss": global_loss_sum / trained_tokens,
        "trained_tokens": int(trained_tokens),
        "grad_norm": grad_norm if finite and gradients_finite else None,
        "finite": finite and gradients_finite,
        "finite_loss": finite,
        # did the engine leave the weights alone? (ZeRO and the bf16 wrapper say so themselves)
        "skipped": bool(getattr(engine.optimizer, "overflow", not gradients_finite)),
    }


@contextlib.contextmanager
def micro_batches_of_one_update(engine, count: int):
    """What the ``count`` micro-batches of one update run inside: yields the function to call after
    each micro-batch's backward but the last's. After the block, ``engine.step()`` updates.

    Where the engine reduces the gradients once per update
    (:func:`~ds_sft.train.engine.reduces_gradients_once_per_update`) the block is DeepSpeed's
    ``coalesce_grad_reduction``, which reduces as it ends and refuses ``step()`` inside: the engine
    counts the micro-steps after it. Otherwise each ``step()`` between micro-batches counts one."""
    if not reduces_gradients_once_per_update(engine, count):
        yield engine.step  # not a boundary: the engine only counts the micro-step
        return
    with engine.coalesce_grad_reduction():
        yield lambda: None
    for _ in range(count - 1):
        engine.step()


@contextlib.contextmanager
def overflow_check_for(optimizer, needed: bool):
    """ZeRO-1/2 in bf16 with the JSON's ``"bf16": {"check_grad_overflow": false}`` skips no update,
    not even a non-finite one (the setting saves the host sync that tests the gradient norm). When
    this update's loss is not finite the check runs for it alone, so the engine skips it as it does
    by default; otherwise nothing changes."""
    turned_on = needed and getattr(optimizer, "check_grad_overflow", True) is False
    if turned_on:
        optimizer.check_grad_overflow = True
    try:
        yield
    finally:
        if turned_on:
            optimizer.check_grad_overflow = False


def skip_next_update(optimizer) -> None:
    """Make the optimizer's next ``step()`` a no-op (no moments, no step count, no weights touched);
    the engine clears the gradients after it as usual."""

    def skip(*args, **kwargs):
        del optimizer.step  # the class's step is back for the next update

    optimizer.step = skip
