"""Drafters: who proposes the k tokens the target then verifies in one forward.

A drafter is anything with `propose(contexts, cache, k) -> LongTensor [B, k]`, where
`contexts[i]` is everything known of live sequence i (prompt, committed output, and last the
pending token: the target's greedy next token, not yet in the cache) and `cache.lengths[i]
== len(contexts[i]) - 1`. The loop in `speculative.py` does not care which drafter it runs.
Both drafters share the target's tokenizer (they propose target token ids).

- `NgramDrafter`: prompt lookup (Saxena 2023, "Prompt Lookup Decoding"; vLLM's `ngram`
  speculative method): find the latest earlier occurrence of the context's last n tokens
  (n from max_n down to min_n) and propose the k tokens that followed it. Costs microseconds,
  pays off when the output copies the prompt (code edits, summaries quoting the input).
- `SelfDrafter`: layer-truncated self-drafting: the target's first N layers, its final norm
  and LM head (no extra weights), writing into the target's own KV cache for those layers.
  The verification forward then recomputes those positions from the same tokens through the
  same weights and overwrites them with the same values, so no separate draft cache exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from executor.serving.model import KVCache, LlamaDecoder


class Drafter(Protocol):
    name: str

    def propose(self, contexts: Sequence[Sequence[int]], cache: KVCache, k: int) -> torch.Tensor:
        """k draft tokens for every live sequence: LongTensor [len(contexts), k]."""
        ...


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r}: a drafter proposes at least 1 token (k >= 1); k = 0 needs no drafter")


class NgramDrafter:
    """Prompt-lookup drafting over each sequence's own context (no model, no cache)."""

    name = "ngram"

    def __init__(self, max_n: int = 3, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"min_n={min_n}, max_n={max_n}: need 1 <= min_n <= max_n")
        self.max_n, self.min_n = max_n, min_n

    def continuation(self, context: Sequence[int], k: int) -> tuple[list[int], bool]:
        """The k tokens after the latest earlier match of the context's suffix, and whether
        one was found. A match near the end continues into its own proposal (a repeating
        pattern keeps repeating); no match proposes the last token k times, so the batch
        stays rectangular (those drafts will almost always be rejected)."""
        arr = np.asarray(context, dtype=np.int64)
        n_ctx = arr.shape[0]
        for n in range(min(self.max_n, n_ctx - 1), self.min_n - 1, -1):
            # windows starting at 0 .. n_ctx-1-n: every occurrence but the suffix itself
            windows = sliding_window_view(arr[:-1], n)
            hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
            if hits.size:
                seq = list(context)
                src = int(hits[-1]) + n
                for j in range(k):
                    seq.append(seq[src + j])
                return seq[n_ctx:], True
        return [int(arr[-1])] * k, False

    def propose(self, contexts: Sequence[Sequence[int]], cache: KVCache, k: int) -> torch.Tensor:
        _check_k(k)
        return torch.tensor([self.continuation(c, k)[0] for c in contexts], dtype=torch.long)


class SelfDrafter:
    """The target's first `n_layers` layers + final norm + LM head, one token per forward."""

    name = "self-draft"

    def __init__(self, decoder: LlamaDecoder, n_layers: int):
        if not 1 <= n_layers < decoder.cfg.n_layers:
            raise ValueError(f"n_layers={n_layers}: a self-draft uses 1 .. {decoder.cfg.n_layers - 1} "
                             f"of the target's {decoder.cfg.n_layers} layers")
        self.decoder, self.n_layers = decoder, n_layers

    def propose(self, contexts: Sequence[Sequence[int]], cache: KVCache, k: int) -> torch.Tensor:
        """k sequential forwards; each writes its token's K/V (first n_layers layers) at
        lengths + j and never advances `cache.lengths` (the caller's verification commits)."""
        _check_k(k)
        b = len(contexts)
        token = torch.tensor([c[-1] for c in contexts], dtype=torch.long)[:, None]
        out = torch.empty(b, k, dtype=torch.long)
        base = cache.lengths[:b].clone()
        try:
            for j in range(k):
                cache.lengths[:b] = base + j
                logits = self.decoder.forward(token, cache, n_layers=self.n_layers, last_only=True)
                token = logits[:, -1].argmax(-1)[:, None]
                out[:, j] = token[:, 0]
        finally:
            cache.lengths[:b] = base
        return out
