"""Convergence: the tiny LLaMA trained with each kernels backend follows the eager loss curve.

Same seed, same batches, AdamW; the only difference is ``ModelConfig.kernels``. The chunked loss
(``torch``) and the Triton kernels (``triton``, through the interpreter on CPU) must reproduce the
eager curve within fp32 round-off, and the model must actually learn (the curve falls), so a
backend whose gradients were silently zero or wrong could not pass.
"""

from __future__ import annotations

import pytest
import torch

from ds_sft.model.config import ModelConfig
from ds_sft.model.llama import LlamaModel


@pytest.fixture(autouse=True)
def one_thread():
    """A tiny model gains nothing from a second thread and, on a busy machine, loses a lot: every op
    waits for both threads to be scheduled."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batches(steps, batch, seq, vocab, seed=0):
    """Learnable data: each row counts up from a random start (mod vocab); the first quarter of every
    row is prompt (-100), as in SFT."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, vocab, (batch, 1), generator=gen)
        tokens = (start + torch.arange(seq + 1)) % vocab
        labels = tokens[:, 1:].clone()
        labels[:, : seq // 4] = -100
        yield tokens[:, :-1], labels


def _train(backend, steps, batch=4, seq=32):
    torch.manual_seed(0)
    model = LlamaModel(ModelConfig.preset("tiny", kernels=backend))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    curve = []
    for input_ids, labels in _batches(steps, batch, seq, model.config.vocab_size):
        loss = model(input_ids, labels=labels) / (labels != -100).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append(loss.item())
    return torch.tensor(curve)


def test_chunked_loss_curve_matches_eager():
    eager = _train("eager", steps=30)
    chunked = _train("torch", steps=30)
    assert eager[-3:].mean() < eager[:3].mean() - 0.1, f"the eager run did not learn: {eager.tolist()}"
    torch.testing.assert_close(chunked, eager, atol=1e-4, rtol=1e-4)


def test_triton_loss_curve_matches_eager():
    """A few steps only: the interpreter is ~1000x slower than PyTorch."""
    eager = _train("eager", steps=4, batch=2, seq=16)
    triton = _train("triton", steps=4, batch=2, seq=16)
    assert eager[-1] < eager[0], f"the eager run did not learn: {eager.tolist()}"
    torch.testing.assert_close(triton, eager, atol=1e-4, rtol=1e-4)
