"""What this machine can give a command: the memory it can still allocate, on the host or a GPU."""

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
