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

The two launchers are torch custom ops (``ds_sft::rms_norm_forward`` / ``_backward``) with a fake
(shape-only) implementation and the forward's autograd formula registered beside them: under
``torch.compile`` dynamo records each as one opaque call in its graph instead of stepping into the
Triton launch, which it cannot trace (a graph break at every norm, an error with ``fullgraph=True``).
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


@torch.library.custom_op("ds_sft::rms_norm_forward", mutates_args=())
def rms_norm_forward(
    x2d: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward on a contiguous ``[rows, hidden]`` input: ``(y, rstd)``."""
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


@rms_norm_forward.register_fake
def _(x2d, weight, eps):
    return torch.empty_like(x2d), x2d.new_empty(x2d.shape[0], dtype=torch.float32)


@torch.library.custom_op("ds_sft::rms_norm_backward", mutates_args=())
def rms_norm_backward(
    dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward; returns ``(dx, dweight)`` with ``dweight`` reduced deterministically."""
    dy2d = dy2d.contiguous()  # the upstream gradient may come strided (a transposed consumer)
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


@rms_norm_backward.register_fake
def _(dy2d, x2d, weight, rstd):
    return torch.empty_like(x2d), torch.empty_like(weight)


def _save_for_backward(ctx, inputs, output):
    x2d, weight, _ = inputs
    y, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x2d, weight, rstd)


def _backward(ctx, dy, _):
    x2d, weight, rstd = ctx.saved_tensors
    dx, dw = rms_norm_backward(dy, x2d, weight, rstd)
    return dx, dw, None


rms_norm_forward.register_autograd(_backward, setup_context=_save_for_backward)


def triton_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``y`` of ``x [..., hidden]``, differentiable in ``x`` and ``weight``."""
    # The kernels index every row as PTR + cols: what they read, the backward's saved tensors
    # included, is contiguous (a strided weight was read at the wrong addresses in the backward)
    y, _ = rms_norm_forward(x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(), eps)
    return y.view(x.shape)
