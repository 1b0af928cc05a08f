"""Cross-entropy in Triton: online logsumexp over vocabulary blocks, gradient written in the forward.

One program per row ``x`` (``V`` logits, label ``y``), two passes over the row in blocks:

1. online logsumexp — keep a running max ``m`` and ``d = sum exp(x - m)``; when a block raises the
   max, rescale ``d`` by ``exp(m_old - m_new)``. Then ``lse = m + log d``, and the loss (see
   ``kernels/reference.py``)::

       loss = lse - x[y]

2. gradient — with ``p = exp(x - lse)`` (the softmax, recomputed block by block, never stored)::

       dloss/dx[j] = p[j] - [j == y]

The gradient is the only ``[rows, V]`` buffer; it may alias the logits (the fused linear
cross-entropy owns its logits chunk and overwrites it), because each block is read before it is
written. Ignored rows get loss 0 and a zero gradient. For ``reduction="mean"`` the gradient is
scaled by ``1 / n_valid`` read from a device tensor, so nothing waits for the host.

The standalone loss (:func:`triton_cross_entropy`) is a torch custom op, ``ds_sft::cross_entropy``,
with a fake (shape-only) implementation and its autograd formula: ``torch.compile`` records it as one
call instead of breaking its graph at the Triton launch (see ``rmsnorm.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds_sft.kernels._launch import MAX_VOCAB_BLOCK, launch, num_warps_for
from ds_sft.kernels.reference import REDUCTIONS


@triton.jit
def _cross_entropy_kernel(
    LOGITS, GRAD, LABELS, LOSS, N_VALID,
    stride_logits, stride_grad,
    n_cols, ignore_index,
    MEAN: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    logits_row = LOGITS + row * stride_logits
    label = tl.load(LABELS + row)

    if label == ignore_index:
        tl.store(LOSS + row, 0.0)
        if COMPUTE_GRAD:
            grad_row = GRAD + row * stride_grad
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                tl.store(grad_row + cols, tl.zeros((BLOCK,), GRAD.dtype.element_ty), mask=cols < n_cols)
        return

    # Pass 1: online logsumexp.
    m = -float("inf")
    d = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(logits_row + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    tl.store(LOSS + row, lse - tl.load(logits_row + label).to(tl.float32))

    # Pass 2: the gradient, block by block (reads each block before overwriting it).
    if COMPUTE_GRAD:
        grad_row = GRAD + row * stride_grad
        scale = 1.0
        if MEAN:
            scale = 1.0 / tl.maximum(tl.load(N_VALID), 1).to(tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(logits_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            g = tl.exp(x - lse)
            g = tl.where(cols == label, g - 1.0, g)
            tl.store(grad_row + cols, (g * scale).to(GRAD.dtype.element_ty), mask=cols < n_cols)


def cross_entropy_loss_and_grad(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    n_valid: torch.Tensor | None = None,
    compute_grad: bool = True,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row fp32 losses of ``logits [rows, V]`` and, if asked, ``dloss/dlogits`` in the logits dtype.

    The gradient is of the summed loss, or of the mean over ``n_valid`` rows when ``n_valid`` (a
    0-d device tensor) is given. ``inplace=True`` writes it over ``logits``.
    """
    n_rows, n_cols = logits.shape
    # The kernel walks each row by its first stride alone and reads labels as a flat array.
    if logits.stride(-1) != 1 or not labels.is_contiguous():
        raise ValueError("cross_entropy_loss_and_grad needs rows of contiguous logits and contiguous labels")
    block = min(triton.next_power_of_2(n_cols), MAX_VOCAB_BLOCK)
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    grad = None
    if compute_grad:
        grad = logits if inplace else torch.empty_like(logits)
    launch(
        _cross_entropy_kernel, (n_rows,), logits.device,
        logits, grad, labels, loss, n_valid,
        logits.stride(0), grad.stride(0) if grad is not None else 0,
        n_cols, ignore_index,
        MEAN=n_valid is not None, COMPUTE_GRAD=compute_grad, BLOCK=block, num_warps=num_warps_for(block),
    )  # fmt: skip
    return loss, grad


@torch.library.custom_op("ds_sft::cross_entropy", mutates_args=())
def cross_entropy_op(
    logits2d: torch.Tensor, labels1d: torch.Tensor, ignore_index: int, mean: bool, compute_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, dloss/dlogits)`` of contiguous ``[rows, V]`` logits: the summed loss, or its mean over
    the trained rows; the gradient empty when ``compute_grad`` is off."""
    n_valid = (labels1d != ignore_index).sum() if mean else None
    loss, grad = cross_entropy_loss_and_grad(logits2d, labels1d, ignore_index, n_valid, compute_grad)
    total = loss.sum()
    if mean:
        total = total / n_valid.clamp(min=1)
    return total, grad if compute_grad else logits2d.new_empty(0)


@cross_entropy_op.register_fake
def _(logits2d, labels1d, ignore_index, mean, compute_grad):
    grad = torch.empty_like(logits2d) if compute_grad else logits2d.new_empty(0)
    return logits2d.new_empty((), dtype=torch.float32), grad


def _save_for_backward(ctx, inputs, output):
    _, grad = output
    ctx.mark_non_differentiable(grad)
    # the gradient output gets no upstream gradient: left None, not a zero tensor of the logits' size
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad)


def _backward(ctx, grad_output, _):
    (grad,) = ctx.saved_tensors
    return grad * grad_output, None, None, None, None


cross_entropy_op.register_autograd(_backward, setup_context=_save_for_backward)


def triton_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, reduction: str = "sum"
) -> torch.Tensor:
    """The fp32 cross-entropy of ``logits [..., V]`` against ``labels [...]``, differentiable in logits."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    logits2d = logits.reshape(-1, logits.shape[-1]).contiguous()
    loss, _ = cross_entropy_op(
        logits2d, labels.reshape(-1).contiguous(), ignore_index, reduction == "mean", compute_grad
    )
    return loss
