"""Prompt programs: @ppl functions, string-like futures, the parallel runtime, tracing, replay,
the HTTP backend's error handling, and the workflow prediction built on traces."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from executor.prompts import (
    Backend,
    BackendError,
    CachingBackend,
    CallError,
    Completion,
    NumberedList,
    OpenAIBackend,
    ReplayBackend,
    ReplayMiss,
    Runtime,
    Tagged,
    Tool,
    call_tool,
    gen,
    ppl,
    read_trace,
    system,
)
from simtune.cli import app
from simulator.errors import SpecError
from simulator.workflows import CallNode, WorkflowDAG, dag_from_trace, predict_workflow
from simulator.workflows.predict import amdahl


class Scripted(Backend):
    """Answers after `delay` seconds with a function of the last message; counts concurrency."""

    name = "scripted"

    def __init__(self, delay: float = 0.05, answer=None, fail_on: str | None = None, max_concurrency: int = 64):
        self.delay, self.answer, self.fail_on, self.max_concurrency = delay, answer, fail_on, max_concurrency
        self.lock = threading.Lock()
        self.in_flight = self.peak = self.calls = 0
        self.requests = []

    def complete(self, request):
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            self.calls += 1
            self.requests.append(request)
        try:
            time.sleep(self.delay)
            last = request.messages[-1]["content"]
            if self.fail_on and self.fail_on in last:
                raise RuntimeError(f"refused {last!r}")
            text = self.answer(request) if self.answer else f"re: {last}"
            return Completion(text, len(last) // 4 + 1, 3, [], self.name)
        finally:
            with self.lock:
                self.in_flight -= 1


@ppl
def ask(question: str):
    "You answer in one word."
    f"Question: {question}"
    return gen(max_tokens=4)


@ppl
def vote(question: str, n: int):
    answers = [ask(f"{question} #{i}") for i in range(n)]
    "Which is most common?"
    NumberedList(answers)
    return gen(max_tokens=4)


# --- prompt functions -------------------------------------------------------------------------


def test_docstring_is_the_system_prompt_and_expressions_build_the_user_message():
    backend = Scripted(delay=0)
    with Runtime(backend):
        str(ask("2+2?"))
    [req] = backend.requests
    assert req.messages == [{"role": "system", "content": "You answer in one word."},
                            {"role": "user", "content": "Question: 2+2?"}]


def test_formatting_composes_and_answers_become_assistant_messages():
    backend = Scripted(delay=0, answer=lambda r: "four")

    @ppl
    def chat():
        system("Be brief.")
        Tagged("task", NumberedList(["add", "check"]))
        first = gen(max_tokens=4)
        "Are you sure?"
        return first, gen(max_tokens=4)

    with Runtime(backend):
        first, second = chat()
        assert second == "four" and first == "four"
    last = backend.requests[1].messages
    assert last[0] == {"role": "system", "content": "Be brief."}
    assert last[1]["content"] == "<task>\n1. add\n2. check\n</task>"
    assert last[2] == {"role": "assistant", "content": "four"}
    assert last[3] == {"role": "user", "content": "Are you sure?"}


def test_context_modes_new_copy_and_same():
    backend = Scripted(delay=0)

    @ppl(ctx="same")
    def shared(text):
        text

    @ppl(ctx="copy")
    def copied(text):
        text
        return gen(max_tokens=2)

    @ppl
    def caller():
        """The system prompt."""
        "from the caller"
        shared("added by the callee")
        _ = str(copied("only in the copy"))  # a bare str(...) statement would add the answer
        return gen(max_tokens=2)

    with Runtime(backend):
        str(caller())
    copy_req, caller_req = backend.requests
    assert copy_req.messages[0] == {"role": "system", "content": "The system prompt."}
    assert copy_req.messages[-1]["content"] == "from the caller\nadded by the callee\nonly in the copy"
    assert caller_req.messages[-1]["content"] == "from the caller\nadded by the callee"


def test_bad_arguments_are_refused_with_the_field():
    with pytest.raises(ValueError, match="ctx = 'shared'"):
        ppl(ctx="shared")
    with pytest.raises(ValueError, match="max_tokens = 0"):
        gen("hi", max_tokens=0)


# --- the runtime ------------------------------------------------------------------------------


def test_independent_calls_run_at_once_and_the_dependent_one_waits_for_them(tmp_path):
    backend = Scripted(delay=0.2)
    with Runtime(backend, trace=str(tmp_path / "t.jsonl")) as rt:
        t0 = time.perf_counter()
        answer = vote("2+2?", 8)
        issued = time.perf_counter() - t0
        str(answer)
        elapsed = time.perf_counter() - t0
    assert issued < 0.1  # gen() returned futures at once
    assert backend.peak == 8 and rt.peak_in_flight == 8
    assert 0.4 <= elapsed < 0.8  # two rounds of 0.2 s, not nine
    trace = read_trace(tmp_path / "t.jsonl")
    final = max(trace.calls.values(), key=lambda c: c.submitted)
    assert len(final.deps) == 8 and final.started >= max(trace.calls[d].ended for d in final.deps)


def test_the_concurrency_limit_is_respected():
    backend = Scripted(delay=0.05)
    with Runtime(backend, max_concurrency=3):
        outs = [gen(f"q{i}") for i in range(12)]
        assert all(str(o).startswith("re:") for o in outs)
    assert backend.peak == 3


def test_a_call_nobody_reads_still_completes_and_is_traced(tmp_path):
    backend = Scripted(delay=0.05)
    with Runtime(backend, trace=str(tmp_path / "t.jsonl")):
        gen("fire and forget")
    trace = read_trace(tmp_path / "t.jsonl")
    [call] = trace.calls.values()
    assert call.response == "re: fire and forget" and call.ended is not None


def test_exceptions_surface_at_the_point_of_use_with_the_calls_identity():
    backend = Scripted(delay=0.01, fail_on="#2")
    with Runtime(backend):
        answer = vote("bad", 4)  # no exception yet: only futures
        with pytest.raises(CallError) as info:
            str(answer)
    assert "ask[2]/gen[0]" in str(info.value) and "refused" in str(info.value)


def test_reading_a_result_makes_later_calls_depend_on_it(tmp_path):
    backend = Scripted(delay=0.02)
    with Runtime(backend, trace=str(tmp_path / "t.jsonl")):
        first = gen("one")
        if "re" in first:  # the program reads it: the next call comes after it
            gen("two")
    calls = sorted(read_trace(tmp_path / "t.jsonl").calls.values(), key=lambda c: c.submitted)
    assert calls[1].deps == [calls[0].id]


# --- trace, replay, cache -----------------------------------------------------------------------


def test_replay_makes_no_backend_call_and_reproduces_every_output(tmp_path):
    backend = Scripted(delay=0.01, answer=lambda r: f"{len(r.messages)}:{r.messages[-1]['content'][-6:]}")
    with Runtime(backend, trace=str(tmp_path / "t.jsonl")):
        original = str(vote("x", 5))
    for mode in ("strict", "loose"):
        replay = ReplayBackend(tmp_path / "t.jsonl", mode)
        with Runtime(replay):
            assert str(vote("x", 5)) == original
        assert replay.calls == 0
    with Runtime(ReplayBackend(tmp_path / "t.jsonl", "strict")), pytest.raises(CallError) as info:
        str(vote("y", 5))  # other arguments: not what was recorded
    assert "ReplayMiss" in str(info.value) and "arguments differ from the recorded ones" in str(info.value)
    with pytest.raises(ReplayMiss, match="no call at this path"):
        ReplayBackend(tmp_path / "t.jsonl", "strict").complete(_request())


def test_the_cache_answers_deterministic_calls_once():
    inner = Scripted(delay=0)
    cached = CachingBackend(inner)
    with Runtime(cached):
        assert str(gen("same")) == str(gen("same"))
        str(gen("same", temperature=0.7))
    assert (cached.hits, cached.misses, inner.calls) == (1, 1, 2)


def test_the_trace_survives_a_crash_mid_run(tmp_path):
    program = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_prompts import Scripted
        from executor.prompts import Runtime, gen
        rt = Runtime(Scripted(delay=0.01), trace={str(tmp_path / "t.jsonl")!r})
        from executor.prompts.runtime import activate
        activate(rt)
        for i in range(3):
            str(gen(f"q{{i}}"))
        gen("never answered")
        os._exit(1)   # dies without closing anything
    """)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    trace = read_trace(tmp_path / "t.jsonl")
    finished = [c for c in trace.calls.values() if c.finished]
    assert [c.response for c in sorted(finished, key=lambda c: c.submitted)] == ["re: q0", "re: q1", "re: q2"]


