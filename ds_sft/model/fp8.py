"""fp8 matmuls for the attention and MLP projections: Transformer Engine or torch._scaled_mm on Hopper.

An fp8 number has 8 bits for everything, so it cannot hold a tensor's values as they are: it holds
``x * scale``, one fp32 ``scale`` per tensor chosen so the largest magnitude (the *amax*) lands near
the format's maximum, and the matmul multiplies the result by ``1 / scale`` again. Two formats:

- **e4m3** (max 448, 3 mantissa bits): precision first; weights and activations in the forward.
- **e5m2** (max 57344, 2 mantissa bits): range first; gradients, whose magnitudes swing over many
  orders. The ``HYBRID`` recipe uses e4m3 forward and e5m2 backward; ``E4M3`` uses e4m3 for both.

**Delayed scaling** (Transformer Engine's ``DelayedScaling``): measuring a tensor's amax and then
casting it costs an extra pass over memory, so the cast uses a scale computed from the amaxes of
*earlier* steps. Every cast records its amax in row 0 of an ``[amax_history_len]`` history; then the
scale becomes ``(fp8_max / amax) / 2**margin`` with ``amax`` the history's max (``"max"``) or the
value just recorded (``"most_recent"``), and the history rolls one slot (the oldest falls out).
Here that update runs just before the next cast rather than right after this one: the same scales,
but a forward replayed by activation checkpointing casts exactly as the original did. Only training
steps record (``module.training`` and grad mode on): an evaluation casts with the current scales and
leaves the history as it found it. With several ranks each records its own tensors' amaxes, and after
every optimizer step :func:`reduce_scaling_state` makes the state every rank's (TE's DelayedScaling
reduces its amaxes over the group too).
A fresh layer starts at scale 1, which is why seeding the history from the fp8-pretrained base
checkpoint's Transformer Engine ``_extra_state`` matters.

**torch._scaled_mm(a, b, scale_a, scale_b, out_dtype)** computes ``(a * scale_a) @ (b * scale_b)``
with fp8 ``a`` and ``b``, accumulating in fp32 (``scale_*`` are the *inverse* scales). cuBLAS wants
``a`` row-major and ``b`` column-major, so ``x @ w.T`` passes ``w.t()`` (a column-major view of the
row-major weight for free) and the backward's ``dY @ W`` and ``dY.T @ X`` transpose copies of ``W``
and ``X``. On CUDA every dimension must be a multiple of 16 -- the token count too, since it is the
inner dimension of the weight gradient: zero tokens pad it to one. Where there are no fp8 tensor
cores (a CPU, a GPU below compute capability 8.9) the same product is computed *dequantized*: every
fp8 value is exact in bf16 and fp32, so a matmul of the fp8 values held in the model's compute dtype
(the cast rounds to the fp8 grid in fp32 arithmetic, :func:`fp8_grid`, bit for bit the fp8 cast),
with the product of the inverse scales applied to the fp32 accumulator (``addmm``'s ``alpha``), is
``_scaled_mm``'s result up to the last bit of a rare output -- same casts, same scales, same
delayed-scaling state -- near bf16 speed (``bench/fp8.py``: a 112m training step on CPU in 1.4x the
bf16 step; ``_scaled_mm`` itself dequantizes into fp32 matmuls there, and SmolLM2-135M spent 889 s
in its first step).

Modes of :func:`apply_fp8`: ``"off"``; ``"torch"`` swaps each projection for :class:`Float8Linear`
(same ``weight`` Parameter, so state-dict keys and ZeRO sharding do not change, plus two persistent
fp32 buffers of scaling state that checkpoints resume); ``"te"`` swaps in ``transformer_engine``'s
``te.Linear`` (weights copied) and the trainer wraps forward in :func:`fp8_autocast`; ``"auto"`` is
whichever of these the device can run (:func:`resolve_fp8_mode`). Swapped: ``q/k/v/o_proj`` and
``gate/up/down_proj`` -- all of them (recipe ``select: "all"``), or only those whose GEMMs the
roofline of :mod:`ds_sft.model.fp8_roofline` says are faster in fp8 (``select: "auto"``). The LM
head stays in bf16: its matmul lives in the fused loss, and fp8 logits lose too much. Both
dimensions of a swapped linear must be multiples of 16; the vocabulary is the model config's
business (the presets pad it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import math
import pickle
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ds_sft.errors import UserError
from ds_sft.model.fp8_roofline import Roofline, roofline_for
from ds_sft.model.llama import PROJECTIONS

log = logging.getLogger(__name__)

MODES = ("off", "auto", "torch", "te")
RENAMED_MODES = {"emulated": "torch"}  # the torch path's old name, refused with a pointer to the new one
SELECT = ("all", "auto")
# Checkpoints of other trainers fuse projections; their TE state seeds each part (same input).
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
INPUT, WEIGHT, GRAD = 0, 1, 2  # columns of Float8Linear's scaling state
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# (mantissa bits, exponent of the smallest normal) of each format: its grid of representable values
FP8_GRID = {E4M3: (3, -6), E5M2: (2, -14)}


@dataclass(frozen=True)
class Fp8Recipe:
    """Delayed-scaling settings; the ``fp8`` section of the DeepSpeed JSON, TE's defaults."""

    format: str = "HYBRID"  # HYBRID: e4m3 forward, e5m2 gradients; E4M3: e4m3 everywhere
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"  # or "most_recent"
    margin: int = 0  # scale down by 2**margin for headroom
    select: str = "all"  # which projections run in fp8: all, or auto (those the roofline says pay)

    def __post_init__(self) -> None:
        checks = {
            "format": self.format in ("HYBRID", "E4M3"),
            "amax_history_len": isinstance(self.amax_history_len, int) and self.amax_history_len >= 1,
            "amax_compute_algo": self.amax_compute_algo in ("max", "most_recent"),
            "margin": isinstance(self.margin, int) and self.margin >= 0,
            "select": self.select in SELECT,
        }
        for key, ok in checks.items():
            if not ok:
                raise UserError(
                    f"fp8.{key} = {getattr(self, key)!r} is invalid: format HYBRID|E4M3, "
                    "amax_history_len an int >= 1, amax_compute_algo max|most_recent, "
                    "margin an int >= 0, select all|auto"
                )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fp8Recipe:
        """From the JSON ``fp8`` section; keys starting with ``_`` are comments."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known and not key.startswith("_"):
                raise UserError(f"unknown key fp8.{key} in the DeepSpeed config; known keys: {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def grad_dtype(self) -> torch.dtype:
        return E5M2 if self.format == "HYBRID" else E4M3

    def to_te(self):
        """The same recipe as ``transformer_engine.common.recipe.DelayedScaling``."""
        _import_te()
        from transformer_engine.common.recipe import DelayedScaling, Format

        return DelayedScaling(
            fp8_format=Format[self.format],
            amax_history_len=self.amax_history_len,
            amax_compute_algo=self.amax_compute_algo,
            margin=self.margin,
        )


# ----------------------------------------------------------------------------- the torch path


def has_fp8_tensor_cores(device: torch.device) -> bool:
    """True on CUDA GPUs of compute capability >= 8.9 (Ada, Hopper and later), where fp8 GEMMs are fast."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_grid(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``v.to(dtype).float()`` for an fp32 ``v`` within the format's range, in place and without fp8
    conversions (scalar code on CPU, 2x slower): rounds half to even to the spacing of ``v``'s binade,
    ``2**(max(exponent, smallest normal exponent) - mantissa bits)``, whose bits are built directly."""
    mantissa, min_exponent = FP8_GRID[dtype]
    exponent = (v.view(torch.int32) >> 23) & 0xFF  # biased by 127
    spacing = ((exponent.clamp_(min=min_exponent + 127) - mantissa) << 23).view(torch.float32)
    return v.div_(spacing).round_().mul_(spacing)


def _column_major(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


def _scaled_mm(a8, b8, a_inv, b_inv, out_dtype, fast_accum: bool = False) -> torch.Tensor:
    """``(a8 * a_inv) @ (b8 * b_inv)`` on fp8 tensor cores (cuBLAS wants ``a`` row-major, ``b``
    column-major), accumulated in fp32 and rounded once to ``out_dtype``. ``fast_accum``: the sum
    stays in the tensor cores' narrower accumulator (Hopper: ~14 bits) instead of moving into fp32
    every few products; faster, and the error grows with the inner dimension."""
    # Outside autocast: CPU's _scaled_mm is fp32 matmuls of dequantized operands, which autocast would
    # round to bf16 first (on CUDA the op is not autocast's business, so this changes nothing).
    with torch.autocast(a8.device.type, enabled=False):
        return torch._scaled_mm(
            a8.contiguous(),
            _column_major(b8),
            scale_a=a_inv,
            scale_b=b_inv,
            out_dtype=out_dtype,
            use_fast_accum=fast_accum,
        )


def _dequantized_mm(a, b, a_inv, b_inv, out_dtype) -> torch.Tensor:
    """The same product from fp8 values held in the compute dtype (bf16 or wider, where they are
    exact): their products are summed in fp32 and ``alpha`` scales the sum before the output is
    rounded, as cuBLAS applies the scales in its epilogue. (CPU's ``_scaled_mm`` scales the operands
    in fp32 instead, so the two differ in a rare last bit.) A wider ``out_dtype`` gets the compute
    dtype's rounding, like the weight gradient of an ``nn.Linear`` under autocast."""
    # .item(): alpha is a Python number; a host value on CPU, one sync per GEMM on a pre-fp8 GPU.
    return torch.addmm(a.new_zeros(()), a, b, beta=0, alpha=(a_inv * b_inv).item()).to(out_dtype)


