"""Memory running out ends a command in one line that says where and which of its flags need less
(ds_sft/errors.py ``out_of_memory_line``, ds_sft/command.py ``execute``), never in a traceback: on a
GPU the micro-batch a user picked is the usual cause, and torch's own message is a paragraph on its
allocator's settings."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ds_sft.command import COMMANDS, execute, load_command
from ds_sft.errors import MORE_MEMORY, out_of_memory_line

UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB")


def size() -> st.SearchStrategy[str]:
    """A size as torch's format_size writes it: "512 bytes", "2.00 GiB"."""
    return st.one_of(
        st.integers(0, 1023).map(lambda n: f"{n} bytes"),
        st.tuples(st.floats(1, 1023.99), st.sampled_from(UNITS[1:])).map(lambda t: f"{t[0]:.2f} {t[1]}"),
    )


def cuda_message(asked: str, gpu: int, total: str, free: str) -> str:
    """torch's caching allocator's message (c10/cuda/CUDACachingAllocator.cpp), advice included."""
    return (
        f"CUDA out of memory. Tried to allocate {asked}. GPU {gpu} has a total capacity of {total} of which "
        f"{free} is free. Including non-PyTorch memory, this process has 137.20 GiB memory in use. Of the "
        "allocated memory 130.01 GiB is allocated by PyTorch, and 6.12 GiB is reserved by PyTorch but "
        "unallocated. If reserved but unallocated memory is large try setting "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for "
        "Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
    )


@given(asked=size(), gpu=st.integers(0, 15), total=size(), free=size())
def test_the_gpu_allocators_message_becomes_its_figures_and_the_fixes(asked, gpu, total, free):
    line = out_of_memory_line(torch.OutOfMemoryError(cuda_message(asked, gpu, total, free)), "FIXES")
    assert line == (
        f"out of memory on the GPU (asked for {asked} more with {free} of GPU {gpu}'s {total} free); FIXES"
    )


def test_the_cpu_allocators_refusal_is_memory_running_out_too():
    with pytest.raises(RuntimeError) as refused:
        torch.empty(2**60, dtype=torch.uint8)  # past any address space: the allocator refuses for real
    assert out_of_memory_line(refused.value, "FIXES") == (
        "out of memory on the CPU (asked for 1,073,741,824.00 GiB more); FIXES"
    )


@pytest.mark.parametrize(
    ("error", "where"),
    [
        (RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be reported asynchronously"),
         "on the GPU (the CUDA driver could not allocate)"),
        (torch.OutOfMemoryError("another wording\nsecond line"), "on the GPU (another wording)"),
        (torch.OutOfMemoryError(""), "on the GPU (OutOfMemoryError)"),
    ],
)  # fmt: skip
def test_other_wordings_of_memory_running_out(error, where):
    assert out_of_memory_line(error) == f"out of memory {where}; {MORE_MEMORY}"


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 9x4)"),
        RuntimeError("a CUDA error: out of memory, said in passing"),  # not what the driver's starts with
        ValueError("CUDA out of memory. Tried to allocate 2.00 GiB."),  # the words, not the error
        MemoryError(),  # Python's own: not torch's, and no figures to read
        OSError(12, "Cannot allocate memory"),
    ],
)
def test_anything_else_is_not_memory_running_out(error):
    assert out_of_memory_line(error) is None


COMMAND_FIXES = {"train": "--micro_batch_size", "eval": "--generate_batch_size"}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_ends_in_one_line_naming_what_needs_less(name, monkeypatch, capsys):
    module = load_command(name)
    message = cuda_message("2.00 GiB", 0, "139.80 GiB", "1.06 GiB")

    def run(args):
        raise torch.OutOfMemoryError(message)

    monkeypatch.setattr(module, "run", run)
    assert execute(f"ds-sft {name}", module, None) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"ds-sft {name}: error: out of memory on the GPU (asked for 2.00 GiB more")
    assert COMMAND_FIXES.get(name, MORE_MEMORY) in line


def test_a_runtime_error_of_another_kind_keeps_its_traceback(monkeypatch):
    module = load_command("train")

    def run(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(module, "run", run)
    with pytest.raises(RuntimeError, match="a bug"):
        execute("ds-sft train", module, None)
