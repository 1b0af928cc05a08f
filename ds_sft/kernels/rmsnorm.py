"""Fused RMSNorm in Triton, optionally fused with the residual add that precedes it.

Forward, one program per row (the row fits in one block up to hidden 64k)::

    s    = x + residual                      (only in the residual variant; stored, it is the new stream)
    rstd = 1 / sqrt(mean(s^2) + eps)         (fp32, saved for the backward: one float per row)
    y    = s * rstd * w

Backward, with ``s_hat = s * rstd`` and ``g = dy * w``::

    ds = rstd * (g - s_hat * mean(g * s_hat))   (+ the gradient flowing into the stream output)
    dw = sum over rows of dy * s_hat

``dw`` is a reduction over all rows. Float atomics would make it depend on the order programs
finish in; instead each program owns a contiguous slice of rows, sums its slice in registers and
writes one partial row, and ``torch.sum`` over the ``[programs, hidden]`` partials finishes the job.
Two runs give bitwise-equal ``dw``.

The residual variant saves reading ``x`` and ``residual`` twice and writing ``s`` separately: the
add, the statistics and the normalisation happen in one pass over the row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds_sft.kernels._launch import launch, num_warps_for, reduction_programs, row_block


@triton.jit
def _rms_norm_forward_kernel(
    X, R, S, W, Y, RSTD,
    stride_x, stride_r, stride_s, stride_y,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        # Round the sum to the stream dtype, exactly as `x + residual` in PyTorch does, and
        # normalise that rounded value, so the fused model matches the unfused one.
        x += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = x.to(S.dtype.element_ty)
        tl.store(S + row * stride_s + cols, x, mask=mask)
        x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_backward_kernel(
    DY, DS, X, W, RSTD, DX, DW_PARTIAL,
    stride_dy, stride_ds, stride_x, stride_dx,
    n_rows, n_cols, rows_per_program,
    HAS_DS: tl.constexpr,
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
        if HAS_DS:
            dx += tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


def rms_norm_forward(x2d, residual2d, weight, eps):
    """Launch the forward on ``[rows, hidden]`` views: ``(y, s, rstd)``, ``s`` None without residual."""
    n_rows, n_cols = x2d.shape
    block = row_block(n_cols)
    y = torch.empty_like(x2d)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2d.device)
    s = torch.empty_like(x2d) if residual2d is not None else None
    launch(
        _rms_norm_forward_kernel, (n_rows,), x2d.device,
        x2d, residual2d, s, weight, y, rstd,
        x2d.stride(0), residual2d.stride(0) if s is not None else 0, s.stride(0) if s is not None else 0,
        y.stride(0),
        n_cols, eps,
        HAS_RESIDUAL=s is not None, BLOCK=block, num_warps=num_warps_for(block),
    )  # fmt: skip
    return y, s, rstd


def rms_norm_backward(dy2d, ds2d, x2d, weight, rstd):
    """Launch the backward; returns ``(dx, dweight)`` with ``dweight`` reduced deterministically."""
    n_rows, n_cols = x2d.shape
    block = row_block(n_cols)
    programs = reduction_programs(n_rows, x2d.device)
    rows_per_program = triton.cdiv(n_rows, programs)
    dx = torch.empty_like(x2d)
    dw_partial = torch.empty(programs, n_cols, dtype=torch.float32, device=x2d.device)
    launch(
        _rms_norm_backward_kernel, (programs,), x2d.device,
        dy2d, ds2d, x2d, weight, rstd, dx, dw_partial,
        dy2d.stride(0), ds2d.stride(0) if ds2d is not None else 0, x2d.stride(0), dx.stride(0),
        n_rows, n_cols, rows_per_program,
        HAS_DS=ds2d is not None, BLOCK=block, num_warps=num_warps_for(block),
    )  # fmt: skip
    return dx, dw_partial.sum(dim=0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """``apply(x, residual, weight, eps)``: ``y``, or ``(y, x + residual)`` when ``residual`` is given."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1]).contiguous()
        residual2d = residual.reshape(-1, shape[-1]).contiguous() if residual is not None else None
        # The kernels index every row as PTR + cols: what they read, the backward's saved tensors
        # included, is contiguous (a strided weight was read at the wrong addresses in the backward)
        weight = weight.contiguous()
        y, s, rstd = rms_norm_forward(x2d, residual2d, weight, eps)
        ctx.has_residual = residual is not None
        ctx.save_for_backward(s if s is not None else x2d, weight, rstd)
        return (y.view(shape), s.view(shape)) if s is not None else y.view(shape)

    @staticmethod
    def backward(ctx, dy, ds=None):
        x2d, weight, rstd = ctx.saved_tensors
        n_cols = x2d.shape[-1]
        ds2d = ds.reshape(-1, n_cols).contiguous() if ds is not None else None
        dx, dw = rms_norm_backward(dy.reshape(-1, n_cols).contiguous(), ds2d, x2d, weight, rstd)
        dx = dx.view(dy.shape)
        # d(x + residual)/dx = d(x + residual)/dresidual = 1: both inputs receive the same gradient.
        return dx, (dx if ctx.has_residual else None), dw, None
