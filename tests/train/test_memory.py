"""The micro-batch memory check: its estimate is a true lower bound; above it, one line and no engine."""

from __future__ import annotations

import pytest
import torch

from ds_sft.cli import main
from ds_sft.model.config import ModelConfig
from ds_sft.model.llama import LlamaModel
from ds_sft.train import memory
from tests.train.helpers import write_data_dir


def saved_activation_bytes(model, batch: int, seq_len: int, dtype) -> int:
    """What autograd really keeps for backward (unique storages), measured with saved-tensor hooks."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # saved, but not activations
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len))
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype, dtype != torch.float32),
    ):
        model(ids, labels=ids)
    return sum(n for ptr, n in storages.items() if ptr not in weights)


CASES = [(1, 16, torch.float32), (2, 64, torch.float32), (3, 40, torch.bfloat16), (1, 128, torch.bfloat16)]


@pytest.mark.parametrize(("batch", "seq_len", "dtype"), CASES)
def test_the_estimate_is_a_lower_bound_of_what_autograd_saves(batch, seq_len, dtype):
    config = ModelConfig.preset("tiny", kernels="eager")
    model = LlamaModel(config)
    real = saved_activation_bytes(model, batch, seq_len, dtype)
    bound = memory.activation_bytes(config, seq_len, batch, dtype == torch.bfloat16, checkpointing=False)
    assert 0 < bound <= real, (bound, real)
    assert bound > real / 8  # and not a vacuous one


def test_a_micro_batch_that_cannot_fit_is_one_line_before_the_engine(tmp_path, capsys, monkeypatch, dist_env):
    import ds_sft.train.loop

    data = write_data_dir(tmp_path / "data", train_rows=8)
    monkeypatch.setattr(memory, "available_bytes", lambda: (2**20, "available in this test"))
    monkeypatch.setattr(ds_sft.train.loop, "train", lambda *a, **k: pytest.fail("the engine was built"))
    argv = [
        "train",
        "--data_dir",
        str(data),
        "--model",
        "tiny",
        "--out_dir",
        str(tmp_path / "run"),
        "--fp8",
        "off",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--micro_batch_size" in err[0] and "--seq_len" in err[0], err
    assert "GiB is available in this test" in err[0]


@pytest.mark.parametrize(("local_rank", "visible", "current"), [(0, 1, 0), (1, 1, 0), (3, 4, 3), (5, 4, 1)])
def test_free_memory_is_read_on_the_rank_s_own_gpu(local_rank, visible, current, monkeypatch):
    """The GPU ``init_distributed`` made current (``LOCAL_RANK`` modulo the visible GPUs), not
    ``LOCAL_RANK`` itself: with one GPU per rank (Slurm's --gpus-per-task) rank 1 sees only device 0,
    and ``mem_get_info(1)`` is an invalid device ordinal. No GPU here: the CUDA calls are stand-ins."""
    asked = []

    def mem_get_info(device):
        assert 0 <= device < visible, f"invalid device ordinal {device}"
        asked.append(device)
        return 7 * 2**30, 80 * 2**30

    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: local_rank % visible)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    assert memory.available_bytes() == (7 * 2**30, f"free on cuda:{current}")
    assert asked == [current]
