"""The serving engine's CPU time per step, which the GPU waits for: fixed + per sequence + per token.

Engines before asynchronous output processing (vLLM before v0.6) run the model only after
the CPU has scheduled the step, prepared its inputs, and processed the previous step's
outputs, so this time adds to every step. Three parts, each a field of the engine profile
(`simulator.specs.serving.EngineSpec`):

- `step_overhead_us`, once per step (scheduling, kernel launches, the output round trip);
  vllm-project/vllm#6854 measured a 5-13 ms GPU bubble per decode step in vLLM before v0.6.
- `per_sequence_overhead_us`, once per sequence in the step (its block table and input
  slots, its sampled token, detokenization, its output object). DistServe's profile of
  vLLM 0.2 serving OPT-13B on one A100-80GB grows by 51 us per sequence of a decode batch
  (batch < 95; LLMServe/DistServe simdistserve/estimators/profile_data, before its
  "Realign the curve" rescaling).
- `per_context_token_overhead_us`, once per token a sequence holds (prompt + generated)
  when it is in a step. vLLM 0.2's API server with `--engine-use-ray --worker-use-ray`
  ships every scheduled sequence's full token ids to the worker process
  (SequenceGroupMetadata) and back to the API server (RequestOutput: prompt ids, output
  ids, text) on every step, so that part of the step grows with the context of the
  batch, not with its number of sequences. DistServe's simulator of that deployment
  charges 2 ms + 0.1 us per context token per step (`Worker.add_ray_overhead`); the
  catalog's `vllm-0.2-ray` profile sizes it from the replayed runs (README, serving
  validation).

Without an engine profile, the device's `step_overhead_us` applies alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from simulator.serving.iteration import Work
    from simulator.specs.serving import EngineSpec


@dataclass(frozen=True, slots=True)
class EngineOverhead:
    """CPU seconds of one engine step, by part."""

    step_s: float = 0.0
    per_sequence_s: float = 0.0
    per_context_token_s: float = 0.0

    @classmethod
    def of(cls, engine: EngineSpec | None, device_step_overhead_us: float) -> EngineOverhead:
        if engine is None:
            return cls(step_s=device_step_overhead_us * 1e-6)
        return cls(engine.step_overhead_us * 1e-6, engine.per_sequence_overhead_us * 1e-6,
                   engine.per_context_token_overhead_us * 1e-6)

    def breakdown(self, works: Sequence[Work]) -> dict[str, float]:
        """Seconds per part for a step over `works` (nothing for an empty step)."""
        if not works:
            return {"step": 0.0, "sequences": 0.0, "context_tokens": 0.0}
        tokens = sum(w.context + w.new_tokens for w in works)
        return {"step": self.step_s, "sequences": self.per_sequence_s * len(works),
                "context_tokens": self.per_context_token_s * tokens}

    def seconds(self, works: Sequence[Work]) -> float:
        if not works:
            return 0.0
        return self.seconds_of(len(works), sum(w.context + w.new_tokens for w in works))

    def seconds_of(self, sequences: int, context_tokens):
        """Seconds of a non-empty step of `sequences` holding `context_tokens` in all (an int,
        or an array over the steps of a run): the sum of `breakdown`'s parts, in its order."""
        return self.step_s + self.per_sequence_s * sequences + self.per_context_token_s * context_tokens
