"""Memory facts of this process and device (Linux /proc files, CUDA's allocator)."""

from __future__ import annotations

import torch


def proc_bytes(path: str, key: str) -> int | None:
    """The `key:  N kB` line of a /proc file in bytes, or None where it cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def free_bytes(device: torch.device) -> int | None:
    """Free memory on `device`: on CUDA the device's free bytes plus what PyTorch's caching allocator
    holds unused (it hands that out first, and gives it back before an allocation fails; a freed
    cache stays reserved there); elsewhere the machine's MemAvailable."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    return proc_bytes("/proc/meminfo", "MemAvailable")
