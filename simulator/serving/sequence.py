"""The life of one request inside a replica: prompt progress, generated tokens, timestamps."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from simulator.serving.workload import Request


@dataclass(slots=True)
class Seq:
    req: Request
    prefilled: int = 0          # prompt (+ recomputed) tokens whose KV is cached
    decoding: bool = False      # the prompt is done; each step adds one token
    generated: int = 0          # output tokens produced so far
    first_token_s: float | None = None
    finish_s: float | None = None
    preemptions: int = 0
    acceptance: float = 0.0     # speculative decoding: this request's per-token acceptance rate
    spec_accepted: int = 0      # drafted tokens accepted so far
    spec_rejections: int = 0    # steps that rejected a drafted token
    token_times: list[float] = field(default_factory=list)  # only when asked for
    keys: list[Hashable] | None = None   # prefix caching: its prompt's block keys (`block_keys`, once)

    @property
    def id(self) -> int:
        return self.req.id

    @property
    def prompt_len(self) -> int:
        """Tokens to (re)compute before decoding: the prompt, plus output lost to a recompute
        preemption."""
        return self.req.input_tokens + self.generated

    @property
    def context(self) -> int:
        """Tokens whose KV the next decode step reads."""
        return self.req.input_tokens + self.generated

    def block_keys(self, block_size: int) -> list[Hashable]:
        """Keys of the prompt's full KV blocks, equal for equal blocks that follow equal
        prompts (prefix caching, simulator/serving/kv_cache.py): a block all inside the
        request's shared prefix is its group's; any other is the request's own. The engine's
        sequences key their real tokens instead."""
        req, bs = self.req, block_size
        shared = req.prefix_tokens // bs if req.prefix_group is not None else 0
        return [("prefix", req.prefix_group, i) if i < shared else ("request", req.id, i)
                for i in range(req.input_tokens // bs)]

    @property
    def done(self) -> bool:
        return self.generated >= self.req.output_tokens

    def emit(self, now: float, tokens: int = 1) -> None:
        """`tokens` output tokens at `now` (more than one after a speculative step)."""
        self.generated += tokens
        if self.first_token_s is None:
            self.first_token_s = now
        if self.done:
            self.finish_s = now