def _pad_tokens(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t [M, ...]`` with zero rows appended up to ``rows``."""
    return t if t.shape[0] == rows else torch.nn.functional.pad(t, (0, 0, 0, rows - t.shape[0]))


class _Float8Matmul(torch.autograd.Function):
    """``y = x @ w.T`` with x, w in e4m3 and the output gradient in the recipe's gradient format.

    Without fp8 tensor cores the fp8 values are held in the compute dtype from the cast on, and saved
    that way (the memory of a bf16 linear's saved tensors instead of half of it).

    On fp8 tensor cores the token count M is the inner dimension of the weight gradient's GEMM,
    which cuBLAS wants a multiple of 16 like every other: ``x`` and the output gradient get zero
    tokens up to one (before their casts, which the zeros leave alone: the amax is a max of |values|),
    which add nothing to ``dW`` and are cut from ``y`` and ``dX``."""

    @staticmethod
    def forward(ctx, x, weight, layer, compute_dtype, record):
        ctx.scaled_mm = layer.uses_scaled_mm(x.device)
        held_in = None if ctx.scaled_mm else compute_dtype
        x2d = x.reshape(-1, x.shape[-1])
        ctx.tokens = x2d.shape[0]
        ctx.padded_tokens = -(-ctx.tokens // 16) * 16 if ctx.scaled_mm else ctx.tokens
        padded = _pad_tokens(x2d, ctx.padded_tokens)
        (x8, w8), (x_inv, w_inv) = layer.cast((padded, weight), INPUT, record, held_in)
        # Fast accumulation in the forward GEMM only, as Transformer Engine (_2X_ACC_FPROP False,
        # DGRAD / WGRAD True) and torchao (gemm_config_output) do: its inner dimension is a layer's
        # width, while the weight gradient's is the token count (thousands of e5m2 products summed)
        mm = functools.partial(_scaled_mm, fast_accum=True) if ctx.scaled_mm else _dequantized_mm
        y = mm(x8, w8.t(), x_inv, w_inv, compute_dtype)[: ctx.tokens]
        ctx.save_for_backward(x8, w8, x_inv, w_inv)
        ctx.layer, ctx.x_shape, ctx.x_dtype, ctx.w_dtype = layer, x.shape, x.dtype, weight.dtype
        ctx.compute_dtype, ctx.record = compute_dtype, record
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x8, w8, x_inv, w_inv = ctx.saved_tensors
        held_in = None if ctx.scaled_mm else ctx.compute_dtype
        grad_y2d = _pad_tokens(grad_y.reshape(-1, grad_y.shape[-1]), ctx.padded_tokens)
        (g8,), (g_inv,) = ctx.layer.cast((grad_y2d,), GRAD, ctx.record, held_in)
        mm = _scaled_mm if ctx.scaled_mm else _dequantized_mm
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # dX [M, K] = dY [M, N] @ W [N, K]
            grad_x = mm(g8, w8, g_inv, w_inv, ctx.x_dtype)[: ctx.tokens].reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:  # dW [N, K] = dY.T [N, M] @ X [M, K]
            grad_w = mm(g8.t(), x8, g_inv, x_inv, ctx.w_dtype)
        return grad_x, grad_w, None, None, None


class Float8Linear(nn.Module):
    """An ``nn.Linear`` whose matmuls run in fp8 with delayed scaling (``--fp8 torch``); a bias (Qwen2's
    q/k/v) stays in its own precision and is added to the GEMM's output, as Transformer Engine does.

    Owns the replaced linear's ``weight`` Parameter (fp32 or bf16 master) and two persistent fp32
    buffers, ``fp8_amax_history [amax_history_len, 3]`` and ``fp8_scale [3]`` (columns: input,
    weight, output gradient). A state dict without them (a checkpoint written without fp8) loads
    with fresh scaling state; a history of another length is cut or zero-padded, as TE does.
    ``scaled_mm``: None runs ``torch._scaled_mm`` where there are fp8 tensor cores and the
    dequantized GEMM elsewhere; True or False forces one (tests compare the two on CPU).
    ``compiled_casts``: None compiles the training casts on fp8 tensor cores and keeps them eager
    elsewhere; True or False forces it (tests compare compiled and eager casts on CPU).
    """

    def __init__(self, linear: nn.Linear, recipe: Fp8Recipe) -> None:
        super().__init__()
        self.in_features, self.out_features, self.recipe = linear.in_features, linear.out_features, recipe
        self.weight, self.bias = linear.weight, linear.bias
        self.scaled_mm: bool | None = None
        self.compiled_casts: bool | None = None
        device = linear.weight.device
        self.register_buffer("fp8_amax_history", torch.zeros(recipe.amax_history_len, 3, device=device))
        self.register_buffer("fp8_scale", torch.ones(3, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        # Decided here: inside an autograd Function's forward, grad mode is always off.
        record = self.training and torch.is_grad_enabled()
        y = _Float8Matmul.apply(x, self.weight, self, compute_dtype, record)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def uses_scaled_mm(self, device: torch.device) -> bool:
        return has_fp8_tensor_cores(device) if self.scaled_mm is None else self.scaled_mm

    def cast(
        self, tensors: tuple[torch.Tensor, ...], first: int, record: bool, held_in: torch.dtype | None = None
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """``tensors`` in fp8 with the scales of the columns from ``first`` on (the forward's input and
        weight, or the output gradient) -- or their fp8 values held in ``held_in``, where they are
        exact -- and the inverse scales they were cast with; ``record``: step those columns' scaling
        state and keep each tensor's amax for later steps (training steps only).

        Eager, a cast is about a dozen small kernels, each a pass over memory, and a layer's forward +
        backward about 40 (tests/model/test_fp8.py counts them): on an H200 1.7 ms of host time per
        layer and ~80 bytes of memory traffic per element cast, more than any projection's fp8 GEMM
        wins back. Compiled (``compiled_casts``; by default on fp8 tensor cores), inductor
        fuses each training cast into a few kernels, bit for bit the eager result (NaN payloads aside).
        Casts that record nothing (evaluation, activation checkpointing's replay) stay eager: they are
        rare, and graphs of their own would crowd dynamo's limit of 8 per function."""
        # Activation checkpointing re-runs the forward inside backward: that replay must cast with
        # the same scales as the original forward and record nothing (gradients are never replayed).
        # Under torch.compile there is no replay to see (the compiled backward recomputes from the
        # graph, never by running this again), and asking for the graph task breaks the graph in
        # every cast: with --compile --fp8 torch on an H200 each cast fell out of the compiled graph
        # and hit the recompile limit.
        compiling = torch.compiler.is_compiling()
        replay = first != GRAD and not compiling and torch._C._current_graph_task_id() != -1
        record = record and not replay
        compiled = self.compiled_casts
        if compiled is None:
            compiled = has_fp8_tensor_cores(tensors[0].device)
        dtype = self.recipe.grad_dtype if first == GRAD else E4M3
        history_max = self.recipe.amax_compute_algo == "max"
        scaling = (self.fp8_amax_history, self.fp8_scale, first, record, dtype, held_in, self.recipe.margin)
        # inside a compiled model dynamo traces the plain function with the rest of the graph
        if compiled and record and not compiling and _COMPILE_FAILURE is None:
            try:
                return _compiled_scale_and_cast()(tuple(map(_dynamic_shape, tensors)), *scaling, history_max)
            except torch._dynamo.exc.TorchDynamoException as error:  # raised before anything ran
                _give_up_compiling(error)
        return _scale_and_cast(tuple(tensors), *scaling, history_max)

    @torch.no_grad()
    def seed(self, state: dict[str, torch.Tensor]) -> None:
        """Start from a TE layer's scaling state (:func:`decode_te_extra_state`; its first GEMM)."""
        # TE's columns: forward (input, weight, output), backward (output gradient, input gradient).
        sources = {INPUT: ("fwd", 0), WEIGHT: ("fwd", 1), GRAD: ("bwd", 0)}
        for column, (direction, index) in sources.items():
            history = state[f"amax_history_{direction}"][:, index]
            self.fp8_amax_history[:, column] = _fit_rows(history, len(self.fp8_amax_history))
            self.fp8_scale[column] = state[f"scale_{direction}"][index]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args):
        history_key = prefix + "fp8_amax_history"
        if history_key in state_dict:
            state_dict[history_key] = _fit_rows(state_dict[history_key], len(self.fp8_amax_history))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)
        for name in ("fp8_amax_history", "fp8_scale"):
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)

    def _apply(self, fn, recurse=True):
        """``.to(device)`` moves the scaling state; ``.to(dtype)``, ``.bfloat16()`` leave it fp32 (a
        whole-model cast made it bf16: the next training cast's ``vector_norm(out=)`` refused the
        bf16 history, and bf16 would round its amaxes)."""
        state = {name: self._buffers[name] for name in ("fp8_amax_history", "fp8_scale")}
        super()._apply(fn, recurse)
        for name, kept in state.items():
            if self._buffers[name].dtype != kept.dtype:
                self._buffers[name] = kept.to(self._buffers[name].device)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, recipe={self.recipe}"


