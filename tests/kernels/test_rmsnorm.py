"""The Triton RMSNorm against ``kernels.reference``, run through the Triton interpreter on CPU:
forward, input and weight gradients, odd shapes, fp32 and bf16.
"""

from __future__ import annotations

import pytest
import torch

from ds_sft.kernels.reference import rms_norm_reference
from ds_sft.kernels.rmsnorm import triton_rms_norm

SHAPES = [(1, 64), (5, 576), (123, 768), (2, 3, 5, 64)]
# fp32 only rounds differently; bf16 outputs are one rounding apart (the interpreter truncates where
# the GPU rounds to nearest), and its gradients come from bf16 inputs rounded at different points.
TOLERANCES = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 6e-2, "rtol": 2e-2}}


def _inputs(shape, dtype, device, seed=0):
    """x, weight, and the upstream gradient of y."""
    gen = torch.Generator().manual_seed(seed)
    weight = 1 + 0.1 * torch.randn(shape[-1], generator=gen)
    tensors = [torch.randn(shape, generator=gen), weight, torch.randn(shape, generator=gen)]
    return [t.to(device=device, dtype=dtype) for t in tensors]


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_reference(shape, dtype, device):
    x, weight, grad_y = _inputs(shape, dtype, device)
    (x1, w1), (x2, w2) = _leaves(x, weight), _leaves(x, weight)

    y = triton_rms_norm(x1, w1, 1e-6)
    y.backward(grad_y)
    y_ref = rms_norm_reference(x2, w2, 1e-6)
    y_ref.backward(grad_y)

    tol = TOLERANCES[dtype]
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(x1.grad, x2.grad, **tol)
    # The weight gradient sums over all rows: its error grows with the row count in bf16.
    torch.testing.assert_close(w1.grad.float(), w2.grad.float(), atol=tol["atol"] * 4, rtol=tol["rtol"])


def test_weight_gradient_is_bitwise_deterministic(device):
    """dweight is reduced from per-program partial sums, never with float atomics (the interpreter
    runs programs in order, so this test bites on a GPU run: DS_SFT_GPU_TESTS=1)."""
    x, weight, grad_y = _inputs((123, 576), torch.float32, device, seed=3)
    grads = []
    for _ in range(2):
        (x1, w1) = _leaves(x, weight)
        triton_rms_norm(x1, w1, 1e-6).backward(grad_y)
        grads.append((x1.grad, w1.grad))
    assert torch.equal(grads[0][1], grads[1][1])
    assert torch.equal(grads[0][0], grads[1][0])


def test_non_contiguous_input(device):
    x = _inputs((64, 10), torch.float32, device, seed=4)[0]
    weight = _inputs((64,), torch.float32, device, seed=5)[1]
    x_t = x.t()  # [10, 64] with strides (1, 10)
    y = triton_rms_norm(x_t, weight, 1e-6)
    torch.testing.assert_close(y, rms_norm_reference(x_t, weight, 1e-6), atol=1e-5, rtol=1e-5)
