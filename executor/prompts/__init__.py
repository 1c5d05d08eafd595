"""Prompt programs (APPL's design, Dong et al. 2024, arXiv 2406.13161): LLM calls in Python.

    from executor.prompts import ppl, gen

    @ppl
    def vote(question: str, n: int = 10) -> str:
        "Answer with one word."
        question
        answers = [gen(max_tokens=8, temperature=0.7, seed=i) for i in range(n)]   # run at once
        return max(set(map(str, answers)), key=[str(a) for a in answers].count)

`function` (`ppl`, `gen`, `call_tool`), `context` (prompt context and formatting), `future`
(`Gen`, the string-like future), `runtime` (parallel dispatch, call tree), `backends` (OpenAI
HTTP, local engine, simulated, replay, cache), `trace` (JSONL trace), `tools`.
"""

from executor.prompts.backends import (
    Backend,
    BackendError,
    CachingBackend,
    CallRequest,
    Completion,
    OpenAIBackend,
    ReplayBackend,
    ReplayMiss,
    SimulatedBackend,
    backend_from_env,
)
from executor.prompts.context import (
    BulletList,
    Lines,
    Message,
    NumberedList,
    PromptContext,
    Tagged,
    assistant,
    system,
    user,
)
from executor.prompts.function import call_tool, gen, ppl
from executor.prompts.future import CallError, Gen
from executor.prompts.runtime import Runtime, current_runtime
from executor.prompts.tools import Tool, tool
from executor.prompts.trace import Trace, TraceWriter, read_trace

__all__ = [
    "Backend", "BackendError", "BulletList", "CachingBackend", "CallError", "CallRequest", "Completion", "Gen",
    "Lines", "Message", "NumberedList", "OpenAIBackend", "PromptContext", "ReplayBackend", "ReplayMiss",
    "Runtime", "SimulatedBackend", "Tagged", "Tool", "Trace", "TraceWriter", "assistant", "backend_from_env",
    "call_tool", "current_runtime", "gen", "ppl", "read_trace", "system", "tool", "user",
]
