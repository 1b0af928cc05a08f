"""fp8 on CPU: the torch-path linear against a quantize-dequantize reference, its dequantized GEMM
against ``torch._scaled_mm`` (which runs on CPU at small sizes), delayed scaling against a
hand-rolled amax window, fp8 state in checkpoints and evaluation, a tiny model trained in fp8 vs
bf16, mode resolution, the roofline that selects layers, and the Transformer Engine wiring against a
stand-in ``transformer_engine`` package (the real one cannot be imported without CUDA)."""

from __future__ import annotations

import builtins
import contextlib
import copy
import dataclasses
import enum
import io
import os
import pickle
import sys
import types
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ds_sft.errors import UserError
from ds_sft.model import fp8
from ds_sft.model.config import ModelConfig
from ds_sft.model.fp8 import Float8Linear, Fp8Recipe, apply_fp8, decode_te_extra_state, fp8_autocast
from ds_sft.model.llama import LlamaModel

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def quantize_dequantize(t: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """The reference: scale, saturate, round to fp8, and back to fp32 by division."""
    fp8_max = torch.finfo(dtype).max
    return (t.double() * scale).clamp(-fp8_max, fp8_max).to(dtype).double() / scale


def tiny_model(seed: int = 0) -> LlamaModel:
    torch.manual_seed(seed)
    return LlamaModel(ModelConfig.preset("tiny", kernels="eager"))


# ----------------------------------------------------------------------------- the torch-path linear


@pytest.mark.parametrize("fmt,grad_dtype", [("HYBRID", E5M2), ("E4M3", E4M3)])
@pytest.mark.parametrize("shape", [(2, 8, 64, 32), (3, 5, 48, 16)])  # (batch, seq, in, out); 15 tokens too
def test_forward_and_backward_match_quantize_dequantize_reference(fmt, grad_dtype, shape):
    B, T, K, N = shape
    torch.manual_seed(0)
    layer = Float8Linear(nn.Linear(K, N, bias=False), Fp8Recipe(format=fmt))
    # Deliberately awkward scales; the input's saturates its largest values (|x| * 37 > 448 for |x| > 12).
    scales = {"x": 37.0, "w": 3000.5, "g": 0.75}
    layer.fp8_scale.copy_(torch.tensor([scales["x"], scales["w"], scales["g"]]))
    x = (torch.randn(B, T, K) * 4).requires_grad_()
    grad_y = torch.randn(B, T, N) * 100

    y = layer(x)
    y.backward(grad_y)

    xq = quantize_dequantize(x.detach().reshape(-1, K), scales["x"], E4M3)
    wq = quantize_dequantize(layer.weight.detach(), scales["w"], E4M3)
    gq = quantize_dequantize(grad_y.reshape(-1, N), scales["g"], grad_dtype)
    assert (x.abs() * scales["x"] > 448).any(), "the test should exercise saturation"
    assert_matmul_of(y.reshape(-1, N), xq, wq.T)
    assert_matmul_of(x.grad.reshape(-1, K), gq, wq)
    assert_matmul_of(layer.weight.grad, gq.T, xq)


def assert_matmul_of(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bits: int = 23) -> None:
    """``out`` is ``a @ b`` (fp8-exact operands) up to an accumulator that keeps ``bits`` bits after
    the point: |err| <= K 2^-bits (|a| @ |b|). fp32 keeps 23. The product it is held to is computed in
    float64, so its own rounding takes none of the bound."""
    a, b = a.double(), b.double()
    exact, bound = a @ b, a.shape[1] * 2.0**-bits * (a.abs() @ b.abs())
    error = (out.double() - exact).abs()
    assert (error <= bound + 1e-30).all(), f"max error {error.max():.3g} exceeds the {bits}-bit bound"


# Hopper's fp8 tensor cores add their products in a narrower accumulator than fp32, about 13 bits
# after the point, truncating (DeepSeek-V3 report, section 3.3.2, measured ~14 bits on H800). Without
# fast accumulation (the gradients' GEMMs) cuBLAS moves partial sums into fp32 as it goes, which only
# tightens this. Errors of the kind the check is
# for stay far outside it: for these operands the gradient cast to e4m3 instead of e5m2, the input's
# scale doubled, or the weight left unquantized, each give 15 to 33 times the bound (CPU, float64).
HOPPER_FP8_ACCUMULATOR_BITS = 13


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))],
)
def test_scaled_mm_forward_and_backward_match_the_reference(device):
    """torch._scaled_mm itself (row-major x column-major operands on CUDA), in every GEMM of the
    layer. On CPU it is fp32 matmuls of the dequantized operands: the same check, to the fp32 bound."""
    if device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("torch._scaled_mm needs compute capability >= 8.9")
    torch.manual_seed(0)
    layer = Float8Linear(nn.Linear(64, 32, bias=False), Fp8Recipe()).to(device)
    if device == "cpu":
        layer.scaled_mm = True  # CUDA picks it by itself: asserted below
    layer.fp8_scale.copy_(torch.tensor([37.0, 3000.5, 0.75]))
    x = (torch.randn(2, 16, 64, device=device) * 4).requires_grad_()
    grad_y = torch.randn(2, 16, 32, device=device) * 100
    y = layer(x)
    y.backward(grad_y)
    assert layer.uses_scaled_mm(x.device)
    xq = quantize_dequantize(x.detach().reshape(-1, 64), 37.0, E4M3)
    wq = quantize_dequantize(layer.weight.detach(), 3000.5, E4M3)
    gq = quantize_dequantize(grad_y.reshape(-1, 32), 0.75, E5M2)
    bits = HOPPER_FP8_ACCUMULATOR_BITS if device == "cuda" else 23
    assert_matmul_of(y.detach().reshape(-1, 32), xq, wq.T, bits)
    assert_matmul_of(x.grad.reshape(-1, 64), gq, wq, bits)
    assert_matmul_of(layer.weight.grad, gq.T, xq, bits)


