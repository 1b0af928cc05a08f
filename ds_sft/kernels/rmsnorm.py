"""Fused RMSNorm in Triton.

Forward, one program per row (the row fits in one block up to hidden 64k)::

    rstd = 1 / sqrt(mean(x^2) + eps)         (fp32, saved for the backward: one float per row)
    y    = x * rstd * w

Backward, with ``x_hat = x * rstd`` and ``g = dy * w``::

    dx = rstd * (g - x_hat * mean(g * x_hat))
    dw = sum over rows of dy * x_hat

``dw`` is a reduction over all rows. Float atomics would make it depend on the order programs
finish in; instead each program owns a contiguous slice of rows, sums its slice in registers and
writes one partial row, and ``torch.sum`` over the ``[programs, hidden]`` partials finishes the job.
Two runs give bitwise-equal ``dw``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds_sft.kernels._launch import launch, num_warps_for, reduction_programs, row_block


@triton.jit
def _rms_norm_forward_kernel(
    X, W, Y, RSTD,
    stride_x, stride_y,
    n_cols, eps,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_backward_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL,
    stride_dy, stride_x, stride_dx,
    n_rows, n_cols, rows_per_program,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        x_hat = x * rstd
        g = dy * w
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / n_cols))
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


def rms_norm_forward(x2d, weight, eps):
    """Launch the forward on a ``[rows, hidden]`` view: ``(y, rstd)``."""
    n_rows, n_cols = x2d.shape
    block = row_block(n_cols)
    y = torch.empty_like(x2d)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2d.device)
    launch(
        _rms_norm_forward_kernel, (n_rows,), x2d.device,
        x2d, weight, y, rstd,
        x2d.stride(0), y.stride(0),
        n_cols, eps,
        BLOCK=block, num_warps=num_warps_for(block),
    )  # fmt: skip
    return y, rstd


def rms_norm_backward(dy2d, x2d, weight, rstd):
    """Launch the backward; returns ``(dx, dweight)`` with ``dweight`` reduced deterministically."""
    n_rows, n_cols = x2d.shape
    block = row_block(n_cols)
    programs = reduction_programs(n_rows, x2d.device)
    rows_per_program = triton.cdiv(n_rows, programs)
    dx = torch.empty_like(x2d)
    dw_partial = torch.empty(programs, n_cols, dtype=torch.float32, device=x2d.device)
    launch(
        _rms_norm_backward_kernel, (programs,), x2d.device,
        dy2d, x2d, weight, rstd, dx, dw_partial,
        dy2d.stride(0), x2d.stride(0), dx.stride(0),
        n_rows, n_cols, rows_per_program,
        BLOCK=block, num_warps=num_warps_for(block),
    )  # fmt: skip
    return dx, dw_partial.sum(dim=0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """``apply(x, weight, eps)`` -> ``y``."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1]).contiguous()
        # The kernels index every row as PTR + cols: what they read, the backward's saved tensors
        # included, is contiguous (a strided weight was read at the wrong addresses in the backward)
        weight = weight.contiguous()
        y, rstd = rms_norm_forward(x2d, weight, eps)
        ctx.save_for_backward(x2d, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy.reshape(-1, x2d.shape[-1]).contiguous(), x2d, weight, rstd)
        return dx.view(dy.shape), dw, None
