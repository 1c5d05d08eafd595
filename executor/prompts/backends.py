"""Backends answer one LLM call at a time; the runtime calls them from many threads at once.

- `OpenAIBackend`: any OpenAI-compatible endpoint (vLLM, SGLang, OpenAI, `simtune serve`)
  through httpx: chat completions, streaming or not, retries with exponential backoff on
  429 and 5xx, a timeout per call, and a clear error for an answer that is not the API's JSON.
- `LocalBackend` (executor.prompts.local): the serving engine in-process on SmolLM2-135M.
- `SimulatedBackend`: answers after the latency the serving simulator's iteration model
  predicts for the named model, cluster and deployment at the current number of calls in
  flight; every answer says it is simulated.
- `ReplayBackend`: answers from a trace with no backend call, strict (by call path and
  arguments) or loose (by arguments).
- `CachingBackend`: wraps another; deterministic calls (temperature 0) are answered from a
  cache after the first time.

`backend_from_env()` picks one by `SIMTUNE_LLM_BACKEND` (`local`, the default; `openai`, which
reads `OPENAI_BASE_URL`, `OPENAI_API_KEY` and `SIMTUNE_LLM_MODEL`; `simulated`, which reads
`SIMTUNE_SIM_MODEL`, `SIMTUNE_SIM_CLUSTER`, `SIMTUNE_SIM_DEPLOYMENT` and
`SIMTUNE_SIM_TIME_SCALE`).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

BACKENDS = ("local", "openai", "simulated")


class BackendError(RuntimeError):
    """The backend could not answer (after its retries), or answered something unreadable."""


@dataclass(frozen=True)
class CallRequest:
    messages: list[dict[str, str]]
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    tools: tuple[dict[str, Any], ...] = ()
    model: str | None = None
    path: str = ""  # the call's place in the program (ReplayBackend's strict key)

    def params(self) -> dict[str, Any]:
        """What a replay matches on besides the messages (JSON-ready)."""
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "stop": list(self.stop), "seed": self.seed, "tools": list(self.tools), "model": self.model}


@dataclass
class Completion:
    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    backend: str = ""
    simulated: bool = False


class Backend:
    name = "backend"
    max_concurrency = 64  # calls in flight at once; the runtime never adds a cap of its own

    def complete(self, request: CallRequest) -> Completion:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the backend holds (connections, an engine)."""


# --- OpenAI-compatible HTTP -----------------------------------------------------------------------


