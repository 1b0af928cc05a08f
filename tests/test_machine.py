"""What the machine can give a command: a GPU's free memory as this process's next tensors see it.
No GPU here: the CUDA calls are stand-ins for one GPU shared with other processes."""

from __future__ import annotations

import pytest
import torch

from ds_sft.machine import free_memory

GIB = 2**30


@pytest.mark.parametrize(("reserved", "allocated"), [(0, 0), (30, 30), (30, 2), (50, 0)])
def test_a_gpu_s_free_memory_counts_the_allocator_s_cached_blocks_free(reserved, allocated, monkeypatch):
    """What torch's caching allocator holds for no tensor (``reserved - allocated``) is free to this
    process's next tensors, though the driver (``mem_get_info``) counts it used: ``eval --compare``
    checked model B against the GPU less model A's peak, and refused a model that fits."""
    total, others, index = 80 * GIB, 10 * GIB, 1  # ``others``: what other processes use

    def on_the_gpu(value):
        def read(device):
            assert device == index, f"read cuda:{device}, not the device asked about"
            return value

        return read

    monkeypatch.setattr(torch.cuda, "mem_get_info", on_the_gpu((total - others - reserved * GIB, total)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", on_the_gpu(reserved * GIB))
    monkeypatch.setattr(torch.cuda, "memory_allocated", on_the_gpu(allocated * GIB))
    free = total - others - allocated * GIB
    assert free_memory(torch.device("cuda", index)) == (free, f"free on cuda:{index}")
