"""The OpenAI-compatible HTTP server: a thin ASGI layer over the engine thread.

```
POST /v1/completions, /v1/chat/completions --validate--> EngineThread.submit --> engine steps
      <-- JSON, or SSE chunks (data: {...}\\n\\n ... data: [DONE]) <-- on_output per step
GET /v1/models, /health, /metrics (Prometheus text)
```

The engine is one `Engine` or, for a deployment with dp > 1, a `ReplicatedEngine`
(executor/serving/replicas.py) with the same API: the server and the step loop do not tell
them apart; /metrics then sums the replicas' counters and KV blocks.

Every request is validated before it reaches the engine: pydantic models check fields and
types, the engine's `check_request` the context length, the model name must be the served
one. Failures are OpenAI-style bodies, `{"error": {"message", "type", "param", "code"}}`:
400 for bad input, 404 for an unknown model or path, 429 when the bounded queue is full,
500 for a bug inside a step (which ends only the requests it touched). Each request gets an
asyncio queue that the engine thread fills through `loop.call_soon_threadsafe`; a stream
whose client goes away is cancelled by the ASGI server, and its `finally` aborts the request,
which frees its KV blocks between two steps.

Choices: `n` (up to 16) runs n engine requests on the same prompt, batched with the rest; a
seeded request's choice i samples from seed + i, so the choices differ and repeat. Their
outputs share one queue; a stream interleaves the choices' chunks by `index`.

Log-probabilities: `logprobs` (0-5 alternatives) on completions, `logprobs: true` and
`top_logprobs` (0-20) on chat, in the OpenAI shapes (completions: tokens, token_logprobs,
top_logprobs, text_offset; chat: content entries of token, logprob, bytes, top_logprobs), each
token as its own decoded text; a stream sends each token's entry with the chunk that follows it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from executor.serving.engine import EngineConfig, EngineSeq, RequestRejected
from executor.serving.loop import EngineThread, Handle, QueueFull
from executor.serving.sampling import SamplingParams
from executor.serving.workers import RankFailed
from simulator.errors import SpecError

SERVED_MODEL = "smollm2-135m"   # the one model the engine loads (SmolLM2-135M-Instruct)
MAX_CHOICES = 16                 # n, choices per request

Int = Annotated[int, Field(strict=True)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: Int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: Int = Field(default=1, ge=1, le=MAX_CHOICES, description="choices: one engine request each")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Int | None = None
    ignore_eos: bool = False


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[Int]
    logprobs: Int | None = Field(default=None, ge=0, le=5, description="top alternatives per token")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Int | None = Field(default=None, ge=0, le=20)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type_, param, code


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


class OpenAIServer:
    """Turns HTTP requests into engine requests; `app` is the ASGI application."""

    def __init__(self, engine_thread: EngineThread, tokenizer, model_name: str, default_chat_max_tokens: int = 256):
        self.loop_thread, self.tokenizer, self.model_name = engine_thread, tokenizer, model_name
        self.default_chat_max_tokens = default_chat_max_tokens
        self.created = int(time.time())
        self.app = self._build()

    # --- requests -> engine -------------------------------------------------------------------
    def _params(self, body: _Sampling, max_tokens: int | None, default: int,
                logprobs: int | None = None) -> SamplingParams:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        try:
            return SamplingParams(max_tokens=max_tokens or default, temperature=body.temperature,
                                  top_p=body.top_p, seed=body.seed, stop=tuple(stop), ignore_eos=body.ignore_eos,
                                  logprobs=logprobs)
        except ValueError as exc:
            raise APIError(400, str(exc), param=str(exc).split("=")[0].split(":")[0]) from exc

    def _check_model(self, body: _Sampling) -> None:
        if body.model != self.model_name:
            raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def _submit(self, prompt_ids: list[int], params: list[SamplingParams]) -> tuple[list[Handle], asyncio.Queue]:
        """One engine request per choice; their outputs arrive on one queue as (choice index,
        update). A choice that cannot be queued takes back the ones queued before it."""
        q: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def on_output(index: int):
            def put(seq: EngineSeq) -> None:   # the sequence itself too: its lists only grow
                update = (seq.text, len(seq.output_ids), seq.finish_reason, seq)
                loop.call_soon_threadsafe(q.put_nowait, (index, update))
            return put

        handles: list[Handle] = []
        try:
            for i, p in enumerate(params):
                handles.append(self.loop_thread.submit(prompt_ids, p, on_output(i)))
            return handles, q
        except (RequestRejected, QueueFull, RankFailed) as exc:
            for handle in handles:
                self.loop_thread.abort(handle)
            if isinstance(exc, RequestRejected):
                raise APIError(400, str(exc), param=exc.param, code=exc.code) from exc
            if isinstance(exc, QueueFull):
                raise APIError(429, str(exc), "rate_limit_error", code="queue_full") from exc
            raise APIError(503, f"the engine has stopped: {exc}", "server_error", code="rank_failed") from exc

    @staticmethod
    async def _updates(q: asyncio.Queue, n: int) -> AsyncIterator[tuple[int, tuple[str, int, str | None, EngineSeq]]]:
        """(choice index, (text so far, output tokens, finish reason, sequence)) until every
        choice has finished; of one choice, the newest only when several of its updates wait."""
        live = set(range(n))
        while live:
            index, update = await q.get()
            waiting = []
            while not q.empty() and update[2] is None:
                other = q.get_nowait()
                if other[0] == index:
                    update = other[1]
                else:
                    waiting.append(other)
            for other in waiting:   # other choices' updates, in their order, for the next turns
                q.put_nowait(other)
            yield index, update
            if update[2] is not None:
                live.discard(index)

    def _completion_prompt(self, body: CompletionRequest) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "prompt: one prompt per request (batches of prompts are not supported)",
                               param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.tokenizer(prompt, add_special_tokens=False).input_ids
        return list(prompt)

    def _chat_prompt(self, body: ChatRequest) -> list[int]:
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                    for m in body.messages]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    # --- engine -> responses ------------------------------------------------------------------
    async def _respond(self, body: _Sampling, prompt_ids: list[int], params: SamplingParams, chat: bool):
        # n choices: n engine requests; a seeded request's choice i draws from seed + i
        choices = [params if params.seed is None else replace(params, seed=params.seed + i) for i in range(body.n)]
        handles, q = self._submit(prompt_ids, choices)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name}
        state = [{"text": "", "n": 0, "reason": None, "seq": None, "lp_sent": 0, "offset": 0} for _ in handles]

        def usage() -> dict:
            n = sum(c["n"] for c in state)
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": n, "total_tokens": len(prompt_ids) + n}

        def logprobs(seq, start: int, end: int, offset: int = 0) -> dict | None:
            if params.logprobs is None:
                return None
            ids, entries = seq.output_ids[start:end], seq.logprobs[start:end]
            return self._chat_logprobs(ids, entries) if chat else self._completion_logprobs(ids, entries, offset)

        def abort_unfinished() -> None:   # cancelled (the client went away): free their blocks
            for handle, c in zip(handles, state):
                if c["reason"] is None:
                    self.loop_thread.abort(handle)

        if not body.stream:
            try:
                async for i, (text, n, reason, seq) in self._updates(q, len(handles)):
                    state[i].update(text=text, n=n, reason=reason, seq=seq)
            finally:
                abort_unfinished()
            if any(c["reason"] == "error" for c in state):
                raise APIError(500, "the engine failed while running this request", "server_error")
            out = []
            for i, c in enumerate(state):
                lp = logprobs(c["seq"], 0, c["n"])
                out.append({"index": i, "message": {"role": "assistant", "content": c["text"]}, "logprobs": lp,
                            "finish_reason": c["reason"]} if chat else
                           {"index": i, "text": c["text"], "logprobs": lp, "finish_reason": c["reason"]})
            return JSONResponse({**head, "choices": out, "usage": usage()})

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        head["object"] = "chat.completion.chunk" if chat else "text_completion"

        def chunk(i: int, delta: str | None, reason: str | None, role: bool = False, lp: dict | None = None) -> str:
            if chat:
                d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta else {})
                choice = {"index": i, "delta": d, "logprobs": lp, "finish_reason": reason}
            else:
                choice = {"index": i, "text": delta or "", "logprobs": lp, "finish_reason": reason}
            return _sse({**head, "choices": [choice], **({"usage": None} if include_usage else {})})

        async def events() -> AsyncIterator[str]:
            try:
                if chat:
                    for i in range(len(handles)):
                        yield chunk(i, None, None, role=True)
                async for i, (text, n, reason, seq) in self._updates(q, len(handles)):
                    c = state[i]
                    if reason == "error":
                        c["reason"] = reason
                        yield _sse({"error": {"message": "the engine failed while running this request",
                                              "type": "server_error", "param": None, "code": None}})
                        return
                    delta = text[len(c["text"]):]
                    c.update(text=text, n=n, reason=reason)
                    if reason is None and not delta:
                        continue
                    lp = logprobs(seq, c["lp_sent"], n, c["offset"])
                    if lp is not None and not chat:
                        c["offset"] += sum(len(t) for t in lp["tokens"])
                    c["lp_sent"] = n
                    yield chunk(i, delta, reason, lp=lp)
            finally:  # the client went away mid-stream: free its sequences
                abort_unfinished()
            if include_usage:
                yield _sse({**head, "choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _chat_logprobs(self, ids: list[int], entries: list) -> dict:
        def entry(token: int, logprob: float, alternatives=None) -> dict:
            text = self._token_text(token)
            out = {"token": text, "logprob": logprob, "bytes": list(text.encode())}
            if alternatives is not None:
                out["top_logprobs"] = [entry(t, v) for t, v in alternatives]
            return out

        return {"content": [entry(t, lp, alts) for t, (lp, alts) in zip(ids, entries)]}

    def _completion_logprobs(self, ids: list[int], entries: list, offset: int = 0) -> dict:
        tokens = [self._token_text(t) for t in ids]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": [lp for lp, _ in entries],
                "top_logprobs": [{self._token_text(t): v for t, v in alts} for _, alts in entries],
                "text_offset": offsets}

    # --- the app ------------------------------------------------------------------------------
    def _build(self) -> FastAPI:
        app = FastAPI(title="simtune OpenAI-compatible server", docs_url=None, redoc_url=None)

        @app.exception_handler(APIError)
        async def _api_error(_: Request, exc: APIError):
            return error_response(exc.status, str(exc), exc.type, exc.param, exc.code)

        @app.exception_handler(RequestValidationError)
        async def _invalid(_: Request, exc: RequestValidationError):
            errors = exc.errors()
            first = errors[0] if errors else {}
            loc = [str(x) for x in first.get("loc", ()) if x != "body"]
            param = ".".join(loc) or None
            message = f"{param}: {first.get('msg', 'invalid request')}" if param else first.get("msg", "invalid request")
            return error_response(400, message, "invalid_request_error", param, None)

        @app.exception_handler(HTTPException)
        async def _http(_: Request, exc: HTTPException):
            return error_response(exc.status_code, str(exc.detail), "invalid_request_error")

        @app.exception_handler(Exception)
        async def _bug(_: Request, exc: Exception):
            return error_response(500, f"internal error: {type(exc).__name__}", "server_error")

        @app.get("/health")
        async def health():
            if not self.loop_thread.alive:
                why = f": {self.loop_thread.fatal}" if self.loop_thread.fatal else ""
                return error_response(503, f"the engine thread has stopped{why}", "server_error")
            return {"status": "ok"}

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                                "owned_by": "simtune",
                                                "max_model_len": self.loop_thread.engine.max_request_tokens}]}

        @app.get("/metrics")
        async def metrics():
            return PlainTextResponse(prometheus_text(self.loop_thread), media_type="text/plain; version=0.0.4")

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest):
            self._check_model(body)
            params = self._params(body, body.max_tokens, 16, body.logprobs)
            return await self._respond(body, self._completion_prompt(body), params, chat=False)

        @app.post("/v1/chat/completions")
        async def chat(body: ChatRequest):
            self._check_model(body)
            prompt = self._chat_prompt(body)
            room = self.loop_thread.engine.max_request_tokens - len(prompt)
            default = max(1, min(self.default_chat_max_tokens, room))
            if body.top_logprobs is not None and not body.logprobs:
                raise APIError(400, "top_logprobs: needs logprobs set to true", param="top_logprobs")
            params = self._params(body, body.max_completion_tokens or body.max_tokens, default,
                                  (body.top_logprobs or 0) if body.logprobs else None)
            return await self._respond(body, prompt, params, chat=True)

        return app


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def prometheus_text(loop_thread: EngineThread) -> str:
    """The engine's state in Prometheus' text format."""
    eng = loop_thread.engine
    st = eng.stats
    rows = [
        ("simtune_queue_length", "gauge", "Requests waiting to be admitted.", loop_thread.queue_length),
        ("simtune_running_sequences", "gauge", "Sequences admitted and not finished.", eng.num_running),
        ("simtune_kv_blocks_used", "gauge", "KV cache blocks in use.", eng.blocks.num_used_gpu_blocks),
        ("simtune_kv_blocks_total", "gauge", "KV cache blocks in the pool.", eng.blocks.num_gpu_blocks),
        ("simtune_output_tokens_per_second", "gauge", "Output tokens per second over the last 10 s.",
         round(st.tokens_per_s(eng.now()), 3)),
        ("simtune_output_tokens_total", "counter", "Output tokens generated.", st.output_tokens),
        ("simtune_prompt_tokens_total", "counter", "Prompt tokens computed (recomputation included).",
         st.prompt_tokens),
        ("simtune_prompt_tokens_cached_total", "counter", "Prompt tokens taken from the prefix cache.",
         st.cached_prompt_tokens),
        ("simtune_requests_finished_total", "counter", "Requests that finished.", st.finished),
        ("simtune_requests_aborted_total", "counter", "Requests aborted (clients gone).", st.aborted),
        ("simtune_preemptions_total", "counter", "Sequences preempted.", eng.scheduler.preemptions),
        ("simtune_step_errors_total", "counter", "Steps that raised an error.", loop_thread.step_errors),
        ("simtune_max_batch_size", "gauge", "Most sequences in one step so far.", st.max_batch_size),
    ]
    if eng.spec is not None:  # speculative decoding (n-gram drafts)
        sp = eng.spec.speculator
        rows += [
            ("simtune_spec_drafted_tokens_total", "counter", "Draft tokens verified.", sp.drafted),
            ("simtune_spec_accepted_tokens_total", "counter", "Draft tokens accepted.", sp.accepted),
            ("simtune_spec_decode_steps_total", "counter", "Decode steps under speculation (k = 0 included).",
             sp.steps),
        ]
    lines = []
    for name, kind, help_, value in rows:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
    lines += ["# HELP simtune_steps_total Engine steps by kind.", "# TYPE simtune_steps_total counter"]
    lines += [f'simtune_steps_total{{kind="{k}"}} {v}' for k, v in sorted(st.steps.items())]
    return "\n".join(lines) + "\n"


def serve_forever(config: EngineConfig, host: str = "127.0.0.1", port: int = 8000, dtype: str = "bfloat16",
                  model_name: str = SERVED_MODEL, max_queue: int = 256, log_level: str = "info",
                  engine_process: bool = True) -> None:
    """Load SmolLM2, start the engine thread and serve HTTP until interrupted; `engine_process`:
    the engine steps in a process of its own (executor/serving/replicas.py), not in a thread of
    this one."""
    import torch
    import uvicorn

    from executor.allocator import keep_freed_memory
    from executor.serving.model import load_decoder, load_tokenizer
    from executor.serving.replicas import start_engine

    if dtype not in ("bfloat16", "float32"):
        raise SpecError("dtype", dtype, "one of 'bfloat16', 'float32'")
    if not engine_process:
        keep_freed_memory()   # the engine steps here (its ranks and a replica's process set their own)
    tokenizer = load_tokenizer()
    # starts tp x pp ranks; dp > 1: dp replicas, each in its own process (executor/serving/replicas.py)
    engine = start_engine(load_decoder(dtype=getattr(torch, dtype)), config, tokenizer, own_process=engine_process)
    try:
        loop_thread = EngineThread(engine, max_queue).start()
        try:
            uvicorn.run(OpenAIServer(loop_thread, tokenizer, model_name).app, host=host, port=port,
                        log_level=log_level)
        finally:
            loop_thread.stop()
    finally:
        engine.close()