@torch.no_grad()
def _scale_and_cast(
    tensors: tuple[torch.Tensor, ...],
    history: torch.Tensor,
    scale: torch.Tensor,
    first: int,
    record: bool,
    dtype: torch.dtype,
    held_in: torch.dtype | None,
    margin: int,
    history_max: bool,
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """:meth:`Float8Linear.cast` on a layer's scaling state ``history [len, 3]`` and ``scale [3]``,
    updated in place for the columns from ``first`` on when ``record``; ``history_max``: the scale
    comes from the history's max (else from its latest amax). A function of tensors and constants,
    not of the layer, so one compiled graph serves every layer (see :func:`_compiled_scale_and_cast`).
    """
    fp8_max = torch.finfo(dtype).max
    columns = slice(first, first + len(tensors))
    if record:
        _step_scaling(tensors, history[:, columns], scale[columns], fp8_max, margin, history_max)
    cast = []
    for t, column_scale in zip(tensors, scale[columns].split(1), strict=True):
        # Scaled in fp32 (one rounding, to fp8: the [1]-shaped scale promotes a bf16 t to fp32
        # without a copy), saturated in place (out-of-range values would become NaN in e4m3fn,
        # which has no inf, or inf in e5m2), then rounded to fp8.
        scaled = (t if t.dtype.itemsize <= 4 else t.float()) * column_scale
        scaled.clamp_(-fp8_max, fp8_max)
        cast.append(scaled.to(dtype) if held_in is None else fp8_grid(scaled, dtype).to(held_in))
    # each inverse scale in its own allocation: cuBLASLt refused (NOT_SUPPORTED) a scale pointer at
    # a 4-byte offset, the second element of one tensor, on the H200
    return tuple(cast), tuple(column_scale.reciprocal() for column_scale in scale[columns].split(1))


def _step_scaling(
    tensors: tuple[torch.Tensor, ...],
    history: torch.Tensor,
    scale: torch.Tensor,
    fp8_max: float,
    margin: int,
    history_max: bool,
) -> None:
    """TE's update after a cast, deferred to just before the next one (same scales, replay-safe),
    for the columns of ``tensors`` at once (``history`` and ``scale`` are views of them); then the
    amaxes of ``tensors``, about to be cast, take row 0.

    Row 0 holds the amax recorded by the previous cast (0 when none was: a fresh or TE-seeded layer,
    or an all-zero tensor, leaves the state as it is).
    """
    recorded = history[0] > 0
    amax = history.amax(0) if history_max else history[0]
    new_scale = amax.reciprocal() * fp8_max  # fp8_max / amax as Tensor.__rtruediv__ computes it
    if margin:
        new_scale /= 2**margin
    # An overflowed tensor keeps the old scale (where recorded, amax > 0: finite is < inf).
    usable = recorded & (amax < math.inf)
    torch.where(usable, new_scale, scale, out=scale)
    if len(history) > 1:  # the oldest amax falls out (copied: torch.compile refuses a strided out=)
        history.copy_(torch.where(recorded, history.roll(-1, 0), history))
    for t, latest in zip(tensors, history[0].unbind(), strict=True):
        torch.linalg.vector_norm(t, math.inf, dtype=torch.float32, out=latest)  # max |t|


# Why compiling the casts failed in this process (they all run eager from then on), or None.
_COMPILE_FAILURE: str | None = None


def _give_up_compiling(error: Exception) -> None:
    global _COMPILE_FAILURE
    _COMPILE_FAILURE = f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
    log.warning(
        "fp8: compiling the casts failed (%s); they run eager from here on: the same numbers, slower "
        "(on an H200 eager casts cost more than fp8 GEMMs save). torch.compile needs a working Triton "
        "on the GPU (and a C compiler for its launcher)",
        _COMPILE_FAILURE,
    )


@functools.cache
def _compiled_scale_and_cast():
    """:func:`_scale_and_cast` compiled once per process, on first use. The tensors it is handed have
    dynamic shapes (:func:`_dynamic_shape`), so every layer's training casts share its graphs (one for
    the input and weight, one for the output gradient; another where a token count first equals a
    width, or the input's dtype differs between layers), whatever their widths and token counts."""
    return torch.compile(_scale_and_cast, fullgraph=True)


def _dynamic_shape(t: torch.Tensor) -> torch.Tensor:
    """``t`` marked for a graph of any shape: every width and token count casts through one graph,
    where the scaling state (as long as the amax history, fixed for a run) stays static. Detached:
    dynamo keeps a Parameter's shape static, so each width would compile again."""
    t = t.detach()
    for dim in range(t.dim()):
        torch._dynamo.maybe_mark_dynamic(t, dim)
    return t


def _fit_rows(history: torch.Tensor, rows: int) -> torch.Tensor:
    """An amax history cut or zero-padded to ``rows`` entries."""
    if len(history) >= rows:
        return history[:rows]
    return torch.cat([history, history.new_zeros(rows - len(history), *history.shape[1:])])


@torch.no_grad()
def reduce_scaling_state(model: nn.Module) -> None:
    """Every rank's :class:`Float8Linear` scaling state made the same, in one all-reduce (MAX): each
    amax history the elementwise max over the ranks, each scale the min (the scale that max gives: a
    larger amax is a smaller scale). The trainer calls it on every rank after each optimizer step;
    within a step each rank records its own micro-batches' amaxes. Unreduced, each rank scaled by
    its own activations and gradients, and a resume gave every rank rank 0's state (the one a
    checkpoint keeps). Nothing to do with one rank or no such layer."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return  # before the walk over the modules: the trainer calls this every step
    layers = [m for m in model.modules() if isinstance(m, Float8Linear)]
    if not layers:
        return
    # on the buffers' device, the engine's; the scales negated, so that the MAX of theirs is the min
    state = [t for layer in layers for t in (layer.fp8_amax_history.flatten(), -layer.fp8_scale)]
    reduced = torch.cat(state)
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    parts = reduced.split([t.numel() for t in state])
    for layer, history, negated in zip(layers, parts[::2], parts[1::2], strict=True):
        layer.fp8_amax_history.copy_(history.view_as(layer.fp8_amax_history))
        torch.neg(negated, out=layer.fp8_scale)


# ----------------------------------------------------------------------------- Transformer Engine


def _import_te():
    """``transformer_engine.pytorch``, or one UserError saying why fp8 ``te`` cannot run here."""
    hint = "use --fp8 torch (runs anywhere) or --fp8 off"
    if not torch.cuda.is_available():
        raise UserError(f"--fp8 te needs a CUDA GPU with fp8 tensor cores, none is visible; {hint}")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise UserError(
            f"--fp8 te needs compute capability >= 8.9 (Ada/Hopper), this GPU has {major}.{minor}; {hint}"
        )
    try:
        import transformer_engine.pytorch as te
    except Exception as err:  # a broken install: RuntimeError, OSError (a missing .so), AssertionError...
        raise UserError(
            f"--fp8 te needs transformer-engine[pytorch] ({type(err).__name__}: {err}); "
            f"pip install 'ds-sft[gpu]', or {hint}"
        ) from None
    return te


def fp8_autocast(mode: str, recipe: Fp8Recipe | None = None):
    """The context the trainer wraps around forward: TE's ``fp8_autocast`` in mode ``te`` (or ``auto``
    where that resolves to ``te``), else nothing."""
    if check_mode(mode) == "auto":
        mode = resolve_fp8_mode(mode, _default_device())
    if mode != "te":
        return contextlib.nullcontext()
    return _import_te().fp8_autocast(enabled=True, fp8_recipe=(recipe or Fp8Recipe()).to_te())


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles TE's state (tensors, dicts, its recipe object) and refuses every other object."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return torch._utils._rebuild_tensor_v2
        if (module, name) == ("torch.storage", "_load_from_bytes"):  # how pickle.dumps stores a storage
            return lambda b: torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module.startswith("transformer_engine.common.recipe"):
            return _Opaque  # the DelayedScaling recipe and its enums: only the tensors matter here
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


class _Opaque:
    """Stands in for TE's recipe objects while unpickling: takes their fields and drops them."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


