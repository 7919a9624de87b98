"""Memory facts: what a cache-sizing or out-of-memory check may count on."""

import os
import subprocess
import sys

import pytest
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


_FAULTS = r"""
import resource, sys, torch
from qwenlm import memory

def faults():  # minor page faults of 8 rounds of two blocks of the sizes a CPU prefill frees and takes again
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        a = torch.empty(10 << 20, dtype=torch.uint8).fill_(1)  # 10 MiB
        b = torch.empty(40 << 20, dtype=torch.uint8).fill_(1)  # 40 MiB: above glibc's own highest limit
        del a, b
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()
untuned = faults()
tuned = memory.reuse_freed_memory()
faults()
print(untuned, tuned, faults(), memory.reuse_freed_memory())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    """A CPU forward pass frees and takes again blocks of megabytes at every layer; glibc gives blocks
    above its limit back to the kernel, and each new one page-faults its memory in (the default
    model's 128-token prompt: 305,000 faults, ~1 s of system time). After `reuse_freed_memory` they
    come back from the heap: no faults."""
    r = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    untuned, tuned, after, again = r.stdout.split()
    if tuned != "True":
        pytest.skip("not glibc")
    pages = 8 * (40 << 20) // 4096  # the 40 MiB blocks alone, 4 KiB pages
    assert int(untuned) >= pages // 2  # (fresh pages each round: the cost this removes)
    assert int(after) < pages // 20 and again == "True"
    env = {**os.environ, "QWENLM_TUNE_MALLOC": "0"}  # the switch leaves the allocator alone
    r = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, timeout=120, env=env)
    untuned, tuned, after, _ = r.stdout.split()
    assert tuned == "False" and int(after) >= pages // 2


def test_loading_a_model_on_a_cpu_tunes_the_allocator(monkeypatch, v1_chat_dir):
    from qwenlm import load_model, memory

    calls = []
    monkeypatch.setattr(memory, "reuse_freed_memory", lambda: calls.append(1) or True)
    load_model(v1_chat_dir, dtype="float32", device="cpu")
    assert calls == [1]