def test_scaled_mm_gets_each_scale_in_an_allocation_of_its_own(monkeypatch):
    """cuBLASLt reads the scales through their pointers and refused (CUBLAS_STATUS_NOT_SUPPORTED, on an
    H200) a scale that was the second element of a two-element tensor, 4 bytes into its storage: every
    scale and operand ``torch._scaled_mm`` is handed starts its own storage."""
    handed = []
    scaled_mm = torch._scaled_mm

    def recording(a, b, *, scale_a, scale_b, **kwargs):
        handed.append({"a": a, "b": b, "scale_a": scale_a, "scale_b": scale_b})
        return scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", recording)
    layer = Float8Linear(nn.Linear(64, 32, bias=False), Fp8Recipe(amax_history_len=4))
    layer.scaled_mm = True
    for _ in range(2):  # a fresh layer, then one whose scaling state has stepped
        x = torch.randn(16, 64, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        y.backward(torch.randn_like(y))
    assert len(handed) == 6  # forward, input and weight gradients, twice
    for call in handed:
        for name, tensor in call.items():
            assert tensor.storage_offset() == 0, (name, tensor.storage_offset())
            assert tensor.data_ptr() % 16 == 0, name


def test_only_the_forward_gemm_accumulates_fast(monkeypatch):
    """The forward GEMM sums a layer's width of e4m3 products in the tensor cores' fast accumulator;
    the gradients' GEMMs (the weight gradient's sums the token count's e5m2 products) move their
    partial sums into fp32 (Transformer Engine's and torchao's choice). CPU's _scaled_mm takes the
    flag and ignores it."""
    handed = []
    scaled_mm = torch._scaled_mm

    def recording(*args, use_fast_accum=False, **kwargs):
        handed.append(use_fast_accum)
        return scaled_mm(*args, use_fast_accum=use_fast_accum, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", recording)
    layer = Float8Linear(nn.Linear(64, 32, bias=False), Fp8Recipe(amax_history_len=4))
    layer.scaled_mm = True
    x = torch.randn(16, 64, requires_grad=True)
    layer(x).backward(torch.randn(16, 32))
    assert handed == [True, False, False]  # forward, input gradient, weight gradient


def grid_inputs(dtype: torch.dtype) -> torch.Tensor:
    """Every finite bf16 value, fp32 values over 20 binades and the format's edges, within its range."""
    fp8_max = torch.finfo(dtype).max
    every_bf16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(200_000, generator=g) * torch.logspace(-8, 4, 200_000, base=2.0)
    tiny = torch.finfo(dtype).tiny
    edges = torch.tensor(
        [0.0, -0.0, fp8_max, tiny, tiny / 2, tiny / 8 * 1.5, tiny / 16, 1.0625, 1.1875, 3.75]
    )
    values = torch.cat([every_bf16[torch.isfinite(every_bf16)], spread, edges, -edges])
    return values.clamp(-fp8_max, fp8_max)


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_fp8_grid_rounds_exactly_like_the_fp8_cast(dtype):
    values = grid_inputs(dtype)
    expected = values.to(dtype).float()
    got = fp8.fp8_grid(values.clone(), dtype)
    assert torch.equal(got, expected)
    assert torch.equal(torch.signbit(got), torch.signbit(expected))  # -0.0 stays -0.0


def twin_layers(k: int, n: int, dtype: torch.dtype, fmt: str) -> tuple[Float8Linear, Float8Linear]:
    """Two identical layers with awkward scales: one on torch._scaled_mm, one dequantized."""
    layers = []
    for scaled_mm in (True, False):
        torch.manual_seed(k + n)
        recipe = Fp8Recipe(format=fmt, amax_history_len=4)
        layer = Float8Linear(nn.Linear(k, n, bias=False, dtype=dtype), recipe)
        layer.fp8_scale.copy_(torch.tensor([37.0, 3000.5, 0.75]))
        layer.scaled_mm = scaled_mm
        layers.append(layer)
    return layers[0], layers[1]


# (param dtype, input dtype, autocast dtype or None): fp32 throughout, bf16 autocast over fp32
# master weights (the trainer without DeepSpeed), bf16 weights and inputs (DeepSpeed's bf16 engine).
DTYPES = [
    (torch.float32, torch.float32, None),
    (torch.float32, torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16, None),
]


@pytest.fixture
def cuda_scaled_mm_rules(monkeypatch):
    """``torch._scaled_mm`` refusing, as on CUDA, what CPU's accepts: the checks of the CUDA branch of
    torch 2.11's ``_check_scaled_mm_sizes`` (torch/_meta_registrations.py) for tensorwise scales, plus
    Blas.cpp's refusal of two e5m2 operands."""
    real = torch._scaled_mm

    def checked(a, b, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None, use_fast_accum=False):
        assert a.dim() == b.dim() == 2 and {a.dtype, b.dtype} <= {E4M3, E5M2}
        assert not (a.dtype == b.dtype == E5M2), "Multiplication of two Float8_e5m2 matrices is not supported"
        assert a.stride(0) > a.stride(1) == 1, f"self must be row_major, got stride {a.stride()}"
        assert b.stride(0) == 1 < b.stride(1), f"mat2 must be col_major, got stride {b.stride()}"
        assert a.size(1) % 16 == 0, f"Expected self.size(1) to be divisible by 16, but got {a.size(1)}"
        assert b.size(0) % 16 == b.size(1) % 16 == 0, (
            f"Expected both dimensions of mat2 divisible by 16: {b.shape}"
        )
        assert scale_a.numel() == scale_b.numel() == 1 and scale_a.dtype == scale_b.dtype == torch.float32
        return real(a, b, scale_a, scale_b, bias, scale_result, out_dtype, use_fast_accum)

    monkeypatch.setattr(torch, "_scaled_mm", checked)


@pytest.mark.parametrize("fmt", ["HYBRID", "E4M3"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=["fp32", "autocast-bf16", "bf16"])
@pytest.mark.parametrize("shape", [(2, 8, 64, 32), (3, 5, 48, 16), (1, 33, 96, 80), (4, 16, 16, 128)])
@pytest.mark.usefixtures("cuda_scaled_mm_rules")
def test_dequantized_gemm_matches_scaled_mm(fmt, dtypes, shape):
    """Forward and both gradients of the dequantized path equal torch._scaled_mm's, up to the one
    rounding of a wider output (fp32 gradients of a bf16 computation) and fp32 summation order; every
    _scaled_mm call is one CUDA would take, whatever the token count (15 and 33 here)."""
    assert_scaled_mm_matches_dequantized(fmt, dtypes, shape)


@settings(
    max_examples=40,
    suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture],
)
@given(
    tokens=st.integers(1, 70),
    k=st.sampled_from([16, 48, 96]),
    n=st.sampled_from([16, 32, 80]),
    fmt=st.sampled_from(["HYBRID", "E4M3"]),
    dtypes=st.sampled_from(DTYPES),
)
@pytest.mark.usefixtures("cuda_scaled_mm_rules")  # stateless: shared by the examples
def test_any_token_count_runs_on_fp8_tensor_cores(tokens, k, n, fmt, dtypes):
    """cuBLAS wants the weight gradient's inner dimension, the token count, a multiple of 16 too: every
    count trains (zero tokens pad it, and change nothing of the result or the scaling state)."""
    assert_scaled_mm_matches_dequantized(fmt, dtypes, (1, tokens, k, n))


def assert_scaled_mm_matches_dequantized(fmt, dtypes, shape):
    B, T, K, N = shape
    param_dtype, input_dtype, autocast = dtypes
    reference, dequantized = twin_layers(K, N, param_dtype, fmt)
    x = (torch.randn(B, T, K) * 4).to(input_dtype)
    grad_y = torch.randn(B, T, N) * 100
    outputs = []
    for layer in (reference, dequantized):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            y = layer(xi)
        y.backward(grad_y.to(y.dtype))
        outputs.append((y, xi.grad, layer.weight.grad))
        layer(x)  # a second step: the scales move from the first step's amaxes
    compute = autocast or input_dtype
    # One bf16 ulp (a sum that lands next to a rounding boundary may round the other way after
    # another summation order; CPU's _scaled_mm sums in fp32 too) / a few fp32 ulps.
    tolerance = 2.0**-7 if compute == torch.bfloat16 else 2.0**-20
    for name, want, got in zip(("y", "grad x", "grad w"), *outputs, strict=True):
        assert got.dtype == want.dtype, name
        error = (got.double() - want.double()).abs()
        bound = tolerance * want.double().abs() + 1e-6 * want.double().abs().max()
        assert (error <= bound).all(), f"{name}: max error {error.max():.3g}"
    for buffer in ("fp8_scale", "fp8_amax_history"):
        assert torch.equal(getattr(reference, buffer), getattr(dequantized, buffer)), buffer


def test_dequantized_gemm_is_the_default_without_fp8_tensor_cores():
    layer = Float8Linear(nn.Linear(16, 16, bias=False), Fp8Recipe())
    assert not layer.uses_scaled_mm(torch.device("cpu"))
    layer.scaled_mm = True
    assert layer.uses_scaled_mm(torch.device("cpu"))


def test_evaluation_leaves_the_scaling_state_alone():
    """Only training steps (module.training and grad mode on) advance the amax history."""
    torch.manual_seed(0)
    model = apply_fp8(tiny_model(), "torch", Fp8Recipe(amax_history_len=4))
    ids = torch.randint(0, 256, (2, 16))
    model.train()
    model(ids, labels=ids).backward()  # one step: the history holds amaxes, the scales are fresh

    def state():
        return {name: b.clone() for name, b in model.named_buffers() if "fp8" in name}

    before = state()
    with torch.no_grad():  # the evaluator's way: train mode, no grad
        logits_no_grad = model(ids)
    model.eval()  # and eval mode with grad on (as generation code may run)
    logits_eval = model(ids)
    model(ids, labels=ids).backward()
    after = state()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    torch.testing.assert_close(logits_no_grad, logits_eval)
    model.train()
    model(ids, labels=ids).backward()
    assert any(not torch.equal(before[name], b) for name, b in state().items())


def test_output_follows_autocast_dtype_and_rounds_once():
    torch.manual_seed(1)
    layer = Float8Linear(nn.Linear(32, 16, bias=False), Fp8Recipe())
    x = torch.randn(16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    reference = quantize_dequantize(x, 1.0, E4M3) @ quantize_dequantize(layer.weight.detach(), 1.0, E4M3).T
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, reference.float().to(torch.bfloat16))


def hand_rolled_scales(amaxes, history_len, algo, margin, fp8_max=448.0):
    """The scale each step leaves for the next, per TE's DelayedScaling: from the window of the last
    ``history_len`` amaxes; an all-zero tensor (amax 0) changes nothing."""
    scales, scale, seen = [], 1.0, []
    for amax in amaxes:
        if amax > 0:
            seen.append(amax)
            scale = fp8_max / (max(seen[-history_len:]) if algo == "max" else amax) / 2**margin
        scales.append(scale)
    return scales


@pytest.mark.parametrize(
    "history_len,algo,margin", [(3, "max", 0), (3, "max", 2), (1, "max", 0), (4, "most_recent", 1)]
)
def test_scales_follow_the_amax_history(history_len, algo, margin):
    layer = Float8Linear(
        nn.Linear(16, 16, bias=False),
        Fp8Recipe(amax_history_len=history_len, amax_compute_algo=algo, margin=margin),
    )
    amaxes = [2.0, 8.0, 1.0, 0.5, 0.0, 0.25, 4.0, 0.125, 0.125, 0.125]
    used = []
    for amax in amaxes:
        x = torch.zeros(16, 16)
        x[3, 5] = -amax
        layer(x)
        used.append(layer.fp8_scale[0].item())  # the scale this step's cast used
    # Delayed: every step casts with the scale the previous steps left behind, the first with 1.0.
    expected = hand_rolled_scales(amaxes, history_len, algo, margin)
    assert used == pytest.approx([1.0] + expected[:-1], rel=1e-6)
    weight_amax = layer.weight.detach().abs().max().item()
    assert layer.fp8_scale[1].item() == pytest.approx(448.0 / weight_amax / 2**margin, rel=1e-6)


def test_first_cast_uses_the_delayed_scale_not_the_current_amax():
    layer = Float8Linear(nn.Linear(16, 16, bias=False), Fp8Recipe())
    x = torch.full((16, 16), 1000.0)  # would need scale 0.448; scale 1.0 saturates it to 448
    y = layer(x)
    expected = quantize_dequantize(x, 1.0, E4M3) @ quantize_dequantize(layer.weight.detach(), 1.0, E4M3).T
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-5)


def test_activation_checkpointing_steps_the_scaling_state_once():
    plain, checkpointed = tiny_model(), tiny_model()
    checkpointed.config.activation_checkpointing = True
    ids = torch.randint(0, 256, (2, 16))
    for model in (plain, checkpointed):
        apply_fp8(model, "torch", Fp8Recipe(amax_history_len=4)).train()
        for _ in range(2):
            model(ids, labels=ids).backward()
    for (name, a), (_, b) in zip(plain.named_buffers(), checkpointed.named_buffers(), strict=True):
        if "fp8" in name:
            torch.testing.assert_close(a, b, msg=name)


# ----------------------------------------------------------------------------- launches per step


class OneColumnAtATime:
    """The reference: the scaling state and casts as the layer computed them before its columns
    stepped together -- each cast its own step, amax by ``aminmax``, ``fp8_max / amax``, history
    rolled with ``where`` and row 0 zeroed -- on copies of a layer's buffers."""

    def __init__(self, layer: Float8Linear) -> None:
        self.recipe = layer.recipe
        self.history, self.scale = layer.fp8_amax_history.clone(), layer.fp8_scale.clone()

    def step(self, column: int, fp8_max: float) -> None:
        history = self.history[:, column]
        recorded = history[0] > 0
        amax = history.max() if self.recipe.amax_compute_algo == "max" else history[0]
        new_scale = fp8_max / amax / 2**self.recipe.margin
        usable = recorded & torch.isfinite(amax)
        self.scale[column] = torch.where(usable, new_scale, self.scale[column])
        history.copy_(torch.where(recorded, history.roll(-1), history))
        history[0] = 0

    def cast(self, t: torch.Tensor, column: int, held_in: torch.dtype | None):
        dtype = self.recipe.grad_dtype if column == fp8.GRAD else E4M3
        fp8_max = torch.finfo(dtype).max
        self.step(column, fp8_max)
        scale = self.scale[column]
        scaled = (t.float() * scale).clamp(-fp8_max, fp8_max)
        t8 = scaled.to(dtype) if held_in is None else fp8.fp8_grid(scaled, dtype).to(held_in)
        low, high = torch.aminmax(t)
        self.history[0, column] = torch.maximum(-low, high).float()
        return t8, scale.reciprocal()

    def train_step(self, x, weight, grad_y, compute_dtype, scaled_mm: bool):
        """``y``, ``dX``, ``dW`` of one training step (the GEMMs and the fp8 grid are the module's own)."""
        held_in = None if scaled_mm else compute_dtype
        x2d, g2d = x.reshape(-1, x.shape[-1]), grad_y.reshape(-1, grad_y.shape[-1])
        tokens = len(x2d)
        rows = -(-tokens // 16) * 16 if scaled_mm else tokens
        x8, x_inv = self.cast(nn.functional.pad(x2d, (0, 0, 0, rows - tokens)), fp8.INPUT, held_in)
        w8, w_inv = self.cast(weight, fp8.WEIGHT, held_in)
        g8, g_inv = self.cast(nn.functional.pad(g2d, (0, 0, 0, rows - tokens)), fp8.GRAD, held_in)
        mm = fp8._scaled_mm if scaled_mm else fp8._dequantized_mm
        with torch.autocast("cpu", dtype=compute_dtype, enabled=compute_dtype != x.dtype):
            y = mm(x8, w8.t(), x_inv, w_inv, compute_dtype)[:tokens]
        grad_x = mm(g8, w8, g_inv, w_inv, x.dtype)[:tokens]
        grad_w = mm(g8.t(), x8, g_inv, x_inv, weight.dtype)
        return y.reshape(grad_y.shape), grad_x.reshape(x.shape), grad_w


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, where a NaN equals any NaN (its sign and payload mean nothing: compiled code
    propagates another one than eager does)."""
    nan = a.isnan()
    return a.dtype == b.dtype and torch.equal(nan, b.isnan()) and torch.equal(bits(a)[~nan], bits(b)[~nan])


def steps_of_inputs(k: int, n: int, dtype: torch.dtype):
    """Six steps' (input, output gradient): magnitudes that move the scales, an all-zero input and
    gradient (nothing recorded), an input that overflows (amax inf) and a gradient with a NaN."""
    g = torch.Generator().manual_seed(k * n)
    for step, (x_size, g_size) in enumerate([(4, 100), (0.01, 3), (0, 0), (1, 1e4), (100, 0.5), (1, 1)]):
        x, grad_y = torch.randn(2, 7, k, generator=g) * x_size, torch.randn(2, 7, n, generator=g) * g_size
        if step == 3:
            x[1, 2, 3], grad_y[0, 5, 1] = float("inf"), float("nan")
        yield step, x.to(dtype), grad_y


def assert_trains_bit_for_bit_like_one_column_at_a_time(layer: Float8Linear, dtypes) -> None:
    """Six training steps of ``layer`` (``steps_of_inputs``) against :class:`OneColumnAtATime` on
    copies of its state: outputs, both gradients, scales and amax histories equal bit for bit after
    every step -- except row 0's amax of an all-zero or NaN tensor, which aminmax made -0.0 or -NaN
    and the cast records as +0.0 or NaN: a value no step reads as an amax (row 0 not > 0: nothing was
    recorded) and the next cast overwrites."""
    _, input_dtype, autocast = dtypes
    reference = OneColumnAtATime(layer)
    weight = layer.weight.detach().clone()
    compute = autocast or input_dtype
    for step, x, grad_y in steps_of_inputs(layer.in_features, layer.out_features, input_dtype):
        x.requires_grad_()
        layer.weight.grad = None
        with torch.autocast("cpu", dtype=compute, enabled=autocast is not None):
            y = layer(x)
        y.backward(grad_y.to(y.dtype))
        want = reference.train_step(x.detach(), weight, grad_y.to(compute), compute, layer.scaled_mm)
        got = (y, x.grad, layer.weight.grad)
        for name, have, expected in zip(("y", "grad x", "grad w"), got, want, strict=True):
            assert same_bits(have, expected), (step, name)
        assert same_bits(layer.fp8_scale, reference.scale), step
        history, expected_history = layer.fp8_amax_history, reference.history
        assert same_bits(history[1:], expected_history[1:]), step
        torch.testing.assert_close(history[0], expected_history[0], rtol=0, atol=0, equal_nan=True)
        with torch.no_grad():  # an optimizer step: the weight's amax moves too
            layer.weight.mul_(1.5 - step % 2)
            weight.mul_(1.5 - step % 2)


def fp8_layer(k: int, n: int, recipe: Fp8Recipe, param_dtype: torch.dtype, scaled_mm: bool, seed: int):
    torch.manual_seed(seed)
    layer = Float8Linear(nn.Linear(k, n, bias=False, dtype=param_dtype), recipe).train()
    layer.scaled_mm = scaled_mm
    return layer


@pytest.mark.parametrize("scaled_mm", [True, False], ids=["scaled_mm", "dequantized"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=["fp32", "autocast-bf16", "bf16"])
@pytest.mark.parametrize("fmt", ["HYBRID", "E4M3"])
@pytest.mark.parametrize("history_len", [1, 4, 1024])
@pytest.mark.parametrize("algo", ["max", "most_recent"])
@pytest.mark.parametrize("margin", [0, 2])
def test_columns_stepped_together_train_bit_for_bit_like_one_at_a_time(
    scaled_mm, dtypes, fmt, history_len, algo, margin
):
    recipe = Fp8Recipe(format=fmt, amax_history_len=history_len, amax_compute_algo=algo, margin=margin)
    layer = fp8_layer(32, 16, recipe, dtypes[0], scaled_mm, seed=history_len + margin)
    assert_trains_bit_for_bit_like_one_column_at_a_time(layer, dtypes)  # eager casts: the CPU default


# ----------------------------------------------------------------------------- compiled casts


@pytest.fixture
def compile_counters(monkeypatch):
    """Dynamo from scratch, failing loudly where the casts would fall back to eager (the recompile
    limit; a failed compile); yields its counters (``stats/unique_graphs``: graphs compiled)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(fp8, "_COMPILE_FAILURE", None)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield torch._dynamo.utils.counters
    assert fp8._COMPILE_FAILURE is None, f"the casts did not compile: {fp8._COMPILE_FAILURE}"
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "dtypes, fmt, history_len, algo, margin",
    [
        (DTYPES[0], "HYBRID", 4, "max", 0),
        (DTYPES[1], "HYBRID", 1024, "max", 0),
        (DTYPES[2], "HYBRID", 4, "most_recent", 2),
        (DTYPES[2], "E4M3", 1, "max", 0),
    ],
    ids=["fp32", "autocast-bf16", "bf16-most_recent-margin", "bf16-E4M3-history_1"],
)
def test_compiled_casts_train_bit_for_bit_like_one_column_at_a_time(
    dtypes, fmt, history_len, algo, margin, compile_counters
):
    """The casts inductor compiles (as on a GPU with fp8 tensor cores) give the eager reference's
    outputs, gradients and scaling state bit for bit, through zeros, an inf input and a NaN
    gradient (fullgraph: a graph break raises; so would a fallback to eager at the recompile limit)."""
    recipe = Fp8Recipe(format=fmt, amax_history_len=history_len, amax_compute_algo=algo, margin=margin)
    layer = fp8_layer(48, 32, recipe, dtypes[0], scaled_mm=True, seed=history_len + margin)
    layer.compiled_casts = True
    assert_trains_bit_for_bit_like_one_column_at_a_time(layer, dtypes)
    assert compile_counters["stats"]["unique_graphs"] == 2  # the forward's casts, the gradient's


def test_training_casts_compile_by_default_on_fp8_tensor_cores_only(monkeypatch):
    """``compiled_casts`` None: compiled where there are fp8 tensor cores (a GPU, faked here), eager
    elsewhere even where ``torch._scaled_mm`` is forced (CPU tests count its kernels, under dispatch
    modes dynamo refuses); True or False wins; evaluation casts stay eager."""
    used = []

    def spy():
        return lambda *args: used.append(args[4]) or fp8._scale_and_cast(*args)

    monkeypatch.setattr(fp8, "_compiled_scale_and_cast", spy)
    x = torch.randn(16, 32)
    cases = [  # (fp8 tensor cores, scaled_mm, compiled_casts): compiled
        ((False, None, None), False),
        ((False, True, None), False),
        ((True, True, None), True),
        ((True, True, False), False),
        ((False, None, True), True),
    ]
    for (tensor_cores, scaled_mm, compiled_casts), compiled in cases:
        monkeypatch.setattr(fp8, "has_fp8_tensor_cores", lambda device, answer=tensor_cores: answer)
        layer = fp8_layer(32, 16, Fp8Recipe(amax_history_len=4), torch.float32, scaled_mm, seed=0)
        layer.compiled_casts = compiled_casts
        used.clear()
        layer(x.requires_grad_()).sum().backward()
        assert used == ([True, True] if compiled else []), (tensor_cores, scaled_mm, compiled_casts)
        used.clear()
        with torch.no_grad():
            layer.eval()(x)
        assert used == [], "an evaluation cast records nothing: eager"


def test_a_cast_that_fails_to_compile_runs_eager_and_says_so_once(monkeypatch, caplog):
    """A GPU without a working Triton, or a torch whose inductor miscompiles (torch 2.11's C++
    backend did, for an earlier version of these casts): the casts run eager -- the same numbers as
    an eager twin, not a crashed run -- after one warning; compiling is not tried again."""

    class CompileFailed(torch._dynamo.exc.TorchDynamoException):
        pass

    attempts = []

    def failing_compile():
        def compiled(*args):
            attempts.append(1)
            raise CompileFailed("CppCompileError: C++ compile error\n(the compiler's output)")

        return compiled

    monkeypatch.setattr(fp8, "_compiled_scale_and_cast", failing_compile)
    monkeypatch.setattr(fp8, "_COMPILE_FAILURE", None)
    layers = {}
    for compiled in (True, False):
        layers[compiled] = fp8_layer(32, 16, Fp8Recipe(amax_history_len=4), torch.float32, True, seed=0)
        layers[compiled].compiled_casts = compiled
    for step in range(3):
        x = torch.randn(16, 32, generator=torch.Generator().manual_seed(step)) * 3**step
        outputs = []
        for layer in layers.values():
            with caplog.at_level("WARNING", logger="ds_sft.model.fp8"):
                y = layer(x.requires_grad_())
            y.sum().backward()
            outputs.append((y, layer.weight.grad, layer.fp8_scale, layer.fp8_amax_history))
        for a, b in zip(*outputs, strict=True):
            assert torch.equal(a, b), step
    assert len(attempts) == 1
    warnings = [r.getMessage() for r in caplog.records if "compiling the casts failed" in r.getMessage()]
    assert len(warnings) == 1 and "CompileFailed: CppCompileError: C++ compile error" in warnings[0]
    assert "(the compiler's output)" not in warnings[0]  # one line


def test_one_set_of_compiled_casts_serves_every_layer_and_batch_shape(compile_counters):
    """A model's projections differ in width, its batches in tokens: compiled with dynamic shapes, a
    handful of graphs serve them all (the forward's casts and the gradient's; a token count equal to a
    width at first adds one, as does an input dtype that differs between layers: fp32 after the
    norms, bf16 into down_proj under autocast), no later batch shape compiles again, and training and
    evaluation (eager casts) are bit for bit the eager model's."""
    models = {}
    for compiled in (False, True):
        models[compiled] = apply_fp8(tiny_model(), "torch", Fp8Recipe(amax_history_len=4))
        for layer in fp8_layers(models[compiled]):
            layer.scaled_mm, layer.compiled_casts = True, compiled
    optimizers = {key: torch.optim.AdamW(m.parameters(), lr=1e-3) for key, m in models.items()}
    shapes = [(2, 16), (3, 24), (1, 40), (4, 12), (2, 33)]  # 32 tokens first: the k/v width
    for step, (batch, seq) in enumerate(shapes):
        ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(step))
        losses = {}
        # after the first step and evaluation every later shape must reuse what was compiled
        no_recompile = torch._dynamo.config.patch(error_on_recompile=step > 0)
        with no_recompile, torch.autocast("cpu", dtype=torch.bfloat16):
            for key, model in models.items():
                model.train()
                loss = model(ids, labels=ids)
                loss.backward()
                optimizers[key].step()
                optimizers[key].zero_grad()
                with torch.no_grad():
                    losses[key] = (loss, model.eval()(ids, labels=ids))
        assert torch.equal(torch.stack(losses[True]), torch.stack(losses[False])), step
        if step == 0:
            graphs = compile_counters["stats"]["unique_graphs"]
    assert 2 <= graphs <= 6, graphs
    for (name, eager), compiled in zip(
        models[False].state_dict().items(), models[True].state_dict().values(), strict=True
    ):
        assert torch.equal(eager, compiled), name