def decode_te_extra_state(blob: Any) -> dict[str, torch.Tensor] | None:
    """TE's ``_extra_state`` -> ``{scale_fwd, amax_history_fwd, scale_bwd, amax_history_bwd}`` or None.

    TE >= 1.12 stores ``pickle.dumps(state)`` as a uint8 tensor, older versions ``torch.save(state)``
    in an ``io.BytesIO``; ``state`` is None (fp8 never ran) or a dict whose ``amax_history_fwd`` is
    ``[history, 3 * gemms]`` (input, weight, output per GEMM), ``amax_history_bwd`` is
    ``[history, 2 * gemms]`` (output gradient, input gradient) and ``scale_*`` match the columns.
    Only tensors and plain containers are accepted: a pickle naming anything else is refused.
    """
    if isinstance(blob, io.BytesIO):
        blob = blob.getvalue()
    if isinstance(blob, torch.Tensor):
        blob = blob.detach().cpu().numpy().tobytes()
    if not blob:
        return None
    try:
        if blob[:2] == b"PK":  # torch.save's zip format
            state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        else:
            state = _RestrictedUnpickler(io.BytesIO(blob)).load()
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise UserError(
            f"cannot read a Transformer Engine _extra_state entry ({err}); re-save the "
            "checkpoint without it or use --fp8 off"
        ) from None
    keys = ("scale_fwd", "amax_history_fwd", "scale_bwd", "amax_history_bwd")
    if not isinstance(state, dict) or not all(isinstance(state.get(k), torch.Tensor) for k in keys):
        return None  # no delayed-scaling state (fp8 never ran, or another TE recipe)
    return {k: state[k].float() for k in keys}


