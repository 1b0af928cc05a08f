"""What this machine can give a command: the memory it can still allocate."""

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