CUDA_FP8 = pytest.param(
    "cuda",
    marks=pytest.mark.skipif(
        not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
        reason="needs a GPU with fp8 tensor cores (compute capability >= 8.9)",
    ),
)


@pytest.mark.parametrize("device", ["cpu", CUDA_FP8])
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("scale", [1.0, 0.125, 37.5, 4096.0])
def test_compiled_cast_rounds_every_value_like_the_eager_cast(device, dtype, scale, compile_counters):
    """Every finite bf16 value and 200k fp32 values over 20 binades (``grid_inputs``), scaled into
    fp8's subnormals, normals and past its maximum (saturated): the compiled cast (inductor's C++ on
    CPU, Triton on CUDA) rounds each as the eager cast does, and records the same amax."""
    values = (grid_inputs(dtype) / torch.finfo(dtype).max * 448.0).to(device)
    for t in (values, values.bfloat16()):
        casts = []
        for scale_and_cast in (fp8._scale_and_cast, fp8._compiled_scale_and_cast()):
            history = torch.zeros(4, 3, device=device)
            history[0, fp8.GRAD] = 448.0 / scale  # the scale steps to fp8_max / 448 * scale
            scales = torch.ones(3, device=device)
            (t8,), (inverse,) = scale_and_cast((t,), history, scales, fp8.GRAD, True, dtype, None, 0, True)
            casts.append((t8.view(torch.uint8), inverse, history, scales))
        for eager, compiled in zip(*casts, strict=True):
            assert torch.equal(eager, compiled)
    assert compile_counters["stats"]["unique_graphs"] >= 1


