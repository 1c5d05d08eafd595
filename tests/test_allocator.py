"""executor/allocator.py: freed blocks stay in the process, so the next iteration's tensors
do not fault their pages in again.

Checked in a fresh interpreter, as the executors' ranks are (spawned processes): in a long
test process glibc may find the space above its heap taken by other mappings and serve large
blocks by mmap whatever the threshold."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

CHILD = """
import json, resource, sys, torch
from executor.allocator import keep_freed_memory

def faults(mib):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(mib << 20, dtype=torch.uint8)
    t.fill_(1)   # touch every page
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

kept = keep_freed_memory() if sys.argv[1] == "keep" else None
faults(64)    # the first 64 MiB: fresh pages either way
print(json.dumps({"kept": kept, "after": [faults(48), faults(40), faults(32)]}))
"""


def child(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_blocks_serve_the_next_tensors_without_page_faults():
    """A loop's next tensors (smaller ones here: torch's 64-byte aligned allocations do not fit an
    equal freed block) reuse the pages of the freed ones, instead of faulting in fresh mmaps."""
    default, kept = child("default"), child("keep")
    assert kept["kept"] is True
    assert min(default["after"]) > (32 << 20) // 4096 // 2     # each mapped fresh: one fault per 4 KiB page
    assert max(kept["after"]) < 100                            # served from the kept 64 MiB
