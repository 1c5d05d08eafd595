"""The life of one request inside a replica: prompt progress, generated tokens, timestamps."""

from __future__ import annotations

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
    token_times: list[float] = field(default_factory=list)  # only when asked for

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

    @property
    def done(self) -> bool:
        return self.generated >= self.req.output_tokens

    def emit(self, now: float) -> None:
        """One output token at `now`."""
        self.generated += 1
        if self.first_token_s is None:
            self.first_token_s = now
        if self.done:
            self.finish_s = now
