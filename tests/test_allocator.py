"""executor/allocator.py: freed blocks stay in the process, so the next iteration's tensors
do not fault their pages in again."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from executor.allocator import keep_freed_memory

MIB = 1 << 20


def faults_of_a_64_mib_tensor() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(64 * MIB, dtype=torch.uint8)
    t.fill_(1)   # touch every page
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_freed_block_is_reused_without_page_faults():
    assert keep_freed_memory()
    faults_of_a_64_mib_tensor()                      # the heap grows once
    assert faults_of_a_64_mib_tensor() < 64 * MIB // 4096 // 10   # then reuses its pages (16,384 fresh)
