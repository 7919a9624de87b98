"""Memory facts of this process and device (Linux /proc files, CUDA's allocator), and how the
process's C allocator treats freed memory on a CPU."""

from __future__ import annotations

import ctypes
import os
import sys

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


# glibc malloc's defaults: a block of 128 KiB or more (the limit rises with what is freed, up to
# 32 MiB) gets fresh pages from the kernel, given back when freed. A CPU forward pass allocates such
# blocks by the hundred (activations; a long prompt's dequantized layers, up to 64 MiB each), so
# every step page-faults its memory in again: with the default model, 305,000 faults and ~1 s of
# system time per 128-token prompt. Keeping freed blocks for reuse removes that.
MMAP_THRESHOLD = 64 << 20  # blocks below this come from the heap, and are reused once freed
TRIM_THRESHOLD = 256 << 20  # free memory at the top of the heap kept before any is given back
_tuned: bool | None = None


def reuse_freed_memory() -> bool:
    """Tell glibc's malloc to reuse freed blocks of up to MMAP_THRESHOLD bytes instead of returning them
    to the kernel (once per process; model loading on a CPU calls it). False where that cannot be done
    (not glibc) or QWENLM_TUNE_MALLOC=0 says not to."""
    global _tuned
    if _tuned is None:
        _tuned = False
        if os.environ.get("QWENLM_TUNE_MALLOC", "1") != "0" and sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None)
                libc.gnu_get_libc_version  # glibc only: mallopt's parameters differ elsewhere
                m_trim_threshold, m_mmap_threshold = -1, -3
                # (a glibc may refuse a limit above 32 MiB, its own highest: then 32 MiB)
                limit = any(libc.mallopt(m_mmap_threshold, n) for n in (MMAP_THRESHOLD, 32 << 20))
                _tuned = limit and bool(libc.mallopt(m_trim_threshold, TRIM_THRESHOLD))
            except (OSError, AttributeError):
                pass
    return _tuned
