"""Memory facts: what a cache-sizing or out-of-memory check may count on."""

import torch

from qwenlm.memory import free_bytes


def test_cuda_free_bytes_count_what_the_caching_allocator_holds_unused(monkeypatch):
    """A released KV cache stays reserved by PyTorch's allocator: the device reports it used, yet it
    is free for the next cache (the H100 KV table once skipped cells as out of memory that fitted)."""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (18 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 60 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 15 * gib)
    assert free_bytes(torch.device("cuda")) == 18 * gib + 45 * gib


def test_cpu_free_bytes_are_the_machines_available_memory():
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert abs(free_bytes(torch.device("cpu")) - avail) < 2**30
