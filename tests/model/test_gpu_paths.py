"""GPU-only model paths against references that need no GPU trick (run with DS_SFT_GPU_TESTS=1).

On CUDA, packed rows attend through ``flex_attention`` with a block mask (``_document_block_mask``);
the reference is the same model with the dense boolean mask (causal and same document) through
SDPA, the path every device can run. Forward loss and every parameter's gradient must agree, also
for sliding windows (the BlockMask's mask_mod against the dense mask with the window).
``launch/gpu_check.sh`` runs this file with the kernel tests on CUDA; on CPU it is skipped.
"""

from __future__ import annotations

import os

import pytest
import torch

from ds_sft.model import llama
from ds_sft.model.config import ModelConfig
from ds_sft.model.llama import LlamaModel

pytestmark = pytest.mark.skipif(
    not os.environ.get("DS_SFT_GPU_TESTS"), reason="GPU test: set DS_SFT_GPU_TESTS=1 on a CUDA machine"
)


@pytest.fixture(scope="module", autouse=True)
def cuda():
    if not torch.cuda.is_available():
        pytest.fail("DS_SFT_GPU_TESTS is set but CUDA is not available")


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
# that is not a multiple of the 128-token block, and the training length
CASES = [(torch.float32, 1024, 0), (torch.bfloat16, 200, 1), (torch.bfloat16, 1024, 2)]


@pytest.mark.parametrize("dtype,seq_len,seed", CASES, ids=str)
def test_flex_attention_document_mask_matches_dense_sdpa(dtype, seq_len, seed, monkeypatch):
    assert_flex_matches_dense(ModelConfig.preset("tiny", kernels="torch"), dtype, seq_len, seed, monkeypatch)


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


@pytest.mark.parametrize("switches,dtype,seq_len,seed", WINDOWS, ids=str)
def test_flex_attention_sliding_window_matches_dense_sdpa(switches, dtype, seq_len, seed, monkeypatch):
    config = ModelConfig.preset("tiny", kernels="torch", max_seq_len=1024, **switches)
    assert_flex_matches_dense(config, dtype, seq_len, seed, monkeypatch)


def test_flex_attention_heads_wider_than_d_model_over_n_heads(monkeypatch):
    """Qwen3's head_dim apart from d_model / n_heads (4 heads of 32 over d_model 64) in flex_attention."""
    config = ModelConfig.preset("tiny", kernels="torch", family="qwen3", qk_norm=True, head_dim=32)
    assert_flex_matches_dense(config, torch.bfloat16, 200, 6, monkeypatch)


def assert_flex_matches_dense(config, dtype, seq_len, seed, monkeypatch):
    torch.manual_seed(seed)
    model = LlamaModel(config).cuda().to(dtype)
    batch = {k: v.cuda() for k, v in packed_batch(3, seq_len, config.vocab_size, seed).items()}
    assert llama.use_flex_attention(batch["input_ids"].device)
    flex_loss, flex_grads = loss_and_grads(model, batch)
    monkeypatch.setattr(LlamaModel, "_attention_mask", dense_document_mask)
    dense_loss, dense_grads = loss_and_grads(model, batch)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.isfinite(flex_loss) and abs(flex_loss - dense_loss) <= tolerance * abs(dense_loss)
    for name, ref in dense_grads.items():
        error = (flex_grads[name] - ref).norm() / ref.norm().clamp(min=1e-12)
        assert error <= tolerance * 5, f"{name}: relative gradient error {error:.2e}"