@pytest.mark.parametrize("device", ["cpu", CUDA_FP8])
def test_compiled_casts_train_a_layer_on_its_device_like_eager_casts(device, compile_counters):
    """On its device's GEMM path (``torch._scaled_mm`` on CUDA): the layer with compiled casts and its
    eager twin give the same outputs, gradients and scaling state step after step, bit for bit (NaN
    payloads aside), in bf16 as DeepSpeed runs it."""
    eager = fp8_layer(48, 32, Fp8Recipe(amax_history_len=4), torch.bfloat16, scaled_mm=True, seed=0)
    eager = eager.to(device)
    compiled = copy.deepcopy(eager)
    eager.compiled_casts, compiled.compiled_casts = False, None if device == "cuda" else True
    for step, x, grad_y in steps_of_inputs(48, 32, torch.bfloat16):
        outcome = []
        for layer in (eager, compiled):
            x_layer = x.to(device).requires_grad_()
            layer.weight.grad = None
            y = layer(x_layer)
            y.backward(grad_y.to(device, y.dtype))
            outcome.append((y, x_layer.grad, layer.weight.grad, layer.fp8_scale, layer.fp8_amax_history))
        for name, a, b in zip(("y", "grad x", "grad w", "scale", "history"), *outcome, strict=True):
            assert same_bits(a, b), (step, name)
    assert compile_counters["stats"]["unique_graphs"] >= 2  # the compiled twin did compile