def test_a_trace_cut_mid_line_keeps_what_came_before(tmp_path):
    with Runtime(Scripted(delay=0), trace=str(tmp_path / "t.jsonl")):
        str(gen("a"))
    text = (tmp_path / "t.jsonl").read_text()
    (tmp_path / "cut.jsonl").write_text(text + '{"type": "call_start", "id": "c9", "pa')
    trace = read_trace(tmp_path / "cut.jsonl")
    assert trace.truncated and len(trace.calls) == 1


# --- tools -------------------------------------------------------------------------------------


def test_tools_become_openai_schemas_and_calls_are_traced(tmp_path):
    def add(a: int, b: int = 0, mode: str | None = None) -> int:
        """Add two integers.

        Longer text is not the description."""
        return a + b

    schema = Tool.of(add).schema()
    assert schema == {"type": "function", "function": {
        "name": "add", "description": "Add two integers.",
        "parameters": {"type": "object", "required": ["a"], "properties": {
            "a": {"type": "integer"}, "b": {"type": "integer"}, "mode": {"type": "string"}}}}}
    with Runtime(Scripted(delay=0), trace=str(tmp_path / "t.jsonl")):
        assert call_tool(add, a=2, b=3) == 5
    [rec] = read_trace(tmp_path / "t.jsonl").tools
    assert (rec["name"], rec["arguments"], rec["result"]) == ("add", {"a": 2, "b": 3}, 5)

    def bad(x: object) -> None:
        """No JSON type."""

    with pytest.raises(TypeError, match="not expressible as JSON"):
        Tool.of(bad).schema()


