"""The block's fused elementwise chains (ds_sft/model/fused.py): the compiled RoPE and SwiGLU compute what
their eager definitions compute, forward and backward, and run only where they are meant to (CUDA
tensors under autograd, outside a compiled model). On CPU the compiled functions are called directly
(inductor's C++); tests/model/test_gpu_paths.py runs them inside the model on CUDA."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ds_sft.model import llama
from ds_sft.model.fused import FusedOnCuda


@pytest.fixture
def fresh_dynamo():
    """Dynamo from scratch; a compiled function that falls back to eager fails the test."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield torch._dynamo.utils.counters
    torch._dynamo.reset()


def rope_inputs(batch, heads, seq, head_dim, dtype, seed=0):
    """q and k as the attention makes them ([B, T, H, D] projections seen as [B, H, T, D]: not
    contiguous) and the cos/sin of packed positions, as ``LlamaModel.hidden_states`` gathers them."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, seq, heads, head_dim, generator=g).to(dtype).transpose(1, 2) for _ in "qk")
    positions = torch.randint(0, 64, (batch, seq), generator=g)
    config = SimpleNamespace(head_dim=head_dim, rope_theta=10000.0, rope_scaling=None, max_seq_len=64)
    rope = llama.rope_table(config)[positions]
    return q.requires_grad_(), k.requires_grad_(), rope[:, None, :, 0], rope[:, None, :, 1]


def forward_and_grads(fn, inputs, grad_seed=1):
    """``fn(*inputs)``'s outputs and the gradients of the inputs that require one, for a fixed
    random upstream gradient."""
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    g = torch.Generator().manual_seed(grad_seed)
    upstream = [torch.randn(out.shape, generator=g).to(out.dtype) for out in outputs]
    leaves = [x for x in inputs if x.requires_grad]
    grads = torch.autograd.grad(outputs, leaves, upstream)
    return [out.detach() for out in outputs], list(grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 17, 8), (1, 2, 64, 32)], ids=str)
def test_compiled_rope_computes_the_eager_rotation(dtype, shape, fresh_dynamo):
    inputs = rope_inputs(*shape, dtype)
    eager = forward_and_grads(llama.rope_queries_and_keys.eager, inputs)
    fused = forward_and_grads(llama.rope_queries_and_keys.compiled, inputs)
    assert fresh_dynamo["stats"]["unique_graphs"] == 1  # really compiled, in one graph
    for mine, reference in zip(fused[0] + fused[1], eager[0] + eager[1], strict=True):
        assert mine.dtype == reference.dtype == dtype
        # fp32: an FMA's rounding apart; bf16: at most one rounding of the result apart
        torch.testing.assert_close(
            mine, reference, rtol=2**-7 if dtype == torch.bfloat16 else 1e-6, atol=1e-6
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_compiled_swiglu_computes_the_eager_gating(dtype, fresh_dynamo):
    g = torch.Generator().manual_seed(3)
    gate, up = (torch.randn(2, 9, 40, generator=g).mul(4).to(dtype).requires_grad_() for _ in "gu")
    eager = forward_and_grads(llama.swiglu.eager, (gate, up))
    fused = forward_and_grads(llama.swiglu.compiled, (gate, up))
    assert fresh_dynamo["stats"]["unique_graphs"] == 1
    for mine, reference in zip(fused[0] + fused[1], eager[0] + eager[1], strict=True):
        # bf16: eager rounds silu(gate) before the product, the fused kernel keeps it in fp32
        torch.testing.assert_close(
            mine, reference, rtol=2**-6 if dtype == torch.bfloat16 else 1e-6, atol=1e-5
        )


class CudaLike:
    """Stands in for a CUDA tensor where the wrapper only asks which device the first argument is on."""

    is_cuda = True


@pytest.mark.parametrize(
    "first, grad, compiling, fused",
    [
        (CudaLike(), True, False, True),  # the training forward on a GPU
        (CudaLike(), False, False, False),  # evaluation, generation
        (CudaLike(), True, True, False),  # inside a --compile-d model: dynamo fuses it with the rest
        (torch.zeros(1), True, False, False),  # CPU
    ],
    ids=["cuda-train", "cuda-no-grad", "cuda-compiled-model", "cpu"],
)
def test_the_compiled_function_runs_only_for_cuda_tensors_under_autograd(
    first, grad, compiling, fused, monkeypatch
):
    calls = []

    @FusedOnCuda
    def identity(x):
        calls.append("eager")
        return x

    monkeypatch.setattr(identity, "compiled", lambda x: calls.append("compiled") or x, raising=False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    with torch.set_grad_enabled(grad):
        assert identity(first) is first
    assert calls == ["compiled" if fused else "eager"]


def test_the_model_rotates_and_gates_through_the_fused_functions(monkeypatch):
    """The attention and MLP call the wrapped functions (on CPU: their eager definitions), so a model
    on CUDA trains through the compiled ones."""
    calls = {"rope": 0, "swiglu": 0}
    for name in calls:
        function = getattr(llama, "rope_queries_and_keys" if name == "rope" else name)

        def counted(*args, _function=function, _name=name):
            calls[_name] += 1
            return _function(*args)

        monkeypatch.setattr(llama, "rope_queries_and_keys" if name == "rope" else name, counted)
    config = llama.ModelConfig.preset("tiny", kernels="torch")
    model = llama.LlamaModel(config)
    ids = torch.randint(0, config.vocab_size, (2, 12))
    model(ids, labels=ids).backward()
    assert calls == {"rope": config.n_layers, "swiglu": config.n_layers}