def test_compiled_casts_hand_each_inverse_scale_its_own_allocation(compile_counters):
    """cuBLASLt refused a scale 4 bytes into its storage (see the eager test above): the compiled
    casts' inverse scales start their own storage too."""
    layer = fp8_layer(64, 32, Fp8Recipe(amax_history_len=4), torch.float32, scaled_mm=True, seed=0)
    for record in (True, False):
        _, inverse = fp8._compiled_scale_and_cast()(
            (torch.randn(16, 64), layer.weight.detach()),
            layer.fp8_amax_history,
            layer.fp8_scale,
            fp8.INPUT,
            record,
            E4M3,
            None,
            0,
            True,
        )
        for scale in inverse:
            assert scale.storage_offset() == 0 and scale.data_ptr() % 16 == 0
        assert inverse[0].untyped_storage().data_ptr() != inverse[1].untyped_storage().data_ptr()


class KernelLaunches(TorchDispatchMode):
    """The ops that reach the device, by name: what runs under it, less views (which only re-describe
    memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def launches_per_step(recipe: Fp8Recipe) -> list[str]:
    """The kernels one training forward + backward of a 16 x 16 layer runs on the ``_scaled_mm`` path
    under bf16 autocast, after a step that recorded amaxes (so the scaling state steps)."""
    layer = Float8Linear(nn.Linear(16, 16, bias=False), recipe).train()
    layer.scaled_mm = True
    x, grad_y = torch.randn(16, 16, requires_grad=True), torch.randn(16, 16, dtype=torch.bfloat16)
    for mode in (contextlib.nullcontext(), KernelLaunches()):
        x.grad = layer.weight.grad = None
        with mode, torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
            y.backward(grad_y)
    return mode.ops


# Measured on torch 2.13 (CPU): 41 for the default recipe (3 GEMMs, 3 transposed copies, 3 casts of
# 4 ops -- amax, scale, saturate, round -- 3 inverse scales, 2 steps of 10); one column at a time it
# was 80. The margin leaves room for another torch version's decompositions, not for another op.
@pytest.mark.parametrize(
    "recipe,most",
    [
        (Fp8Recipe(), 41),
        (Fp8Recipe(margin=2), 43),  # the scale's division by 2**margin
        (Fp8Recipe(amax_compute_algo="most_recent"), 39),  # no max over the history
        (Fp8Recipe(amax_history_len=1), 35),  # no history to roll
    ],
    ids=["default", "margin", "most_recent", "history_1"],
)
def test_a_training_step_launches_half_the_kernels_it_did(recipe, most):
    ops = launches_per_step(recipe)
    print(f"{len(ops)} kernels: {' '.join(ops)}")
    assert len(ops) <= most + 2, f"{len(ops)} kernels per forward + backward (was at most {most}): {ops}"


def test_the_scaled_mm_path_compiles_whole_and_steps_as_eager():
    """``--compile --fp8 torch``: on an H200 every cast broke the graph (asking for the autograd graph
    task; then a strided ``out=``) and hit the recompile limit. The layer compiles whole, and three
    compiled training steps (aot_eager: dynamo's graph, its backward, functionalized buffer updates)
    give the eager layer's outputs, gradients and scaling state bit for bit."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = Float8Linear(nn.Linear(64, 32, bias=False), Fp8Recipe(amax_history_len=4)).train()
    twin = copy.deepcopy(eager)
    for layer in (eager, twin):
        layer.scaled_mm = True
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)  # fullgraph: a break raises
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        x = (torch.randn(16, 64, generator=generator) * 4**seed).requires_grad_()
        x_twin = x.detach().clone().requires_grad_()
        grad_y = torch.randn(16, 32, generator=generator, dtype=torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, y_twin = eager(x), compiled(x_twin)
        y.backward(grad_y)
        y_twin.backward(grad_y)
        assert torch.equal(y, y_twin)
        assert torch.equal(x.grad, x_twin.grad) and torch.equal(eager.weight.grad, twin.weight.grad)
        for name in ("fp8_amax_history", "fp8_scale"):
            assert torch.equal(getattr(eager, name), getattr(twin, name)), (seed, name)
    assert eager.fp8_scale.ne(1).all()  # the scales did step


# ----------------------------------------------------------------------------- replacement and state


def block_linears(model: LlamaModel) -> set[str]:
    """Names of every nn.Linear in the blocks: the projections fp8 swaps (not the LM head)."""
    linears = (name for name, m in model.named_modules() if isinstance(m, nn.Linear))
    return {name for name in linears if name.startswith("layers.")}


def test_apply_fp8_swaps_the_projections_and_keeps_parameters():
    model = tiny_model()
    weights = {name: p for name, p in model.named_parameters()}
    apply_fp8(model, "torch")
    swapped = {name for name, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert swapped == block_linears(tiny_model())
    # The very same Parameter objects: DeepSpeed shards them and optimizers keep their state.
    assert {name: p for name, p in model.named_parameters()} == weights
    assert apply_fp8(tiny_model(), "off").layers[0].attn.q_proj.__class__ is nn.Linear


def qwen2_tiny_model(seed: int = 0) -> LlamaModel:
    """Tiny, with q/k/v biases (the Qwen2 family), the biases drawn away from their zero init."""
    torch.manual_seed(seed)
    model = LlamaModel(ModelConfig.preset("tiny", kernels="eager", family="qwen2", attention_bias=True))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(std=0.5)
    return model


def test_a_biased_projection_adds_its_bias_to_the_fp8_product():
    torch.manual_seed(0)
    biased = nn.Linear(32, 16)
    layer = Float8Linear(biased, Fp8Recipe())
    assert layer.bias is biased.bias  # the same Parameter, as for the weight
    unbiased = Float8Linear(nn.Linear(32, 16, bias=False), Fp8Recipe())
    unbiased.weight = layer.weight
    x, grad_y = torch.randn(3, 5, 32), torch.randn(3, 5, 16)
    y = layer(x)
    y.backward(grad_y)
    torch.testing.assert_close(y, unbiased(x) + biased.bias, rtol=0, atol=0)
    torch.testing.assert_close(layer.bias.grad, grad_y.sum(dim=(0, 1)))
    assert set(layer.state_dict()) == {"weight", "bias", "fp8_amax_history", "fp8_scale"}


def test_torch_fp8_trains_a_model_with_attention_biases():
    """Qwen2-style q/k/v biases under --fp8 torch: kept, trained, and close to the bf16 model's output."""
    reference, model = qwen2_tiny_model(), apply_fp8(qwen2_tiny_model(), "torch")
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert biases == {f"layers.{i}.attn.{p}_proj.bias" for i in range(2) for p in "qkv"}
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        fp8_logits, logits = model(ids), reference(ids)
    assert (fp8_logits - logits).abs().max() < 0.1 * logits.abs().max()
    without_bias = {n: p.detach().clone() for n, p in model.named_parameters() if n in biases}
    with torch.no_grad():
        for name in biases:
            model.get_parameter(name).zero_()
        assert (model(ids) - fp8_logits).abs().max() > 1e-3  # the biases take part
        for name in biases:
            model.get_parameter(name).copy_(without_bias[name])
    model(ids, labels=ids.roll(-1, 1)).backward()
    assert all(model.get_parameter(name).grad.abs().sum() > 0 for name in biases)


def test_dimensions_not_multiple_of_16_are_refused():
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(64, 40, bias=False))
    with pytest.raises(UserError, match="q_proj is 64 -> 40"):
        apply_fp8(model, "torch")
    with pytest.raises(UserError, match="unknown"):
        apply_fp8(tiny_model(), "fp4")


@pytest.mark.parametrize("head_dim, n_heads, n_kv_heads", [(8, 4, 2), (32, 4, 1), (16, 3, 1), (128, 2, 2)])
def test_fp8_projections_are_as_wide_as_the_heads(head_dim, n_heads, n_kv_heads):
    """q/o are n_heads x head_dim wide, k/v n_kv_heads x head_dim, not d_model (Qwen3's head_dim)."""
    torch.manual_seed(0)
    heads = dict(head_dim=head_dim, n_heads=n_heads, n_kv_heads=n_kv_heads)
    config = ModelConfig.preset("tiny", kernels="eager", **heads)
    reference = LlamaModel(config)
    model = apply_fp8(copy.deepcopy(reference), "torch")
    assert model.layers[0].attn.o_proj.weight.shape == (64, n_heads * head_dim)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        fp8_logits, logits = model(ids), reference(ids)
    assert (fp8_logits - logits).abs().max() < 0.1 * logits.abs().max()


def test_fp8_refuses_heads_whose_widths_are_not_multiples_of_16():
    model = LlamaModel(ModelConfig.preset("tiny", kernels="eager", head_dim=6))  # q: 4 x 6 = 24
    with pytest.raises(UserError, match="q_proj is 64 -> 24"):
        apply_fp8(model, "torch")


def test_state_dict_round_trip_resumes_fp8_state():
    torch.manual_seed(0)
    model = apply_fp8(tiny_model(), "torch", Fp8Recipe(amax_history_len=8))
    ids = torch.randint(0, 256, (2, 16))
    for _ in range(3):
        model(ids, labels=ids).backward()
    state = model.state_dict()
    assert state["layers.0.attn.q_proj.fp8_scale"].dtype == torch.float32
    assert (state["layers.0.attn.q_proj.fp8_amax_history"] > 0).any()

    resumed = apply_fp8(tiny_model(seed=1), "torch", Fp8Recipe(amax_history_len=8))
    resumed.load_state_dict(state)
    fp8_buffers = {name: b for name, b in resumed.named_buffers() if "fp8" in name}
    assert len(fp8_buffers) == 2 * 14
    for name, buffer in fp8_buffers.items():
        assert torch.equal(buffer, state[name]), name
    assert torch.equal(resumed(ids), model(ids))


def test_a_whole_model_cast_leaves_the_scaling_state_fp32():
    """``model.to(torch.bfloat16)`` after the swap cast the fp32 scaling buffers too, and the next
    training step's cast failed ("Expected out tensor to have dtype torch.float32 but got
    torch.bfloat16", vector_norm's out=). The weights follow the cast, the scaling state keeps its
    dtype and values, and still follows the device."""
    torch.manual_seed(0)
    model = apply_fp8(tiny_model(), "torch", Fp8Recipe(amax_history_len=4))
    ids = torch.randint(0, 256, (2, 16))
    model(ids, labels=ids).backward()  # amaxes recorded: values bf16 would round
    state = {name: b.clone() for name, b in model.named_buffers() if "fp8" in name}
    model.to(torch.bfloat16)
    assert model.layers[0].attn.q_proj.weight.dtype == torch.bfloat16
    for name, buffer in model.named_buffers():
        if "fp8" in name:
            assert buffer.dtype == torch.float32 and torch.equal(buffer, state[name]), name
    model(ids, labels=ids).backward()  # a training step in bf16
    assert (model.layers[0].attn.q_proj.fp8_amax_history[0] > 0).all()
    model.to("meta")
    moved = {(b.device.type, b.dtype) for name, b in model.named_buffers() if "fp8" in name}
    assert moved == {("meta", torch.float32)}


def test_non_fp8_checkpoint_loads_into_fp8_model_with_fresh_state():
    base = tiny_model()
    model = apply_fp8(tiny_model(seed=1), "torch", Fp8Recipe(amax_history_len=8))
    model.load_state_dict(base.state_dict())  # strict: the fp8 buffers may be missing, nothing else
    assert torch.equal(model.layers[0].attn.q_proj.weight, base.layers[0].attn.q_proj.weight)
    assert torch.equal(model.layers[0].attn.q_proj.fp8_scale, torch.ones(3))
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({k: v for k, v in base.state_dict().items() if k != "norm.weight"})


def test_amax_history_of_another_length_is_cut_or_padded():
    long = Float8Linear(nn.Linear(16, 16, bias=False), Fp8Recipe(amax_history_len=6))
    long.fp8_amax_history.copy_(torch.arange(18.0).reshape(6, 3))
    short = Float8Linear(nn.Linear(16, 16, bias=False), Fp8Recipe(amax_history_len=4))
    short.load_state_dict(long.state_dict())
    assert torch.equal(short.fp8_amax_history, torch.arange(12.0).reshape(4, 3))
    long.load_state_dict(short.state_dict())
    assert torch.equal(long.fp8_amax_history[4:], torch.zeros(2, 3))


# ----------------------------------------------------------------------------- the recipe


def test_recipe_from_dict_validates_and_names_the_bad_key():
    section = {
        "format": "E4M3",
        "amax_history_len": 16,
        "amax_compute_algo": "most_recent",
        "margin": 1,
        "_comment": "ignored",
    }
    recipe = Fp8Recipe.from_dict(section)
    assert recipe == Fp8Recipe("E4M3", 16, "most_recent", 1)
    assert Fp8Recipe.from_dict({}) == Fp8Recipe("HYBRID", 1024, "max", 0)
    with pytest.raises(UserError, match="fp8.amax_histroy_len"):
        Fp8Recipe.from_dict({"amax_histroy_len": 4})
    bad_values = [("format", "E5M2"), ("amax_history_len", 0), ("amax_compute_algo", "mean"), ("margin", -1)]
    for key, bad in bad_values:
        with pytest.raises(UserError, match=f"fp8.{key} = "):
            Fp8Recipe.from_dict({key: bad})


# ----------------------------------------------------------------------------- training


def make_batches(steps: int, batch: int = 8, seq: int = 32, seed: int = 0):
    """Arithmetic progressions mod 256: learnable from the previous two tokens."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, 256, (batch, 1), generator=g)
        stride = torch.randint(1, 8, (batch, 1), generator=g)
        ids = (start + stride * torch.arange(seq + 1)) % 256
        yield ids[:, :-1], ids[:, 1:]


def train_losses(
    fp8_mode: str, steps: int = 50, scaled_mm: bool | None = None, lr: float = 3e-3
) -> list[float]:
    model = apply_fp8(tiny_model(), fp8_mode, Fp8Recipe(amax_history_len=16)).train()
    for layer in fp8_layers(model):
        layer.scaled_mm = scaled_mm
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for inputs, labels in make_batches(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(inputs, labels=labels) / labels.numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def fp8_layers(model: nn.Module) -> list[Float8Linear]:
    return [m for m in model.modules() if isinstance(m, Float8Linear)]


def _loss_and_gradient(model: nn.Module, inputs, labels) -> tuple[float, torch.Tensor]:
    """One bf16-autocast step's mean loss and every parameter's gradient, flattened into one vector."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(inputs, labels=labels) / labels.numel()
    loss.backward()
    return loss.item(), torch.cat([p.grad.float().flatten() for p in model.parameters()])


def test_tiny_model_losses_match_the_scaled_mm_path():
    """The dequantized GEMM (CPU default) computes what torch._scaled_mm itself computes (forced on CPU),
    at every step of a 20-step training (the _scaled_mm model's, lr 1e-3): on the same weights and fp8
    state, the loss within 1e-3 (measured: at most 2.1e-5, the first step exact) and the gradient 4x
    closer to _scaled_mm's than bf16 without fp8 is (measured: 1.1-1.6% of its norm against 4.2-6.0%;
    E4M3 gradients instead of e5m2 would land near bf16's).

    Each step starts both paths from the same state because fp8 training is chaotic: two separate
    runs drift apart from a rare last-bit difference (a changed amax moves a scale, which moves every
    rounding), and how fast depends on the CPU's kernels: 6.8e-4 in 20 steps on one machine, 1.1e-3 on
    another, where bf16 and _scaled_mm were 1.7e-3 apart.
    """
    models = {}
    for name, scaled_mm in (("scaled_mm", True), ("dequantized", None)):
        models[name] = apply_fp8(tiny_model(), "torch", Fp8Recipe(amax_history_len=16)).train()
        for layer in fp8_layers(models[name]):
            layer.scaled_mm = scaled_mm
    models["bf16"] = tiny_model().train()
    reference = models["scaled_mm"]
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.0)
    loss_gaps, gradient_gaps = [], {"dequantized": [], "bf16": []}
    first_loss = None
    for inputs, labels in make_batches(20):
        state = reference.state_dict()  # weights, and the fp8 amax histories and scales
        models["dequantized"].load_state_dict(state)
        models["bf16"].load_state_dict(state, strict=False)  # it has no fp8 buffers
        loss, gradient = _loss_and_gradient(reference, inputs, labels)
        first_loss = first_loss if first_loss is not None else loss
        for name in gradient_gaps:
            other_loss, other_gradient = _loss_and_gradient(models[name], inputs, labels)
            gradient_gaps[name].append(float((other_gradient - gradient).norm() / gradient.norm()))
            if name == "dequantized":
                loss_gaps.append(abs(other_loss - loss))
        optimizer.step()
    print(f"dequantized vs _scaled_mm: loss gaps up to {max(loss_gaps):.1e}, gradients {gradient_gaps}")
    assert loss_gaps[0] == 0.0  # the first forward: same casts, same scales, same bf16 outputs here
    assert max(loss_gaps) < 1e-3
    assert sum(gradient_gaps["dequantized"]) < sum(gradient_gaps["bf16"]) / 2
    assert loss < first_loss - 0.3, "and it learns"