# --- the OpenAI-compatible HTTP backend ------------------------------------------------------------


class _Server:
    """A local test server whose answers a test scripts: a list of (status, body, delay_s)."""

    def __init__(self, script):
        self.script, self.hits = list(script), 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers["Content-Length"]))
                status, body, delay = outer.script[min(outer.hits, len(outer.script) - 1)]
                outer.hits += 1
                time.sleep(delay)
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


OK = json.dumps({"choices": [{"message": {"role": "assistant", "content": "hello"}}],
                 "usage": {"prompt_tokens": 5, "completion_tokens": 1}})


def test_http_backend_retries_5xx_and_429_then_answers():
    with _Server([(503, "busy", 0), (429, "slow down", 0), (200, OK, 0)]) as server:
        backend = OpenAIBackend(server.url, "m", retries=3, backoff_s=0.01)
        with Runtime(backend):
            answer = gen("hi")
            assert answer == "hello" and answer.completion.prompt_tokens == 5
        assert server.hits == 3


def test_http_backend_gives_up_after_its_retries_and_on_4xx():
    with _Server([(500, "down", 0)]) as server:
        backend = OpenAIBackend(server.url, "m", retries=2, backoff_s=0.01)
        with pytest.raises(BackendError, match="no answer after 3 attempts"):
            backend.complete(_request())
        assert server.hits == 3
    with _Server([(400, '{"error": {"message": "bad"}}', 0)]) as server:
        with pytest.raises(BackendError, match="answered 400"):
            OpenAIBackend(server.url, "m", retries=2, backoff_s=0.01).complete(_request())
        assert server.hits == 1  # a client error is not retried


def test_http_backend_times_out_and_names_malformed_json():
    with _Server([(200, OK, 1.0)]) as server:
        with pytest.raises(BackendError, match="no answer after 1 attempts"):
            OpenAIBackend(server.url, "m", retries=0, timeout_s=0.2).complete(_request())
    with _Server([(200, "{not json", 0)]) as server:
        with pytest.raises(BackendError, match="not a chat completion"):
            OpenAIBackend(server.url, "m", retries=0).complete(_request())


