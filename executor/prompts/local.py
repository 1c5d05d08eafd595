"""`LocalBackend`: SmolLM2-135M-Instruct in this process, on the serving engine.

The engine (`executor.serving.engine`) runs its step loop in a thread (`EngineThread`);
every call the runtime makes is one request submitted to it, so concurrent calls are batched
together by its continuous batching, as they would be by a server, without HTTP in between.
Chat messages become a prompt through the model's own chat template. The first call loads
the model (a few seconds); `close()` stops the loop. The engine computes with `threads` torch
threads (1 by default: with more, a CPU shared with other work slows down many times over
as the threads wait for each other; this sets the whole process's torch thread count).
"""

from __future__ import annotations

import threading

from executor.prompts.backends import Backend, BackendError, CallRequest, Completion


class LocalBackend(Backend):
    name = "local"

    def __init__(self, dtype: str = "bfloat16", max_num_seqs: int = 64, max_concurrency: int = 256,
                 max_queue: int = 1024, threads: int | None = 1):
        if dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dtype = {dtype!r}: allowed bfloat16, float32")
        if threads is not None and threads < 1:
            raise ValueError(f"threads = {threads}: must be >= 1 (or None to keep torch's setting)")
        self.threads = threads
        self.dtype, self.max_num_seqs = dtype, max_num_seqs
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self._loop = None
        self._tokenizer = None
        self._lock = threading.Lock()

    def _started(self):
        with self._lock:
            if self._loop is None:
                import torch

                from executor.serving.engine import Engine, EngineConfig
                from executor.serving.loop import EngineThread
                from executor.serving.model import load_decoder, load_tokenizer

                if self.threads is not None:
                    torch.set_num_threads(self.threads)
                self._tokenizer = load_tokenizer()
                engine = Engine(load_decoder(dtype=getattr(torch, self.dtype)),
                                EngineConfig(max_num_seqs=self.max_num_seqs), self._tokenizer)
                self._loop = EngineThread(engine, self.max_queue).start()
            return self._loop, self._tokenizer

    def complete(self, request: CallRequest) -> Completion:
        from executor.serving.sampling import SamplingParams

        if request.tools:
            raise BackendError("the local backend has no native tool calling: describe tools in the prompt "
                               "and run them with call_tool (see examples/prompts/react_agent.py)")
        loop, tokenizer = self._started()
        text = tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
        params = SamplingParams(max_tokens=request.max_tokens, temperature=request.temperature,
                                top_p=request.top_p, seed=request.seed, stop=tuple(request.stop))
        finished = threading.Event()
        state: dict = {}

        def on_output(seq) -> None:
            if seq.finish_reason is not None:
                state.update(text=seq.text, tokens=len(seq.output_ids), reason=seq.finish_reason)
                finished.set()

        try:
            loop.submit(prompt_ids, params, on_output)
        except ValueError as err:  # RequestRejected, QueueFull
            raise BackendError(f"the local engine refused the call: {err}") from err
        while not finished.wait(1.0):
            if not loop.alive:
                raise BackendError("the local engine's step loop stopped")
        if state["reason"] == "abort":
            raise BackendError("the local engine aborted the call")
        return Completion(state["text"], len(prompt_ids), state["tokens"], [], self.name)

    def close(self) -> None:
        with self._lock:
            if self._loop is not None:
                self._loop.stop()
                self._loop = None