def test_tiny_model_trains_in_fp8_like_bf16():
    bf16, fp8_losses = train_losses("off"), train_losses("torch")
    gaps = [abs(a - b) for a, b in zip(bf16, fp8_losses, strict=True)]
    print(f"fp8 torch vs bf16: max loss gap {max(gaps):.4f}, final {fp8_losses[-1]:.4f} vs {bf16[-1]:.4f}")
    assert fp8_losses[-1] < fp8_losses[0] - 1.0, "fp8 training should learn"
    # Measured on CPU (torch 2.13): max gap 0.012 over the 50 steps (loss 5.57 -> 2.43); 4x headroom.
    assert max(gaps) < 0.05


# ----------------------------------------------------------------------------- Transformer Engine wiring

_FormatHelper = namedtuple("_FormatHelper", ["max_fwd", "max_bwd"])


def fake_te_modules() -> dict[str, types.ModuleType]:
    """A stand-in ``transformer_engine``: its recipe classes and a te.Linear / fp8_autocast on CPU."""
    recipe = types.ModuleType("transformer_engine.common.recipe")

    class Format(enum.Enum):
        E4M3 = _FormatHelper(448, 448)
        HYBRID = _FormatHelper(448, 57344)

    @dataclasses.dataclass
    class DelayedScaling:
        margin: int = 0
        fp8_format: Format = Format.HYBRID
        amax_history_len: int = 1024
        amax_compute_algo: str = "max"

    for cls in (Format, DelayedScaling, _FormatHelper):
        cls.__module__, cls.__qualname__ = recipe.__name__, cls.__name__
        setattr(recipe, cls.__name__, cls)

    pytorch = types.ModuleType("transformer_engine.pytorch")

    class Linear(nn.Linear):
        def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None):
            super().__init__(in_features, out_features, bias=bias, dtype=params_dtype)  # on CPU here
            self.requested_device, self.loaded_extra_state = device, None

        def set_extra_state(self, state):
            self.loaded_extra_state = state

    pytorch.Linear = Linear
    pytorch.autocast_calls = []

    @contextlib.contextmanager
    def fake_fp8_autocast(**kwargs):
        pytorch.autocast_calls.append(kwargs)
        yield

    pytorch.fp8_autocast = fake_fp8_autocast
    pytorch.checkpoint_calls = []

    def fake_checkpoint(function, *args, **kwargs):
        pytorch.checkpoint_calls.append(function)
        return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)

    pytorch.checkpoint = fake_checkpoint
    common = types.ModuleType("transformer_engine.common")
    common.recipe = recipe
    package = types.ModuleType("transformer_engine")
    package.common, package.pytorch = common, pytorch
    return {
        "transformer_engine": package,
        "transformer_engine.common": common,
        "transformer_engine.common.recipe": recipe,
        "transformer_engine.pytorch": pytorch,
    }