class OpenAIBackend(Backend):
    """POST {base_url}/chat/completions with httpx; retries 429/5xx with exponential backoff."""

    name = "openai"

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, timeout_s: float = 120.0,
                 retries: int = 4, backoff_s: float = 0.5, stream: bool = False, max_concurrency: int = 64):
        import httpx

        if not base_url:
            raise ValueError("OPENAI_BASE_URL / base_url: empty; give the endpoint, e.g. http://127.0.0.1:8000/v1")
        if not model:
            raise ValueError("SIMTUNE_LLM_MODEL / model: empty; give the served model's name")
        if retries < 0 or timeout_s <= 0:
            raise ValueError(f"retries={retries}, timeout_s={timeout_s}: need retries >= 0 and timeout_s > 0")
        self.base_url, self.model, self.stream = base_url.rstrip("/"), model, stream
        self.retries, self.backoff_s, self.max_concurrency = retries, backoff_s, max_concurrency
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
        self._client = httpx.Client(timeout=timeout_s, headers=headers, limits=limits)

    def _body(self, request: CallRequest) -> dict[str, Any]:
        body: dict[str, Any] = {"model": request.model or self.model, "messages": request.messages,
                                "max_tokens": request.max_tokens, "temperature": request.temperature,
                                "top_p": request.top_p, "stream": self.stream}
        if request.stop:
            body["stop"] = list(request.stop)
        if request.seed is not None:
            body["seed"] = request.seed
        if request.tools:
            body["tools"] = list(request.tools)
        return body

    def complete(self, request: CallRequest) -> Completion:
        import httpx

        url = f"{self.base_url}/chat/completions"
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random()))
            try:
                if self.stream:
                    return self._streamed(url, request)
                response = self._client.post(url, json=self._body(request))
            except (httpx.TimeoutException, httpx.TransportError) as err:
                last = err
                continue
            if response.status_code == 429 or response.status_code >= 500:
                last = BackendError(f"{url} answered {response.status_code}: {response.text[:200]}")
                continue
            if response.status_code >= 400:
                raise BackendError(f"{url} answered {response.status_code}: {response.text[:500]}")
            return self._parse(url, response.text)
        raise BackendError(f"{url}: no answer after {self.retries + 1} attempts; last: {last}")

    def _parse(self, url: str, text: str) -> Completion:
        try:
            data = json.loads(text)
            choice = data["choices"][0]
            message = choice["message"]
            usage = data.get("usage") or {}
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
            raise BackendError(f"{url} answered something that is not a chat completion "
                               f"({type(err).__name__}: {err}): {text[:200]!r}") from None
        return Completion(message.get("content") or "", usage.get("prompt_tokens"),
                          usage.get("completion_tokens"), message.get("tool_calls") or [], self.name)

    def _streamed(self, url: str, request: CallRequest) -> Completion:
        parts: list[str] = []
        usage: dict[str, Any] = {}
        with self._client.stream("POST", url, json=self._body(request)) as response:
            if response.status_code == 429 or response.status_code >= 500:
                raise BackendError(f"{url} answered {response.status_code}")
            if response.status_code >= 400:
                raise BackendError(f"{url} answered {response.status_code}: {response.read()[:500]!r}")
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                try:
                    chunk = json.loads(payload)
                    delta = chunk["choices"][0].get("delta", {}) if chunk.get("choices") else {}
                except (json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
                    raise BackendError(f"{url} streamed a chunk that is not JSON ({err}): {payload[:200]!r}") from None
                parts.append(delta.get("content") or "")
                usage = chunk.get("usage") or usage
        return Completion("".join(parts), usage.get("prompt_tokens"), usage.get("completion_tokens"),
                          [], self.name)

    def close(self) -> None:
        self._client.close()


# --- simulated --------------------------------------------------------------------------------------


class SimulatedBackend(Backend):
    """Latency from the serving simulator's cost model; the text says it is simulated.

    A call of p prompt tokens and n output tokens, issued while b calls are in flight, takes
    prefill(p) + n decode steps of a batch of b sequences at the call's context, on the
    deployment's layout (`simulator.serving.iteration`). `time_scale` < 1 runs faster than
    simulated time (the reported latency stays the simulated one).
    """

    name = "simulated"

    def __init__(self, model: str = "llama-3-8b", cluster: str = "1xa100-80gb",
                 deployment: str = "vllm-tp1", *, time_scale: float = 1.0, output_tokens: int | None = None,
                 max_concurrency: int = 256):
        from simulator.workflows.latency import CallLatency  # lazy: the simulator only when used

        if time_scale <= 0:
            raise ValueError(f"time_scale = {time_scale}: must be > 0")
        self.latency = CallLatency(model, cluster, deployment)
        self.label = f"{model} on {cluster} ({deployment})"
        self.time_scale, self.output_tokens, self.max_concurrency = time_scale, output_tokens, max_concurrency
        self._lock = threading.Lock()
        self._in_flight = 0

    def complete(self, request: CallRequest) -> Completion:
        prompt = sum(max(1, len(m["content"]) // 4) for m in request.messages)  # ~4 characters per token
        out = self.output_tokens or request.max_tokens
        with self._lock:
            self._in_flight += 1
            batch = self._in_flight
        try:
            seconds = self.latency.seconds(prompt, out, batch)
            time.sleep(seconds * self.time_scale)
        finally:
            with self._lock:
                self._in_flight -= 1
        text = f"[simulated: {out} tokens from {self.label}, {seconds:.3f} s at batch {batch}]"
        return Completion(text, prompt, out, [], self.name, simulated=True)


# --- replay and cache -------------------------------------------------------------------------------


class ReplayMiss(BackendError):
    """A replayed run asked for a call the trace does not have."""


class ReplayBackend(Backend):
    """Answers from a trace: `strict` matches the call's path and arguments, `loose` only its
    arguments (each recorded answer used once, in order)."""

    name = "replay"
    max_concurrency = 1024

    def __init__(self, trace: Any, mode: str = "strict"):
        from executor.prompts.trace import read_trace

        if mode not in ("strict", "loose"):
            raise ValueError(f"mode = {mode!r}: allowed strict, loose")
        self.trace = trace if not isinstance(trace, (str, os.PathLike)) else read_trace(trace)
        self.mode = mode
        self.calls = 0  # backend calls made: always 0 (for tests and reports)
        self._lock = threading.Lock()
        self._by_path = {c.path: c for c in self.trace.calls.values() if c.finished}
        self._by_key: dict[str, list[Any]] = {}
        for c in sorted(self.trace.calls.values(), key=lambda c: c.submitted):
            if c.finished:
                self._by_key.setdefault(c.key, []).append(c)

    def complete(self, request: CallRequest) -> Completion:
        from executor.prompts.trace import call_key

        key = call_key(request.messages, request.params())
        with self._lock:
            if self.mode == "strict":
                rec = self._by_path.get(request.path)
                if rec is None or rec.key != key:
                    why = "no call at this path" if rec is None else "its arguments differ from the recorded ones"
                    raise ReplayMiss(f"strict replay of {self.trace.path}: call {request.path}: {why}")
            else:
                queue = self._by_key.get(key)
                if not queue:
                    raise ReplayMiss(f"loose replay of {self.trace.path}: no recorded call with these "
                                     f"arguments left (call {request.path})")
                rec = queue.pop(0)
        return Completion(rec.response or "", rec.prompt_tokens, rec.completion_tokens, rec.tool_calls,
                          f"replay of {rec.backend}", rec.simulated)


class CachingBackend(Backend):
    """Deterministic calls (temperature 0) answered once per distinct request."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.name, self.max_concurrency = f"cached {inner.name}", inner.max_concurrency
        self.hits = self.misses = 0
        self._cache: dict[str, Completion] = {}
        self._lock = threading.Lock()

    def complete(self, request: CallRequest) -> Completion:
        from executor.prompts.trace import call_key

        if request.temperature != 0.0:
            return self.inner.complete(request)
        key = call_key(request.messages, request.params())
        with self._lock:
            if key in self._cache:
                self.hits += 1
                return self._cache[key]
        completion = self.inner.complete(request)
        with self._lock:
            self.misses += 1
            self._cache[key] = completion
        return completion

    def close(self) -> None:
        self.inner.close()


def backend_from_env(environ: dict[str, str] | None = None) -> Backend:
    env = os.environ if environ is None else environ
    kind = env.get("SIMTUNE_LLM_BACKEND", "local")
    if kind == "openai":
        return OpenAIBackend(env.get("OPENAI_BASE_URL", ""), env.get("SIMTUNE_LLM_MODEL", ""),
                             env.get("OPENAI_API_KEY"))
    if kind == "simulated":
        return SimulatedBackend(env.get("SIMTUNE_SIM_MODEL", "llama-3-8b"),
                                env.get("SIMTUNE_SIM_CLUSTER", "1xa100-80gb"),
                                env.get("SIMTUNE_SIM_DEPLOYMENT", "vllm-tp1"),
                                time_scale=float(env.get("SIMTUNE_SIM_TIME_SCALE", "1")))
    if kind == "local":
        from executor.prompts.local import LocalBackend

        return LocalBackend()
    raise ValueError(f"SIMTUNE_LLM_BACKEND = {kind!r}: allowed {', '.join(BACKENDS)}")
