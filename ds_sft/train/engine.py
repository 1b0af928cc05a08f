"""The DeepSpeed engine around the model, with ds-sft's parameter groups.

:func:`build_engine` hands ``deepspeed.initialize`` the AdamW groups of
:mod:`ds_sft.train.param_groups`; the learning rate is :mod:`ds_sft.train.schedule`'s, how gradients
are scaled :mod:`ds_sft.train.step`'s, the process group :mod:`ds_sft.train.distributed`'s. At ZeRO 3
it also tells the engine that the model's own forward reads the LM-head weight
(:func:`register_lm_head`), which ``--compile`` needs; at ZeRO 1/2 it leaves the search for
non-finite gradients to the gradient norm (:func:`leave_overflow_to_the_gradient_norm`) and computes
that norm over all gradients at once (:func:`norm_the_gradients_together`); at ZeRO 2 the step
reduces the gradients once per update, not once per micro-batch
(:func:`reduces_gradients_once_per_update`). Everything
else (ZeRO partitioning, accumulation, clipping, the optimizer step, checkpoints) is the engine's job,
configured by the JSON.
"""

from __future__ import annotations

from ds_sft.errors import UserError, first_line
from ds_sft.train.param_groups import parameter_groups


def build_engine(model, ds_config: dict, weight_decay: float):
    """``deepspeed.initialize`` with ds-sft's parameter groups. Returns (engine, group table)."""
    import deepspeed

    from ds_sft.train.build_lock import owned_batons

    groups, table = parameter_groups(model, weight_decay)
    try:
        with owned_batons():  # the ops a config asks for JIT-build here (CPU Adam, fused Adam, async I/O)
            engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    except (AssertionError, ValueError, TypeError, NotImplementedError) as err:
        # DeepSpeed checks some combinations only here (master weights without offload, a ZeRO
        # feature another requires, an optimizer argument): each is a setting of the JSON.
        reason = first_line(err) or "no reason given"
        raise UserError(
            f"DeepSpeed refused the configuration ({type(err).__name__}: {reason}); "
            "change that setting in the DeepSpeed JSON (--deepspeed_config) or the flag that sets it"
        ) from None
    undo_construction_step(engine.optimizer)
    leave_overflow_to_the_gradient_norm(engine.optimizer)
    norm_the_gradients_together(engine.optimizer)
    if engine.zero_optimization_stage() == 3:
        register_lm_head(engine.module)
    return engine, table


def undo_construction_step(optimizer) -> None:
    """Start AdamW fresh: no state, fp32 masters equal to the model's weights.

    DeepSpeed's bf16 wrapper at ZeRO 0 (``FP16_UnfusedOptimizer``) makes AdamW's state by calling its
    ``step()`` on zero gradients while it is built. For AdamW that is an update: its step count ran one
    ahead of the updates, so every bias correction was a step off (the first update 0.735 x lr), and
    its decoupled weight decay shrank the decayed masters once. Torch's AdamW makes its state at the
    first real step by itself, so the state is dropped and the masters copied back from the weights
    (every DeepSpeed wrapper has ``refresh_fp32_params``). A resume loads both afterwards."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if any(float(state.get("step", 0)) for state in inner.state.values()):
        inner.state.clear()
        optimizer.refresh_fp32_params()


def leave_overflow_to_the_gradient_norm(optimizer) -> None:
    """Let ZeRO-1/2 find non-finite gradients once per update, not twice.

    Before each update DeepSpeed's ZeRO-1/2 optimizer looks for inf/NaN twice (in bf16 while
    ``check_grad_overflow`` is on, as by default): ``check_overflow`` scans each gradient of the
    partition on its own (about eight small kernels per tensor and a host sync: a third of the 112m
    step on an H200 at one micro-batch per update), then the global gradient norm it computes for
    clipping and logging is tested (``is_invalid_grad_norm``). An inf or NaN in any gradient makes that
    norm inf or NaN, on every data-parallel rank (the norm is all-reduced), so the scan never finds an
    update the norm would let through: the scan is left out and the norm decides, as DeepSpeed does in
    fp32, which never scans. The same updates are skipped.

    Kept where the norm is not computed (``"compute_grad_norm": false``) or is computed elsewhere (CPU
    offload, whose scan is a flag set while gradients are copied anyway)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer):
        return
    if optimizer.compute_grad_norm and not optimizer.cpu_offload:
        # an instance attribute shadows the method the optimizer's step() calls; overflow stays False
        optimizer.check_overflow = lambda partition_gradients=True: None