def install(monkeypatch, modules: dict[str, types.ModuleType]) -> None:
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


@pytest.fixture
def fake_te(monkeypatch):
    modules = fake_te_modules()
    install(monkeypatch, modules)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return modules


def te_state(history_len: int = 5, gemms: int = 1, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "scale_fwd": torch.rand(3 * gemms, generator=g) * 100 + 1,
        "amax_history_fwd": torch.rand(history_len, 3 * gemms, generator=g),
        "scale_bwd": torch.rand(2 * gemms, generator=g) * 1000 + 1,
        "amax_history_bwd": torch.rand(history_len, 2 * gemms, generator=g),
    }


def te_blob(state: dict, recipe_module) -> torch.Tensor:
    """Serialized as TE >= 1.12 does: the pickled dict (with its recipe object) as a uint8 tensor."""
    full = {**state, "recipe": recipe_module.DelayedScaling(), "extra_fp8_variables": {"num_gemms": 1}}
    return torch.frombuffer(bytearray(pickle.dumps(full)), dtype=torch.uint8)


def test_extra_state_decodes_both_te_formats_without_transformer_engine(monkeypatch):
    modules = fake_te_modules()
    install(monkeypatch, modules)
    state = te_state()
    blob = te_blob(state, modules["transformer_engine.common.recipe"])
    for name in modules:  # decoding must not need TE
        monkeypatch.delitem(sys.modules, name)

    for encoded in (blob, io.BytesIO(blob.numpy().tobytes())):
        decoded = decode_te_extra_state(encoded)
        assert decoded.keys() == state.keys()
        for key in state:
            assert torch.equal(decoded[key], state[key]), key

    legacy = io.BytesIO()  # TE < 1.12: torch.save of the dict, recipe not included
    torch.save({**state, "scale_inv_fwd": 1 / state["scale_fwd"], "extra_fp8_variables": {}}, legacy)
    assert torch.equal(decode_te_extra_state(legacy)["amax_history_bwd"], state["amax_history_bwd"])

    assert decode_te_extra_state(torch.empty(0, dtype=torch.uint8)) is None
    assert decode_te_extra_state(torch.frombuffer(bytearray(pickle.dumps(None)), dtype=torch.uint8)) is None


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_extra_state_refuses_arbitrary_pickles():
    blob = torch.frombuffer(bytearray(pickle.dumps({"scale_fwd": Evil()})), dtype=torch.uint8)
    with pytest.raises(UserError, match="refusing to unpickle"):
        decode_te_extra_state(blob)


def test_te_extra_state_seeds_the_torch_path(monkeypatch):
    modules = fake_te_modules()
    install(monkeypatch, modules)
    recipe_module = modules["transformer_engine.common.recipe"]
    fused, single = te_state(history_len=5, seed=1), te_state(history_len=5, seed=2)
    model = tiny_model()
    model.fp8_extra_state = {
        "layers.0.attn.qkv_proj": te_blob(fused, recipe_module),
        "layers.1.mlp.down_proj": te_blob(single, recipe_module),
        "layers.1.attn.rotary": te_blob(single, recipe_module),
    }  # no such linear: logged
    apply_fp8(model, "torch", Fp8Recipe(amax_history_len=8))

    for name in ("q_proj", "k_proj", "v_proj"):
        layer = getattr(model.layers[0].attn, name)
        assert torch.equal(
            layer.fp8_scale,
            torch.stack([fused["scale_fwd"][0], fused["scale_fwd"][1], fused["scale_bwd"][0]]),
        )
        assert torch.equal(layer.fp8_amax_history[:5, 1], fused["amax_history_fwd"][:, 1])
        assert torch.equal(layer.fp8_amax_history[5:], torch.zeros(3, 3))
    down = model.layers[1].mlp.down_proj
    assert torch.equal(down.fp8_amax_history[:5, 2], single["amax_history_bwd"][:, 0])
    assert torch.equal(model.layers[1].attn.q_proj.fp8_scale, torch.ones(3))


def test_base_checkpoint_extra_state_reaches_the_torch_path_layers(tmp_path, monkeypatch):
    """The contract with ``checkpoint.load_model``: TE entries of a base ``.pt`` (torch.load with
    weights_only=True) end up on ``model.fp8_extra_state`` and seed the swapped layers."""
    from ds_sft.model.checkpoint import load_model

    modules = fake_te_modules()
    install(monkeypatch, modules)
    new_format, old_format = te_state(seed=3), te_state(seed=4)
    legacy = io.BytesIO()
    torch.save(old_format, legacy)
    base = tiny_model()
    state = {f"_orig_mod.{k}": v for k, v in base.state_dict().items()}
    recipe_module = modules["transformer_engine.common.recipe"]
    state["_orig_mod.layers.0.attn.o_proj._extra_state"] = te_blob(new_format, recipe_module)
    state["_orig_mod.layers.1.mlp.up_proj._extra_state"] = legacy
    torch.save({"model": state, "model_args": base.config.to_dict()}, tmp_path / "base.pt")
    for name in modules:
        monkeypatch.delitem(sys.modules, name)

    model = apply_fp8(load_model(tmp_path / "base.pt"), "torch", Fp8Recipe(amax_history_len=5))
    o_proj, up_proj = model.layers[0].attn.o_proj, model.layers[1].mlp.up_proj
    assert torch.equal(o_proj.fp8_amax_history[:, 0], new_format["amax_history_fwd"][:, 0])
    assert torch.equal(up_proj.fp8_scale[2], old_format["scale_bwd"][0])
    assert torch.equal(model.layers[0].attn.q_proj.fp8_scale, torch.ones(3))


def test_te_path_replaces_projections_and_carries_extra_state(fake_te):
    recipe_module, te = fake_te["transformer_engine.common.recipe"], fake_te["transformer_engine.pytorch"]
    state = te_state(history_len=4, gemms=2)  # e.g. a LayerNormMLP-style 2-GEMM module: GEMM 0 is used
    model = tiny_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.fp8_extra_state = {"layers.0.mlp.gate_up_proj": te_blob(state, recipe_module)}
    recipe = Fp8Recipe(format="E4M3", amax_history_len=6, amax_compute_algo="most_recent", margin=2)
    apply_fp8(model, "te", recipe)

    swapped = {name for name, m in model.named_modules() if isinstance(m, te.Linear)}
    assert swapped == block_linears(tiny_model())
    assert {m.requested_device for m in model.modules() if isinstance(m, te.Linear)} == {"cuda"}
    assert model.lm_head is None and isinstance(model.wte, nn.Embedding)  # stays high precision
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], value) for name, value in before.items())

    loaded = decode_te_extra_state(model.layers[0].mlp.up_proj.loaded_extra_state)
    assert torch.equal(loaded["scale_fwd"], state["scale_fwd"][:3])
    assert torch.equal(loaded["amax_history_bwd"][:4], state["amax_history_bwd"][:, :2])
    assert loaded["amax_history_fwd"].shape == (6, 3)  # fitted to the recipe's history length
    assert model.layers[0].attn.q_proj.loaded_extra_state is None

    te_recipe = recipe.to_te()
    assert te_recipe == recipe_module.DelayedScaling(
        fp8_format=recipe_module.Format.E4M3, amax_history_len=6, amax_compute_algo="most_recent", margin=2
    )
    with fp8_autocast("te", recipe):
        pass
    assert te.autocast_calls == [{"enabled": True, "fp8_recipe": te_recipe}]
    assert isinstance(fp8_autocast("torch", recipe), contextlib.nullcontext)


@pytest.mark.parametrize("mode", ["te", "torch", "off"])
def test_activation_checkpointing_recomputes_te_layers_through_te(fake_te, mode):
    """The recompute runs in backward, outside ``fp8_autocast``: only TE's checkpoint replays TE's
    layers in fp8. Every other mode keeps torch's."""
    te = fake_te["transformer_engine.pytorch"]
    model = tiny_model()
    model.config.activation_checkpointing = True
    apply_fp8(model, mode).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).backward()
    assert te.checkpoint_calls == (list(model.layers) if mode == "te" else [])
    te.checkpoint_calls.clear()
    model.eval()(ids, labels=ids)  # evaluation recomputes nothing
    assert te.checkpoint_calls == []


