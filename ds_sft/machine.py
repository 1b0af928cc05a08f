"""What this machine can give a command: the memory it can still allocate, on the host or a GPU, and
whether it computes in bf16 natively."""

from __future__ import annotations

from pathlib import Path


def available_memory() -> int | None:
    """Bytes of memory the kernel says new allocations can get without swapping (``MemAvailable``),
    or None where ``/proc/meminfo`` does not say (not Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def free_memory(device) -> tuple[int | None, str]:
    """(bytes, where) free for new tensors on ``device`` (a torch device): a GPU's free memory, else
    the host's :func:`available_memory`.

    On a GPU, the driver's free memory plus the blocks torch's caching allocator holds for no tensor:
    the driver counts those used, but the next tensors of this process get them (the allocator reuses
    them, or releases them and retries before it fails)."""
    import torch

    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return torch.cuda.mem_get_info(index)[0] + cached, f"free on cuda:{index}"
    available = available_memory()
    return available, "available on this machine" if available is not None else "unknown"


def hardware_bf16(device=None) -> tuple[bool, str]:
    """Whether ``device`` (a torch device; None: CUDA when there is one, as train uses) computes in bf16
    natively, and why: a CUDA GPU that supports it (Ampere and later), or a CPU with AVX-512 BF16 or
    AMX (``/proc/cpuinfo`` flags). Elsewhere bf16 is emulated: a CPU without them multiplies bf16
    matrices about 100x slower than fp32 (0.6 against 61 GFLOP/s at 1024^3 on a 2-core AMD EPYC with
    AVX2 only), so ``--precision auto`` (train) and ``--dtype auto`` (eval) take fp32 there."""
    import torch

    on_cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    if on_cuda:
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name()} {'supports' if ok else 'lacks'} bf16"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    found = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if found or "AMX" in torch.backends.cpu.get_cpu_capability():
        return True, f"this CPU has {', '.join(found) or 'AMX'}"
    return False, "this CPU has neither avx512_bf16 nor amx_bf16"