def norm_the_gradients_together(optimizer) -> None:
    """Let ZeRO-1/2 compute the gradient norm in a few multi-tensor kernels, not three per gradient.

    DeepSpeed's ``get_grad_norm_direct`` takes each gradient of the partition on its own: a float64
    copy, its norm, a move to the device (225 of the 307 ops of a 112m update, each a kernel launch on
    a GPU, where that step waits on the host). ``torch._foreach_norm`` (what torch's own
    ``clip_grad_norm_`` uses) computes every gradient's float64 norm without the copies; the norms are
    then combined exactly as DeepSpeed combines them (squares summed in float64, all-reduced in
    float32, square root, inf/NaN masked to -1), so what is clipped, logged and skipped stays the same.

    Kept where tensor or pipeline parallelism decides which gradients count (ds-sft uses neither: no
    ``mpu``), and with CPU offload, which norms elsewhere. ZeRO 3 has its own norm, left as it is."""
    import torch
    from deepspeed import comm as dist
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from deepspeed.runtime.zero.utils import get_norm_dtype

    if not isinstance(optimizer, DeepSpeedZeroOptimizer):
        return
    if optimizer.cpu_offload or optimizer.model_parallel_group is not None:
        return
    if any(getattr(p, "ds_pipe_replicated", False) for group in optimizer.bit16_groups for p in group):
        return  # a pipeline's tied copies: DeepSpeed counts each once
    deepspeeds_norm = optimizer.get_grad_norm_direct

    def gradient_norm(gradients, params, norm_type=2):
        if float(norm_type) != 2.0:
            return deepspeeds_norm(gradients, params, norm_type)
        grads = [g.detach() for g in gradients if not getattr(g, "_zero_padding", False)]
        if grads:
            norms = torch._foreach_norm(grads, 2.0, dtype=get_norm_dtype())
            squares = torch.stack(norms).pow(2).sum().float()
        else:
            squares = torch.zeros((), dtype=torch.float32, device=optimizer.device)
        dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=optimizer.dp_process_group)
        total = squares.pow(0.5)
        mask_nan_or_inf_with_val_inplace(total, device=optimizer.device)
        return total

    optimizer.get_grad_norm_direct = gradient_norm  # shadows the method step() calls


def reduces_gradients_once_per_update(engine, micro_batches: int) -> bool:
    """Whether the ``micro_batches`` of one update run inside DeepSpeed's ``coalesce_grad_reduction``:
    their gradients summed on the parameters by autograd, then reduced once, after the last.

    ZeRO 2 otherwise reduces in every micro-batch: as backward computes each gradient, a host-side
    hook copies it into a bucket, reduce-scatters the full buckets and adds this rank's share into its
    gradient partition. An update of 16 micro-batches (the recipe) pays 16 reduce-scatters of the
    whole gradient and 16 rounds of a hook per parameter (about 17 ms of host time per micro-batch at
    112m on an H200, whose GPU waits on the host). Coalesced, it pays one of each, as ZeRO 1 does
    already (it reduces in the last micro-batch only). The sum is the same, in the same dtype: at one
    rank the same weights bit for bit, at several the same up to the order of bf16 additions. The
    price: until the update every rank holds the whole gradient (2 bytes a parameter in bf16) where
    ZeRO 2 holds its partition and two reduce buckets (200 MB by default), nothing at one rank.

    Left as DeepSpeed runs it: a single micro-batch (nothing to coalesce), ZeRO 3 (holding every
    gradient is what it is chosen to avoid) and CPU offload (it sums the micro-batches in fp32 on the
    host)."""
    return micro_batches > 1 and engine.zero_optimization_stage() == 2 and not engine.zero_cpu_offload()


def register_lm_head(model) -> None:
    """Tell ZeRO 3 that the model's own forward reads the LM-head weight (the embedding when tied).

    ZeRO 3 gathers a parameter around the forward of the module that owns it; the loss reads the
    weight directly, outside ``wte``'s (or ``lm_head``'s) forward. Eager code gets it anyway, fetched
    on access through ZeRO's parameter dict, but under ``torch.compile`` that access is traced as a
    plain read of the empty partition. Registered on the model, the weight is gathered around the
    model's own forward and backward in both modes."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    register_external_parameter(model, model.lm_head_weight)
