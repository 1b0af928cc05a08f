"""GPU-only model paths against references that need no GPU trick (run with DS_SFT_GPU_TESTS=1).

On CUDA, packed rows attend through ``flex_attention`` with a block mask (``_document_block_mask``);
the reference is the same model with the dense boolean mask (causal and same document) through
SDPA, the path every device can run. Forward loss and every parameter's gradient must agree.
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


def dense_document_mask(self, input_ids, document_ids, kv_cache):
    """The reference mask: causal within each document, as a dense [B, 1, T, T] boolean for SDPA."""
    T = input_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
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
    torch.manual_seed(seed)
    config = ModelConfig.preset("tiny", kernels="torch")
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
