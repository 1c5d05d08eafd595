"""How a request picks its next token, and when it stops: greedy, temperature, top-p, seeds.

`SamplingParams` is what a client asks for (the OpenAI fields the engine honours), validated
with an error that names the field. `sample` turns one row of logits into a token:
- temperature 0 is greedy: the argmax, with no randomness at all (the sequential greedy
  decoder's token, so greedy requests are testable token for token);
- otherwise the logits are divided by the temperature, softmaxed in float32, cut to the
  top-p nucleus (the smallest set of most likely tokens whose probability reaches `top_p`;
  the most likely token is always kept, ties at the boundary broken by sort order), renormalized
  and sampled with the request's own `torch.Generator`.
Each request owns its generator, seeded from `seed` (or from the engine's seed sequence when
none is given), so a seeded request draws the same tokens whatever else is in its batch.

Log-probabilities (`logprobs`, the OpenAI field): for each sampled token, its log-probability
under the model's distribution (log-softmax of the raw logits, before temperature and top-p,
as vLLM reports them by default) and the `logprobs` most likely tokens with theirs
(`token_logprobs`).

Stop strings are checked on the decoded text by `StopChecker`, which also holds back the
tail of the text that could still become a stop string, so a stream never shows a partial
stop string that the final text then cuts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20   # the OpenAI API's limit on top_logprobs


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = field(default=())
    logprobs: int | None = None   # report each token's log-probability and this many top alternatives

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r}: must be an integer >= 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature={self.temperature!r}: must be in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r}: must be in (0, 1]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop={self.stop!r}: must be non-empty strings")
        if len(self.stop) > 4:
            raise ValueError(f"stop: at most 4 stop strings, got {len(self.stop)}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs={self.logprobs!r}: must be an integer in [0, {MAX_LOGPROBS}] (top "
                             f"alternatives per token)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def nucleus_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution a sampled token is drawn from: softmax(logits / T) cut to the top-p
    nucleus and renormalized (float32, one row of `vocab`)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(descending=True)
    before = sorted_p.cumsum(-1) - sorted_p          # mass of the tokens ranked above each one
    keep_sorted = before < top_p                      # keeps the top token (before = 0) always
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    cut = torch.where(keep, probs, torch.zeros_like(probs))
    return cut / cut.sum(-1, keepdim=True)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token from one row of logits [vocab] (see the module docstring)."""
    if params.greedy:
        return int(logits.argmax())
    probs = nucleus_probs(logits, params.temperature, params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token per row of logits [B, vocab]; greedy rows share one argmax.

    The argmax is `max(-1).indices` (also the first index of the maximum): on the 2-core Xeon
    it took 1.6 ms for 64 rows of 49152 float32 logits, `argmax` 5.2 ms (one thread)."""
    greedy = logits.max(-1).indices.tolist()
    return [greedy[i] if p.greedy else sample(logits[i], p, g)
            for i, (p, g) in enumerate(zip(params, generators))]


def token_logprobs(row: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` under one row of raw logits [vocab], and the `top` most
    likely tokens with theirs, most likely first."""
    lp = torch.log_softmax(row.float(), dim=-1)
    alternatives = []
    if top:
        values, ids = lp.topk(top)
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return float(lp[token]), alternatives


class StopChecker:
    """Decoded text of one request's output, cut at the first stop string.

    `update(ids)` re-decodes the whole output (a few hundred tokens at most here, so the
    quadratic cost stays far below a forward step) and returns whether a stop string was
    found. `text` is the output so far, cut before the stop string; `stable_text` leaves out
    what might still turn into a stop string or is an incomplete UTF-8 character, and is what a
    stream may already send."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str]):
        self.decode, self.stop = decode, tuple(stop)
        self.text = ""
        self.stopped = False

    def update(self, ids: list[int]) -> bool:
        text = self.decode(ids)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
        else:
            self.text = text
        return self.stopped

    @property
    def stable_text(self) -> str:
        if self.stopped:
            return self.text
        text = self.text.rstrip("\ufffd")  # a multi-byte character not complete yet
        hold = 0
        for s in self.stop:  # the longest tail of the text that is a proper prefix of a stop string
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        return text[:len(text) - hold]