def test_te_path_passes_the_biases(fake_te):
    te = fake_te["transformer_engine.pytorch"]
    model = qwen2_tiny_model()
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".bias")}
    apply_fp8(model, "te")
    for name, value in biases.items():
        layer = model.get_submodule(name.removesuffix(".bias"))
        assert isinstance(layer, te.Linear) and torch.equal(layer.bias, value)
    assert model.layers[0].attn.o_proj.bias is None and model.layers[0].mlp.up_proj.bias is None


# How a Transformer Engine install breaks at import: no CUDA libraries (RuntimeError), its .so or a
# dependency missing (OSError from ctypes), its own ``assert so_path.exists()``, a half-built package.
BROKEN_TE_IMPORTS = [
    RuntimeError("cudnn shared object not found"),
    OSError("libcudnn.so.9: cannot open shared object file"),
    AssertionError("libtransformer_engine.so not found"),
    ValueError("bad version string"),
    AttributeError("module 'transformer_engine_torch' has no attribute 'cudnn'"),
]


@pytest.mark.parametrize("error", BROKEN_TE_IMPORTS, ids=lambda err: type(err).__name__)
def test_a_broken_te_install_gives_one_clear_error_and_auto_falls_back(fake_te, monkeypatch, error):
    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name.startswith("transformer_engine"):
            raise error
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing_import)
    expected = rf"transformer-engine\[pytorch\] \({type(error).__name__}.*--fp8 torch"
    with pytest.raises(UserError, match=expected):
        apply_fp8(tiny_model(), "te")
    assert fp8.resolve_fp8_mode("auto", torch.device("cuda", 0)) == "torch"


def test_te_not_installed_gives_one_clear_error(fake_te, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)  # not installed: ImportError
    with pytest.raises(UserError, match="--fp8 torch"):
        fp8_autocast("te", Fp8Recipe())


def test_te_needs_a_hopper_class_gpu(fake_te, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(UserError, match="8.9.*8.0.*--fp8 torch"):
        apply_fp8(tiny_model(), "te")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA GPU.*--fp8 torch"):
        apply_fp8(tiny_model(), "te")


def test_the_old_mode_name_is_refused_naming_the_new_one():
    for call in (lambda: apply_fp8(tiny_model(), "emulated"), lambda: fp8_autocast("emulated")):
        with pytest.raises(UserError, match=r"^--fp8 emulated was renamed: use --fp8 torch \("):
            call()
    with pytest.raises(UserError, match="choose one of off, auto, torch, te"):
        fp8.resolve_fp8_mode("fp4", torch.device("cpu"))


def test_auto_is_off_on_cpu_and_says_so():
    lines = []
    model = apply_fp8(tiny_model(), "auto", say=lines.append)
    assert not fp8_layers(model)
    # not "in bf16": an fp32 run (a CPU without bf16) was told its projections trained in bf16
    assert lines == [
        "--fp8 auto: off (a CPU has no fp8 tensor cores); the projections train in the run's precision"
    ]
    assert isinstance(fp8_autocast("auto", Fp8Recipe()), contextlib.nullcontext)
    for mode in ("off", "torch", "te"):
        assert fp8.resolve_fp8_mode(mode, torch.device("cpu")) == mode  # explicit modes are kept


def test_auto_resolves_by_compute_capability_and_transformer_engine(fake_te, monkeypatch):
    gpu = torch.device("cuda", 0)
    assert fp8.resolve_fp8_mode("auto", gpu) == "te"
    lines = []
    model = apply_fp8(tiny_model(), "auto", say=lines.append)
    assert lines[0] == "--fp8 auto: te (NVIDIA H200, Transformer Engine)"
    assert isinstance(model.layers[0].attn.q_proj, fake_te["transformer_engine.pytorch"].Linear)
    with fp8_autocast("auto", Fp8Recipe()):  # the trainer's forward context follows the same answer
        pass
    assert len(fake_te["transformer_engine.pytorch"].autocast_calls) == 1

    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)  # TE absent: torch._scaled_mm
    assert fp8.resolve_fp8_mode("auto", gpu) == "torch"
    assert isinstance(fp8_autocast("auto", Fp8Recipe()), contextlib.nullcontext)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # an A100
    assert fp8.resolve_fp8_mode("auto", gpu) == "off"
    assert fp8.resolve_fp8_mode("auto", torch.device("cpu")) == "off"


def test_real_transformer_engine_trains_like_bf16():
    """Runs where TE can (a Hopper/Ada GPU with transformer-engine installed); skips elsewhere."""
    try:
        fp8._import_te()
    except UserError as err:
        pytest.skip(str(err))
    ids = torch.randint(0, 256, (4, 64), device="cuda")
    losses = {}
    for mode in ("off", "te"):
        model = apply_fp8(tiny_model().cuda(), mode).train()
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.bfloat16), fp8_autocast(mode):
                loss = model(ids, labels=ids) / ids.numel()
            loss.backward()
        losses[mode] = loss.item()
    assert abs(losses["te"] - losses["off"]) < 0.05, losses


# ----------------------------------------------------------------------------- DeepSpeed ZeRO


@pytest.mark.parametrize("stage", [2, 3])  # 3: the very weight Parameter is partitioned
def test_torch_fp8_under_deepspeed_zero_saves_and_resumes_fp8_state(stage, tmp_path, monkeypatch):
    deepspeed = pytest.importorskip("deepspeed")
    for key, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "0",  # one rank: its store binds a free port itself
    }.items():
        monkeypatch.setenv(key, value)
    if "TORCH_EXTENSIONS_DIR" not in os.environ:  # DeepSpeed JIT-builds its CPU comm op once, here
        cache = Path(__file__).resolve().parents[2] / ".cache" / "torch_extensions"
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(cache))
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 1000,
    }

    def engine():
        model = apply_fp8(tiny_model(), "torch", Fp8Recipe(amax_history_len=8))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return deepspeed.initialize(model=model, optimizer=optimizer, config=config)[0]

    first = engine()
    q_proj = first.module.layers[0].attn.q_proj
    assert q_proj.weight.dtype == torch.bfloat16 and q_proj.fp8_scale.dtype == torch.float32
    losses = []
    for inputs, labels in make_batches(4, batch=4, seq=16):
        loss = first(inputs, labels=labels) / labels.numel()
        first.backward(loss)
        first.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and (q_proj.fp8_amax_history > 0).any()
    first.save_checkpoint(str(tmp_path), tag="step4")
    saved = {name: b.clone() for name, b in first.module.named_buffers() if "fp8" in name}
    first.destroy()

    second = engine()
    second.load_checkpoint(str(tmp_path), tag="step4")
    for name, buffer in second.module.named_buffers():
        if "fp8" in name:
            assert torch.equal(buffer, saved[name]), name
    second.destroy()  # the process group stays: DeepSpeed caches it, later engines in this process reuse it


# Each rank: two fp8 layers whose scaling state is its own (drawn from its rank), reduced once.
REDUCE_ON_TWO_RANKS = """
import sys
import torch
import torch.distributed as dist
from ds_sft.model.fp8 import Float8Linear, Fp8Recipe, reduce_scaling_state

dist.init_process_group("gloo")
rank = dist.get_rank()
layers = [Float8Linear(torch.nn.Linear(16, 16), Fp8Recipe(amax_history_len=4)) for _ in range(2)]
model = torch.nn.Sequential(*layers, torch.nn.Linear(16, 16))
drawn = torch.Generator().manual_seed(rank)
for layer in model[:2]:
    layer.fp8_amax_history.copy_(torch.rand(4, 3, generator=drawn))
    layer.fp8_scale.copy_(torch.rand(3, generator=drawn) + 0.5)
before = {name: b.clone() for name, b in model.named_buffers()}
reduce_scaling_state(model)
torch.save({"before": before, "after": dict(model.named_buffers())}, f"{sys.argv[1]}/rank{rank}.pt")
dist.destroy_process_group()
"""


@pytest.mark.multiproc
def test_the_scaling_state_of_two_ranks_becomes_one(tmp_path):
    """--fp8 torch on several ranks: each records its own tensors' amaxes, and TE's DelayedScaling
    reduces them over the group; one all-reduce makes every history the elementwise max over the ranks
    and every scale the min (the scale of that max), the same on both ranks (two gloo ranks)."""
    import subprocess

    from tests.rendezvous import without_launcher_variables

    script = tmp_path / "reduce.py"
    script.write_text(REDUCE_ON_TWO_RANKS)
    root = str(Path(__file__).resolve().parents[2])
    env = {**without_launcher_variables(), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    before = [r["before"] for r in ranks]
    assert len(before[0]) == 4  # two layers' history and scale
    for name in before[0]:
        assert not torch.equal(before[0][name], before[1][name]), name  # the ranks' own, unreduced
        pick = torch.minimum if name.endswith("fp8_scale") else torch.maximum
        expected = pick(before[0][name], before[1][name])
        for rank in ranks:
            assert torch.equal(rank["after"][name], expected), name
