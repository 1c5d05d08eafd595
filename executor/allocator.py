"""Keep freed memory in the process: glibc's malloc tuned for a training or serving loop.

A loop allocates and frees the same large tensors every iteration. By default glibc serves a
block of 32 MiB or more (its largest dynamic mmap threshold) with a fresh `mmap` and unmaps it
on free, and gives the top of the heap back to the kernel once 128 KiB or more is free there,
so the next iteration faults its pages in again, zero-filled, one 4 KiB page at a time. With
large edge tensors that was most of a GAT epoch: `simtune run gnn --model gat-3` on
`community-20k`, one rank on the 2-core AMD EPYC, took 7.4 s per epoch (21 s of its 36 s of
CPU in the kernel) and 2.6-2.7 s with both thresholds raised, as predicted from the profile's
gat_attention op (2.8 s), which times its shapes over and over on a warm heap; GraphSAGE's
smaller tensors did not change (0.88 against 0.86 s). Raising only one of the two
thresholds gave 4.1-4.5 s. This is what the env variables `MALLOC_MMAP_THRESHOLD_` and
`MALLOC_TRIM_THRESHOLD_` do, set from inside the process (mallopt), so every rank the executors
spawn gets it; PyTorch's CPU tuning guides reach the same end by preloading jemalloc or
tcmalloc. The cost: the process keeps its peak footprint until it exits. Freed blocks serve the
loop's mix of sizes; a block of exactly a freed one's size may not fit it (torch aligns its
allocations to 64 bytes, which needs a little more) and extends the heap instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters (malloc.h)
KEEP_BYTES = 2**31 - 1                        # mallopt takes an int: 2 GiB


def keep_freed_memory() -> bool:
    """Serve blocks up to 2 GiB from the heap and never trim it; whether glibc took both
    settings (False on a C library without mallopt, which is left as it is)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) & bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
