"""ZeRO-3 + the chunked linear cross-entropy: the same loss and gradients as without DeepSpeed.

Under ZeRO-3 every parameter is partitioned (``numel() == 0`` on the module) and gathered while a
forward uses it. ``linear_cross_entropy`` receives the LM-head weight as an argument, fetched by
attribute inside a forward: from the owner's own ``forward`` (``Head``), or from the parent's forward
(``TiedNet``: the tied-embedding layout of ``LlamaModel``), where DeepSpeed gathers the partitioned
parameter on access and registers it as an external parameter. The persistence threshold is 0 so
that even these tiny parameters are really partitioned.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ds_sft import kernels
from tests.conftest import REPO_ROOT

HIDDEN, VOCAB, TOKENS = 16, 96, 24


class Head(nn.Module):
    """Owns the LM-head weight and computes the loss inside its own forward."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(VOCAB, HIDDEN) / HIDDEN**0.5)

    def forward(self, hidden, labels, backend):
        return kernels.linear_cross_entropy(hidden, self.weight, labels, chunk_size=7, backend=backend)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(HIDDEN, HIDDEN)
        self.head = Head()

    def forward(self, x, labels, backend="torch"):
        return self.head(torch.tanh(self.proj(x)), labels, backend)


class TiedNet(nn.Module):
    """The loss uses the embedding's weight in the parent's forward, as ``LlamaModel``'s tied head does."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, HIDDEN)
        self.proj = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, ids, labels, backend="torch"):
        hidden = torch.tanh(self.proj(self.wte(ids)))
        return kernels.linear_cross_entropy(hidden, self.wte.weight, labels, chunk_size=7, backend=backend)


@pytest.fixture
def deepspeed(monkeypatch):
    deepspeed = pytest.importorskip("deepspeed")
    # one rank: MASTER_PORT 0 lets its store bind a free port itself (no port picked in advance)
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))
    return deepspeed


def _inputs(tied):
    gen = torch.Generator().manual_seed(1)
    x = (
        torch.randint(0, VOCAB, (TOKENS,), generator=gen)
        if tied
        else torch.randn(TOKENS, HIDDEN, generator=gen)
    )
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=gen)
    labels[:5] = -100
    return x, labels


@pytest.mark.slow  # ~20 s: DeepSpeed's process-group start-up dominates
@pytest.mark.parametrize("tied", [False, True], ids=["owner-forward", "tied-parent-forward"])
def test_zero3_matches_plain_pytorch(deepspeed, tied):
    torch.manual_seed(0)
    model = TiedNet() if tied else Net()
    reference = type(model)()
    reference.load_state_dict(model.state_dict())
    x, labels = _inputs(tied)

    loss_ref = reference(x, labels, backend="eager")
    loss_ref.backward()

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**6,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    try:
        assert all(p.numel() == 0 for p in engine.module.parameters())  # really partitioned
        loss = engine(x, labels)
        engine.backward(loss)
        torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-6)
        for (name, param), ref in zip(engine.module.named_parameters(), reference.parameters(), strict=True):
            grad = deepspeed.utils.safe_get_full_grad(param)
            assert grad is not None, name
            torch.testing.assert_close(grad.view(ref.shape), ref.grad, atol=1e-6, rtol=1e-5, msg=name)
    finally:
        engine.destroy()
