"""GPU-only model paths against references that need no GPU trick (run with DS_SFT_GPU_TESTS=1).

On CUDA, packed rows attend through ``flex_attention`` with a block mask (``_document_block_mask``);
the reference is the same model with the dense boolean mask (causal and same document) through
SDPA, the path every device can run. Forward loss and every parameter's gradient must agree, also
for sliding windows (the BlockMask's mask_mod against the dense mask with the window).
``launch/gpu_check.sh`` runs this file with the kernel tests on CUDA. On CPU the same cases run the
CPU path (``document_attention``) against the same reference: that checks the cases themselves
before a GPU sees them (a position past the RoPE table is an IndexError on CPU, but a device-side
assert on CUDA, which fails every later test of the run).
"""

from __future__ import annotations

import os

import pytest
import torch

from ds_sft.model import llama
from ds_sft.model.config import ModelConfig
from ds_sft.model.llama import LlamaModel

gpu = pytest.mark.skipif(
    not os.environ.get("DS_SFT_GPU_TESTS"), reason="GPU test: set DS_SFT_GPU_TESTS=1 on a CUDA machine"
)


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.fail("DS_SFT_GPU_TESTS is set but CUDA is not available")
    return torch.device("cuda")


def packed_batch(rows: int, seq_len: int, vocab: int, seed: int) -> dict:
    """Rows of several documents each (random lengths), a padded tail, labels with prompts ignored."""
    g = torch.Generator().manual_seed(seed)
    document_ids = torch.full((rows, seq_len), -1)
    position_ids = torch.zeros(rows, seq_len, dtype=torch.long)
    for r in range(rows):
        start, doc = 0, 0
        end = seq_len - int(torch.randint(0, seq_len // 4, (1,), generator=g))  # padding after `end`
        while start < end:
            length = min(int(torch.randint(1, max(2, seq_len // 3), (1,), generator=g)), end - start)
            document_ids[r, start : start + length] = doc
            position_ids[r, start : start + length] = torch.arange(length)
            start, doc = start + length, doc + 1
    input_ids = torch.randint(0, vocab, (rows, seq_len), generator=g)
    labels = torch.where(torch.rand(rows, seq_len, generator=g) < 0.3, -100, input_ids.roll(-1, 1))
    labels[document_ids < 0] = -100
    return dict(input_ids=input_ids, position_ids=position_ids, document_ids=document_ids, labels=labels)


def dense_document_mask(self, input_ids, document_ids, kv_cache, window=None):
    """The reference mask: causal within each document (and the window), a dense [B, 1, T, T] boolean."""
    T = input_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
    if window is not None:
        causal = causal.triu(-(window - 1))  # query - key < window
    same = document_ids[:, :, None] == document_ids[:, None, :]
    return (causal & same)[:, None]


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch)
    loss.backward()
    return loss.detach().double(), {n: p.grad.detach().double() for n, p in model.named_parameters()}


# each shape and dtype compiles flex_attention once (seconds): three cases cover both dtypes, a length
# that is not a multiple of the 128-token block, and the training length (the tiny preset's RoPE table
# holds 128 positions: the rows' documents reach past 300 tokens)
CASES = [(torch.float32, 1024, 0), (torch.bfloat16, 200, 1), (torch.bfloat16, 1024, 2)]


@gpu
@pytest.mark.parametrize("dtype,seq_len,seed", CASES, ids=str)
def test_flex_attention_document_mask_matches_dense_sdpa(dtype, seq_len, seed, cuda, monkeypatch):
    assert_packed_matches_dense(tiny(), dtype, seq_len, seed, cuda, monkeypatch)


# windows below, across and above the 128-token block, on every layer (Mistral) or some (Qwen2)
WINDOWS = [
    (dict(family="mistral", sliding_window=100), torch.float32, 1024, 3),
    (dict(family="mistral", sliding_window=300), torch.bfloat16, 1024, 4),
    (
        dict(
            family="qwen2",
            attention_bias=True,
            sliding_window=37,
            layer_types=["sliding_attention", "full_attention"],
        ),
        torch.bfloat16,
        200,
        5,
    ),
]


@gpu
@pytest.mark.parametrize("switches,dtype,seq_len,seed", WINDOWS, ids=str)
def test_flex_attention_sliding_window_matches_dense_sdpa(switches, dtype, seq_len, seed, cuda, monkeypatch):
    assert_packed_matches_dense(tiny(**switches), dtype, seq_len, seed, cuda, monkeypatch)


# Qwen3's head_dim apart from d_model / n_heads (4 heads of 32 over d_model 64)
WIDE_HEADS = (dict(family="qwen3", qk_norm=True, head_dim=32), torch.bfloat16, 200, 6)


@gpu
def test_flex_attention_heads_wider_than_d_model_over_n_heads(cuda, monkeypatch):
    switches, dtype, seq_len, seed = WIDE_HEADS
    assert_packed_matches_dense(tiny(**switches), dtype, seq_len, seed, cuda, monkeypatch)


@pytest.mark.parametrize(
    "switches,dtype,seq_len,seed", [({}, *case) for case in CASES] + WINDOWS + [WIDE_HEADS], ids=str
)
def test_the_gpu_cases_on_the_cpu_path(switches, dtype, seq_len, seed, monkeypatch):
    """Every case above through the CPU's packed attention: the cases are valid inputs of their model."""
    assert_packed_matches_dense(tiny(**switches), dtype, seq_len, seed, torch.device("cpu"), monkeypatch)


def tiny(**switches) -> ModelConfig:
    """The tiny preset with RoPE positions for every case's rows."""
    return ModelConfig.preset("tiny", kernels="torch", max_seq_len=1024, **switches)


def assert_packed_matches_dense(config, dtype, seq_len, seed, device, monkeypatch):
    """The model's packed-row attention on ``device`` (flex_attention on CUDA) against the dense mask."""
    torch.manual_seed(seed)
    model = LlamaModel(config).to(device, dtype)
    batch = {k: v.to(device) for k, v in packed_batch(3, seq_len, config.vocab_size, seed).items()}
    assert int(batch["position_ids"].max()) < config.max_seq_len, "positions past the RoPE table"
    assert llama.use_flex_attention(device) == (device.type == "cuda")
    flex_loss, flex_grads = loss_and_grads(model, batch)
    monkeypatch.setattr(LlamaModel, "_attention_mask", dense_document_mask)
    dense_loss, dense_grads = loss_and_grads(model, batch)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.isfinite(flex_loss) and abs(flex_loss - dense_loss) <= tolerance * abs(dense_loss)
    for name, ref in dense_grads.items():
        error = (flex_grads[name] - ref).norm() / ref.norm().clamp(min=1e-12)
        assert error <= tolerance * 5, f"{name}: relative gradient error {error:.2e}"


def cuda_kernels(run) -> int:
    """The CUDA kernels one call of ``run()`` launches (torch.profiler), after an untimed call that
    compiles."""
    run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        run()
        torch.cuda.synchronize()
    return sum(event.device_type == torch.autograd.DeviceType.CUDA for event in profile.events())


@gpu
@pytest.mark.parametrize("name", ["rope_queries_and_keys", "swiglu"])
def test_the_fused_chains_launch_a_few_kernels_and_compute_the_eager_values(name, cuda):
    """ds_sft/model/fused.py on CUDA: the compiled RoPE and SwiGLU, forward and backward, in a few
    kernels where eager launches a chain of them, with the eager results (to rounding)."""
    g = torch.Generator().manual_seed(7)
    if name == "swiglu":  # the 112m preset's MLP width over 256 tokens
        inputs = [torch.randn(2, 128, 1632, generator=g).to(cuda, torch.bfloat16) for _ in "gu"]
    else:  # its 12 heads of 64 over 256 tokens, seen [B, H, T, D] as the attention does
        inputs = [
            torch.randn(2, 128, 12, 64, generator=g).to(cuda, torch.bfloat16).transpose(1, 2) for _ in "qk"
        ]
        rope = llama.rope_table(ModelConfig.preset("112m"))[torch.randint(0, 1024, (2, 128), generator=g)]
        inputs += [rope[:, None, :, 0].to(cuda), rope[:, None, :, 1].to(cuda)]
    leaves = [x.requires_grad_() for x in inputs[:2]]
    upstream = [torch.ones_like(x) for x in (leaves if name != "swiglu" else leaves[:1])]  # outputs' shapes
    function = getattr(llama, name)

    def forward_backward(fn):
        outputs = fn(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return outputs, torch.autograd.grad(outputs, leaves, upstream)

    eager, fused = forward_backward(function.eager), forward_backward(function)
    for mine, reference in zip([*fused[0], *fused[1]], [*eager[0], *eager[1]], strict=True):
        torch.testing.assert_close(mine, reference, rtol=2**-6, atol=1e-5)
    eager_kernels = cuda_kernels(lambda: forward_backward(function.eager))
    fused_kernels = cuda_kernels(lambda: forward_backward(function))
    # eager: ~30 for RoPE's pair, 4-5 for SwiGLU; fused: one or two a direction (SwiGLU's backward
    # may keep its two gradients in two kernels, which is still fewer, so only fewer is asked there)
    if name == "swiglu":
        assert fused_kernels < eager_kernels, (fused_kernels, eager_kernels)
    else:
        assert 2 * fused_kernels <= eager_kernels, (fused_kernels, eager_kernels)