def encode_te_extra_state(state: dict[str, torch.Tensor], recipe: Fp8Recipe) -> torch.Tensor:
    """The first GEMM of ``state`` as a single-GEMM ``te.Linear`` loads it (``set_extra_state``), its
    history fitted to the recipe's length (TE >= 2 copies it into a buffer of that length)."""
    out = {"recipe": recipe.to_te(), "extra_fp8_variables": {"num_gemms": 1}}
    for direction, columns in (("fwd", 3), ("bwd", 2)):
        scale = state[f"scale_{direction}"][:columns].clone()
        out[f"scale_{direction}"], out[f"scale_inv_{direction}"] = scale, scale.reciprocal()
        history = state[f"amax_history_{direction}"][:, :columns]
        out[f"amax_history_{direction}"] = _fit_rows(history, recipe.amax_history_len)
    return torch.frombuffer(bytearray(pickle.dumps(out)), dtype=torch.uint8)


def _te_linear(te, linear: nn.Linear) -> nn.Module:
    # TE layers live on the GPU whatever device the model was built on (the trainer builds on CPU and
    # lets the engine move it); the weight is copied, so the optimizer must be made afterwards.
    bias = linear.bias is not None
    layer = te.Linear(
        linear.in_features, linear.out_features, bias=bias, params_dtype=linear.weight.dtype, device="cuda"
    )
    with torch.no_grad():
        layer.weight.copy_(linear.weight)
        if bias:
            layer.bias.copy_(linear.bias)
    return layer


