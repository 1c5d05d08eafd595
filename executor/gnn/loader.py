"""The trainer's feed: seed chunks -> sampled blocks -> feature rows, inline or ahead of the trainer.

    samplers_per_trainer = 0          the feeding thread samples each batch when it needs it
    samplers_per_trainer = k >= 1     one sampler thread samples ahead, up to k batches queued
                                      (DistDGL runs k sampler processes; here the sampling is a
                                      collective over the ranks' sampler group, so one thread
                                      keeps its order, and k is how far ahead it may run)
    pipeline_fetch = false            the trainer fetches each batch's features itself
    pipeline_fetch = true             a fetch thread fetches the next batch's features while
                                      the trainer computes this one (a queue of one)

Each thread that runs collectives has its own process group (`Loader` is handed the
`Exchange` objects built on them), so the sampler's, the fetcher's and the gradient
all-reduce's collectives never interleave within a group. Every rank runs the same number of
batches, so every group sees the same sequence of collectives on every rank.

Timings (seconds, summed over the batches) are kept per thread and merged at the end:
`sample`, `fetch_local`, `fetch_remote` (in whatever thread did them) and `stall`, the time
the trainer waited for a batch from a thread (0 when everything is inline).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from executor.gnn.features import FeatureStore
from executor.gnn.sampler import DistSampler, MiniBatch

_DONE = object()


class Loader:
    """Feeds (mini-batch, fp32 input features) for each chunk of seeds (see the module docstring)."""

    def __init__(self, sampler: DistSampler, store: FeatureStore, samplers_ahead: int = 0,
                 pipeline_fetch: bool = False):
        self.sampler, self.store = sampler, store
        self.samplers_ahead, self.pipeline_fetch = samplers_ahead, pipeline_fetch

    def batches(self, chunks: list[np.ndarray], timings: dict[str, float],
                inline: bool = False) -> Iterator[tuple[MiniBatch, torch.Tensor]]:
        """Yield each chunk's batch in order; add the feed's seconds to `timings` once done.
        `inline` runs everything in the calling thread (evaluation)."""
        sample_t: dict[str, float] = {}
        fetch_t: dict[str, float] = {}
        threads: list[_Worker] = []

        def sample(seeds: np.ndarray) -> MiniBatch:
            t0 = time.perf_counter()
            batch = self.sampler.sample(seeds)
            sample_t["sample"] = sample_t.get("sample", 0.0) + time.perf_counter() - t0
            return batch

        sampled: Iterator[MiniBatch] = map(sample, chunks)
        if self.samplers_ahead and not inline:
            threads.append(_Worker(sampled, self.samplers_ahead, "sampler"))
            sampled = iter(threads[-1])

        def fetch(batch: MiniBatch) -> tuple[MiniBatch, torch.Tensor]:
            return batch, self.store.fetch(batch.input_nodes, fetch_t)

        fed: Iterator[tuple[MiniBatch, torch.Tensor]] = map(fetch, sampled)
        if self.pipeline_fetch and not inline:
            threads.append(_Worker(fed, 1, "fetcher"))
            fed = iter(threads[-1])
        while True:
            t0 = time.perf_counter()
            item = next(fed, _DONE)
            if threads:
                timings["stall"] = timings.get("stall", 0.0) + time.perf_counter() - t0
            if item is _DONE:
                break
            yield item
        for worker in threads:  # (on an error the daemon threads are left to the process's end)
            worker.join()
        for part in (sample_t, fetch_t):
            for key, seconds in part.items():
                timings[key] = timings.get(key, 0.0) + seconds


class _Worker:
    """Runs an iterator in a thread, up to `depth` items ahead; re-raises its error in the reader."""

    def __init__(self, source: Iterator[Any], depth: int, name: str):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, args=(source,), name=name, daemon=True)
        self.thread.start()

    def _run(self, source: Iterator[Any]) -> None:
        try:
            for item in source:
                self.queue.put(("item", item))
            self.queue.put(("done", None))
        except BaseException as e:  # noqa: BLE001 - handed to the reading thread
            self.queue.put(("error", e))

    def __iter__(self) -> Iterator[Any]:
        while True:
            kind, value = self.queue.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value

    def join(self, timeout_s: float | None = None) -> None:
        self.thread.join(timeout_s)


def timed(timings: dict[str, float], key: str, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), adding its wall-clock seconds to timings[key]."""
    t0 = time.perf_counter()
    out = fn(*args)
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
    return out
