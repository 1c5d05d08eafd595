"""The OpenAI-compatible server, driven by the official `openai` client over loopback HTTP:
chat and completions, streaming and not, concurrent requests batched, OpenAI-style 4xx
bodies, 429 when the queue is full, a dropped stream freeing its sequence, and a bounded
load loop in which no request is lost.

uvicorn runs in a thread of this process on 127.0.0.1 with a free port and is stopped by the
test that started it. fp32, short prompts, a few output tokens.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from smollm2 import GGUF, one_torch_thread

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from executor.serving import model as M  # noqa: E402
from executor.serving.engine import Engine, EngineConfig  # noqa: E402
from executor.serving.loop import EngineThread  # noqa: E402
from executor.serving.sampling import SamplingParams  # noqa: E402
from executor.serving.server import OpenAIServer  # noqa: E402
from profiler.ranks import free_port  # noqa: E402

MODEL = "smollm2-135m"
CONFIG = EngineConfig(max_num_seqs=8, num_blocks=256, block_size=16, max_model_len=256)
MAX_QUEUE = 6



@pytest.fixture(scope="module")
def parts():
    with one_torch_thread():
        tokenizer = M.load_tokenizer(GGUF)
        engine = Engine(M.load_decoder(GGUF), CONFIG, tokenizer)
        yield engine, tokenizer


@pytest.fixture(scope="module")
def server(parts):
    engine, tokenizer = parts
    loop_thread = EngineThread(engine, max_queue=MAX_QUEUE).start()
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(OpenAIServer(loop_thread, tokenizer, MODEL).app, host="127.0.0.1",
                                        port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", engine, loop_thread
    srv.should_exit = True
    thread.join(10)
    loop_thread.stop()
    assert not thread.is_alive() and not loop_thread.alive


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=60)


def _drained(engine, timeout_s: float = 20.0) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if not engine.seqs and engine.kv.used_blocks == 0:
            return True
        time.sleep(0.05)
    return False


def test_chat_and_completions_streaming_and_not_agree(server, client):
    base, engine, _ = server
    messages = [{"role": "user", "content": "Name three colors."}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    text = chat.choices[0].message.content
    assert text and chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens <= 8
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

    done = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
    pieces = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, stream=True)]
    assert "".join(pieces) == done.choices[0].text and done.usage.prompt_tokens > 0
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    assert _drained(engine)


def test_logprobs_of_chat_and_completions_streaming_and_not(server, client):
    base, engine, _ = server
    messages = [{"role": "user", "content": "Name three colors."}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert "".join(e.token for e in content).startswith(chat.choices[0].message.content)
    for e in content:   # greedy: the chosen token is the most likely one
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert bytes(e.bytes).decode() == e.token
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]

    done = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0,
                                     logprobs=2)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == done.usage.completion_tokens
    assert "".join(lp.tokens).startswith(done.choices[0].text) and lp.text_offset[0] == 0
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(v) for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    pieces = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5,
                                            temperature=0, logprobs=2, stream=True))
    assert [t for c in pieces if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs] == lp.token_logprobs
    assert client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2).choices[0].logprobs is None
    r = httpx.post(base + "/v1/chat/completions", json={"model": MODEL, "messages": messages, "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    assert _drained(engine)


def test_n_choices_streaming_and_not(server, client):
    base, engine, _ = server
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=7,
              extra_body={"ignore_eos": True})
    done = client.completions.create(n=3, **kw)
    texts = [c.text for c in sorted(done.choices, key=lambda c: c.index)]
    assert [c.index for c in done.choices] == [0, 1, 2] and done.usage.completion_tokens == 3 * 8
    assert len(set(texts)) > 1                      # seed + i: the choices differ ...
    assert client.completions.create(n=1, **{**kw, "seed": 8}).choices[0].text == texts[1]   # ... and repeat
    pieces: dict[int, str] = {}
    for c in client.completions.create(n=3, stream=True, **kw):
        pieces[c.choices[0].index] = pieces.get(c.choices[0].index, "") + c.choices[0].text
    assert [pieces[i] for i in range(3)] == texts
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2,
                                          max_tokens=4, temperature=0)
    assert len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content
    assert _drained(engine)


def test_stop_string_cuts_the_text(client):
    full = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0).choices[0]
    stop = full.text.strip()[:2]
    assert stop
    cut = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
    assert full.text.startswith(cut.choices[0].text)


def test_concurrent_requests_are_batched(server, client):
    _, engine, _ = server
    engine.stats.max_decode_batch = 0
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: client.completions.create(
            model=MODEL, prompt=f"Count from {i}:", max_tokens=10, temperature=0, extra_body={"ignore_eos": True}),
            range(4)))
    assert all(o.usage.completion_tokens == 10 for o in outs)
    assert engine.stats.max_decode_batch > 1


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": "hi"}, 400, "model"),                                    # missing field
    ({"model": MODEL, "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),   # wrong type
    ({"model": MODEL, "prompt": "hi", "temperature": 5}, 400, "temperature"),
    ({"model": MODEL, "prompt": "hi", "n": 17}, 400, "n"),
    ({"model": MODEL, "prompt": [5] * 300}, 400, "prompt"),              # longer than the context
    ({"model": MODEL, "prompt": "hi", "max_tokens": 400}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": [10**9]}, 400, "prompt"),                # no such token
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ({"model": MODEL, "prompt": "hi", "logprobs": 9}, 400, "logprobs"),
])
def test_bad_completions_get_openai_errors(server, body, status, param):
    r = httpx.post(server[0] + "/v1/completions", json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]


def test_bad_input_of_every_kind_is_refused_and_the_server_lives(server, client):
    base = server[0]
    for content in (b"{not json", b"[]", b'{"model": "smollm2-135m", "messages": []}',
                    b'{"model": "smollm2-135m", "messages": [{"role": "robot", "content": "x"}]}'):
        r = httpx.post(base + "/v1/chat/completions", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "error" in r.json(), (content, r.text)
    assert httpx.get(base + "/v1/nothing").status_code == 404
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert exc.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt="x" * 2000, max_tokens=4)
    assert exc.value.body["code"] == "context_length_exceeded"
    assert httpx.get(base + "/health").status_code == 200


def test_queue_full_gets_429(parts):
    # a server whose engine thread never runs: submitted requests stay queued
    engine, tokenizer = parts
    stalled = EngineThread(engine, max_queue=2)
    app = OpenAIServer(stalled, tokenizer, MODEL).app
    for _ in range(2):
        stalled.submit([1, 2, 3], SamplingParams(max_tokens=1), lambda seq: None)

    async def call():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            aclient = openai.AsyncOpenAI(base_url="http://test/v1", api_key="none", http_client=http, max_retries=0)
            with pytest.raises(openai.RateLimitError) as exc:
                await aclient.completions.create(model=MODEL, prompt="hi", max_tokens=2)
            return exc.value

    err = asyncio.run(call())
    assert err.status_code == 429 and err.body["code"] == "queue_full"


def test_a_dropped_stream_frees_its_sequence(server):
    base, engine, _ = server
    aborted = engine.stats.aborted
    body = {"model": MODEL, "prompt": "Tell a long story:", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", base + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(6)) if line.startswith("data:")]
        assert got and engine.seqs  # still generating when the client leaves
    assert _drained(engine) and engine.stats.aborted == aborted + 1


def test_bounded_load_loop_holds_every_request(server):
    base, engine, _ = server
    n, results = 24, []

    async def one(http, i):
        try:
            r = await http.post(base + "/v1/completions", json={
                "model": MODEL, "prompt": f"Item {i}:", "max_tokens": 4, "temperature": 0.7, "seed": i})
            return r.status_code, r.json()
        except httpx.HTTPError as exc:  # counted, never raised
            return None, repr(exc)

    async def load():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=n)) as http:
            return await asyncio.gather(*(one(http, i) for i in range(n)))

    results = asyncio.run(load())
    codes = [c for c, _ in results]
    ok = [b for c, b in results if c == 200]
    assert len(results) == n and None not in codes          # none lost
    assert set(codes) <= {200, 429} and len(ok) >= MAX_QUEUE   # overload answered, the rest served
    assert all(b["usage"]["completion_tokens"] >= 1 and b["choices"][0]["finish_reason"] for b in ok)
    metrics = httpx.get(base + "/metrics").text
    for name in ("simtune_queue_length", "simtune_running_sequences", "simtune_kv_blocks_used",
                 "simtune_kv_blocks_total", "simtune_output_tokens_per_second"):
        assert f"\n{name} " in "\n" + metrics
    assert _drained(engine)