# ----------------------------------------------------------------------------- the switch


def fp8_linear_names(model: nn.Module) -> list[str]:
    """The replacement map: names of the ``nn.Linear`` modules that fp8 swaps."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS
    ]


def fp8_layout(model: nn.Module, recipe: dict | None) -> dict | None:
    """What the fp8 swap made of ``model`` (None: every projection in bf16/fp32): ``{"mode": "torch" |
    "te", "layers": how many, "names": a digest of their names, "recipe": the JSON section with TE's
    defaults filled in}``. ``--fp8 auto`` and ``select: "auto"`` resolve by machine, so the flag alone
    does not say what a step computes; a resume compares this."""
    import hashlib

    swapped = sorted(
        name
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in PROJECTIONS and not isinstance(module, nn.Linear)
    )
    if not swapped:
        return None
    kind = "torch" if isinstance(model.get_submodule(swapped[0]), Float8Linear) else "te"
    return {
        "mode": kind,
        "layers": len(swapped),
        "names": hashlib.sha256("\n".join(swapped).encode()).hexdigest(),
        "recipe": dataclasses.asdict(Fp8Recipe.from_dict(recipe or {})),
    }


def _seed_targets(extra_state: dict[str, Any], swapped: set[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Module name -> decoded TE state, for every swapped linear the checkpoint has state for."""
    targets, unused = {}, []
    for name, blob in extra_state.items():
        parent, _, leaf = name.rpartition(".")
        parts = [name] if name in swapped else [f"{parent}.{p}" for p in FUSED_PARTS.get(leaf, ())]
        state = decode_te_extra_state(blob) if parts else None
        if state is None or not set(parts) <= swapped:
            unused.append(name)
            continue
        targets.update(dict.fromkeys(parts, state))
    if unused:
        log.info(
            "fp8: %d TE _extra_state entries seed nothing (no fp8 state, or no swapped linear): %s",
            len(unused),
            ", ".join(unused[:4]),
        )
    return targets


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MODES`, else one UserError (naming the new name of a renamed one)."""
    if mode in RENAMED_MODES:
        raise UserError(
            f"--fp8 {mode} was renamed: use --fp8 {RENAMED_MODES[mode]} (torch._scaled_mm on fp8 GPUs, "
            "the same fp8 numerics emulated elsewhere)"
        )
    if mode not in MODES:
        raise UserError(f"--fp8 {mode!r} is unknown; choose one of {', '.join(MODES)}")
    return mode


def _default_device() -> torch.device:
    """The device the trainer runs on: this rank's GPU when there is one."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_fp8_mode(mode: str, device: torch.device) -> str:
    """What ``mode`` runs as on ``device``: ``auto`` is ``te`` on fp8 tensor cores (compute capability
    >= 8.9) when Transformer Engine imports, ``torch`` there without it, and ``off`` elsewhere (a CPU
    or an older GPU trains the fp8-pretrained model in bf16). Other modes are themselves."""
    if check_mode(mode) != "auto":
        return mode
    if not has_fp8_tensor_cores(device):
        return "off"
    try:
        _import_te()
    except UserError:
        return "torch"
    return "te"


def _why_auto(resolved: str, device: torch.device) -> str:
    if resolved == "off":
        what = "a CPU"
        if device.type == "cuda":
            what = "compute capability {}.{}".format(*torch.cuda.get_device_capability(device))
        return (
            f"--fp8 auto: off ({what} has no fp8 tensor cores); the projections train in the run's precision"
        )
    engine = (
        "Transformer Engine" if resolved == "te" else "torch._scaled_mm; Transformer Engine does not import"
    )
    return f"--fp8 auto: {resolved} ({torch.cuda.get_device_name(device)}, {engine})"


def select_fp8_linears(
    model: nn.Module, mode: str, recipe: Fp8Recipe, tokens: int | None, roofline: Roofline
) -> dict[str, bool]:
    """Module name -> whether it runs in fp8: every projection (``select: "all"``), or those whose
    GEMMs with ``tokens`` rows per micro-batch are estimated faster in fp8 (``select: "auto"``)."""
    names = fp8_linear_names(model)
    if recipe.select == "all":
        return dict.fromkeys(names, True)
    if not tokens:
        raise ValueError("fp8 select auto needs the tokens per micro-batch")
    chosen = {}
    for name in names:
        linear = model.get_submodule(name)
        chosen[name] = roofline.speedup(tokens, linear.in_features, linear.out_features, mode) > 1.0
    return chosen


def describe_selection(
    model: nn.Module, chosen: dict[str, bool], mode: str, select: str, tokens: int | None, roofline: Roofline
) -> list[str]:
    """One line per projection kind and shape: how many run in fp8, and the roofline's estimate."""
    rows: dict[tuple[str, int, int], list[bool]] = {}
    for name, fp8 in chosen.items():
        linear = model.get_submodule(name)
        rows.setdefault((name.rsplit(".", 1)[-1], linear.in_features, linear.out_features), []).append(fp8)
    head = f"fp8 {mode}: {sum(chosen.values())} of {len(chosen)} projections in fp8 (select {select}"
    if tokens:
        head += f"; {tokens} tokens per micro-batch, roofline of {roofline.name}: {roofline.source}"
    lines = [head + ")"]
    for (kind, k, n), flags in rows.items():
        line = f"  {kind:10s} {k:6d} -> {n:<6d} fp8 in {sum(flags):3d} of {len(flags):3d} layers"
        if tokens:
            line += f", estimated {roofline.speedup(tokens, k, n, mode):.2g}x the bf16 speed"
        lines.append(line)
    return lines


def apply_fp8(
    model: nn.Module,
    mode: str,
    recipe: Fp8Recipe | None = None,
    *,
    tokens: int | None = None,
    device: torch.device | None = None,
    say=log.info,
) -> nn.Module:
    """Swap the attention and MLP projections for fp8 layers (in place; returns ``model``).

    ``mode`` ``auto`` is resolved for ``device`` (default: the trainer's); ``tokens`` (rows per
    micro-batch) feeds ``select: "auto"``; ``say`` gets the resolution and the per-kind table.
    Seeds the scaling state from ``model.fp8_extra_state`` (TE ``_extra_state`` of a loaded base
    checkpoint, by canonical module name; fused ``qkv_proj`` / ``gate_up_proj`` seed their parts).
    """
    if check_mode(mode) == "auto":
        device = device or _default_device()
        mode = resolve_fp8_mode("auto", device)
        say(_why_auto(mode, device))
    if mode == "off":
        return model
    recipe = recipe or Fp8Recipe()
    names = fp8_linear_names(model)
    for name in names:
        linear = model.get_submodule(name)
        if linear.in_features % 16 or linear.out_features % 16:
            raise UserError(
                f"fp8 needs linears with both dimensions multiples of 16; {name} "
                f"is {linear.in_features} -> {linear.out_features}: choose sizes that are, "
                "or --fp8 off"
            )
    te = _import_te() if mode == "te" else None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    roofline = roofline_for(gpu)
    chosen = select_fp8_linears(model, mode, recipe, tokens, roofline)
    for line in describe_selection(model, chosen, mode, recipe.select, tokens, roofline):
        say(line)
    names = [name for name in names if chosen[name]]
    seeds = _seed_targets(getattr(model, "fp8_extra_state", {}), set(names))
    for name in names:
        linear = model.get_submodule(name)
        if te is None:
            layer = Float8Linear(linear, recipe)
            if name in seeds:
                layer.seed(seeds[name])
        else:
            layer = _te_linear(te, linear)
            if name in seeds:
                layer.set_extra_state(encode_te_extra_state(seeds[name], recipe))
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, layer)
    if te is not None:
        model.recompute = te.checkpoint  # replays blocks under the fp8 state of their forward
    log.info("fp8 %s: swapped %d linears (%d seeded from TE state)", mode, len(names), len(seeds))
    return model