def _request():
    from executor.prompts import CallRequest

    return CallRequest([{"role": "user", "content": "hi"}])


# --- prediction -------------------------------------------------------------------------------


def test_amdahl_over_stages_on_a_hand_written_dag():
    dag = WorkflowDAG({"a": CallNode("a", 10, 10), "b": CallNode("b", 10, 10),
                       "c": CallNode("c", 10, 10, ["a", "b"])})
    seq, par, stages = amdahl(dag, {"a": 1.0, "b": 3.0, "c": 2.0})
    assert (seq, par, stages) == (6.0, 5.0, 2)
    with pytest.raises(SpecError, match="cycle"):
        WorkflowDAG({"a": CallNode("a", 1, 1, ["b"]), "b": CallNode("b", 1, 1, ["a"])})


def test_the_replay_sees_server_capacity_that_amdahl_does_not():
    calls = {f"b{i}": CallNode(f"b{i}", 200, 64) for i in range(16)}
    calls["join"] = CallNode("join", 400, 16, list(calls))
    dag = WorkflowDAG(calls)
    wide = predict_workflow(dag, "llama-3-8b", "1xa100-80gb", "vllm-tp1")
    assert wide.simulated_peak_batch == 16 and wide.simulated_speedup > 4
    # one sequence at a time: the parallel replay is the sequential one
    narrow = WorkflowDAG({i: CallNode(i, c.prompt_tokens, c.output_tokens, c.deps) for i, c in calls.items()})
    from simulator.serving.iteration import IterationModel
    from simulator.specs import load_cluster, load_model
    from simulator.specs.serving import Parallel
    from simulator.workflows.predict import replay

    it = IterationModel(load_model("llama-3-8b"), load_cluster("1xa100-80gb"), Parallel())
    one = replay(narrow, it, it, max_num_seqs=1)
    seq = replay(narrow, it, it, sequential=True)
    assert one.makespan_s == pytest.approx(seq.makespan_s)
    assert wide.amdahl_speedup > wide.simulated_speedup  # Amdahl assumes free batching


def test_simulate_workflow_and_trace_show_commands(tmp_path):
    with Runtime(Scripted(delay=0.02), trace=str(tmp_path / "t.jsonl")):
        str(vote("q", 4))
    dag = dag_from_trace(tmp_path / "t.jsonl")
    assert len(dag.calls) == 5 and dag.measured_s > 0
    runner = CliRunner()
    result = runner.invoke(app, ["simulate", "workflow", str(tmp_path / "t.jsonl"), "--model", "smollm2-135m",
                                 "--cluster", "1xcpu", "--deployment", "vllm-tp1", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"measured_s", "amdahl_speedup", "simulated_sequential_s", "simulated_parallel_s",
            "simulated_speedup"} <= set(data)
    assert 1.5 < data["amdahl_speedup"] < 5  # 4 parallel calls, then 1
    shown = runner.invoke(app, ["trace", "show", str(tmp_path / "t.jsonl"), "--chrome", str(tmp_path / "c.json")])
    assert shown.exit_code == 0, shown.stderr
    assert "ask" in shown.stdout and "timeline" in shown.stdout
    events = json.loads((tmp_path / "c.json").read_text())["traceEvents"]
    assert sum(e.get("pid") == 2 and e["ph"] == "X" for e in events) == 5
    missing = runner.invoke(app, ["simulate", "workflow", str(tmp_path / "nope.jsonl")])
    assert missing.exit_code == 2 and "no such file" in missing.stderr


def test_the_local_backend_answers_concurrent_calls_in_process(tmp_path):
    from executor.prompts.local import LocalBackend

    backend = LocalBackend(max_num_seqs=8)
    with Runtime(backend, trace=str(tmp_path / "t.jsonl")) as rt:
        answers = [gen(f"Say the number {i}.", max_tokens=4) for i in range(3)]
        texts = [str(a) for a in answers]
    assert rt.peak_in_flight == 3 and all(isinstance(t, str) for t in texts)
    calls = read_trace(tmp_path / "t.jsonl").calls.values()
    assert all(c.backend == "local" and 1 <= c.completion_tokens <= 4 and c.prompt_tokens > 5 for c in calls)
