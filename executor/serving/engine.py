"""The online serving engine: requests arrive, a step loop schedules, runs and samples.

```
add_request --> arrivals (by arrival time) --> StaticScheduler.plan()   (simulator's policy)
                                                  |  BlockManager counts blocks
                                       PagedKV.sync: block tables follow the counts
                                                  v
                                       PagedRunner.forward(items)        (one ragged batch)
                                                  v
                          sample, stop checks --> StaticScheduler.commit() --> PagedKV.sync
```

The policy is the simulator's own code, imported, not rewritten: `StaticScheduler`
(simulator/serving/schedulers.py) plans every step, `vllm` prefill priority (whole prompts
up to `max_batched_tokens`, otherwise decode all) or `sarathi` chunked prefill (decodes plus
prompt chunks within a `chunk_size` token budget), with preemption of the newest sequence by
recompute or by swap to the CPU pool, over the simulator's `BlockManager` and its watermark.
Two things the simulator never needs are added around it, without editing it:
- `EngineSeq` extends the simulator's `Seq` with the token ids, the sampling state and a
  finish reason. The simulator knows every request's output length in advance (`done` is
  `generated >= output_tokens`); a real request also ends at EOS or a stop string, so
  `EngineSeq.done` is also true once a finish reason is set, which the engine does just
  before `commit` emits the token that ends it. `commit` then frees it as the simulator would.
- Aborts (a client that went away) and a stuck sarathi schedule are handled by the engine on
  the scheduler's public queues (`waiting`, `running`, `prefilling`, `swapped`): the
  simulator never cancels a request, and its sarathi policy can, with a KV pool too small
  for the prompts part-way through, leave every prefilling sequence unable to grow and none
  decoding; the engine then preempts the newest prefilling one by recompute.
Requests are checked on arrival so that one alone always fits the pool: prompt + max_tokens
<= the context and <= the blocks outside the watermark. Then the step loop cannot wedge.

Tensor and pipeline parallel (`EngineConfig(tp=, pp=)`, from a deployment's `prefill`): the
engine is rank 0. Its constructor starts the other ranks (executor/serving/workers.py) and
keeps rank 0's shard of the weights (executor/serving/parallel.py); the scheduler, the block
manager, the block tables and sampling stay here alone, and `ParallelRunner.forward` sends
each step's items and tables to the workers before running rank 0's part. The shared
scheduler already plans for pipelines as the simulator does: with pp stages it admits up to
pp x `max_num_seqs` sequences and pp x the token budgets per step, and the runner cuts the
step into pp micro-batches. `close()` (or `with Engine(...)`) stops the ranks; a rank that
dies makes `step` raise `RankFailed` naming it.

Seesaw re-sharding (`EngineConfig(scheduler="seesaw", decode_tp=, decode_pp=,
cpu_kv_buffer_GB=)`, from a deployment whose decode layout differs from its prefill layout):
`Seesaw` (executor/serving/reshard.py) takes the scheduler's place, with the simulator's
Seesaw policy; the engine still admits arrivals, samples, aborts and records.

Speculative decoding (`EngineConfig(speculation=)`, from a deployment's `speculation`; one
rank, vllm scheduler): the scheduler is given a `Speculator` (simulator/speculation), so its
decode steps carry a k and reserve k + 1 KV slots per sequence; `SpecDecoder`
(executor/serving/spec_engine.py) builds the verification items from n-gram drafts and
accepts, and the scheduler's commit truncates the rejected slots, which `PagedKV.sync` then
returns to the free list.

Prefix caching (`EngineConfig(prefix_caching=True)`, from a deployment's `prefix_caching`;
static layouts): the block manager keeps the computed full blocks of prompts by a key of
their tokens and of every token before them (`EngineSeq.block_keys`: a chained BLAKE2b), and
the shared scheduler starts a prompt whose leading blocks are cached that far into it, as the
simulator does; `PagedKV.sync` maps the shared blocks into each table. A step computes only
the rest (`EngineStats.cached_prompt_tokens` counts what it skipped).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from executor.serving.model import LlamaDecoder
from executor.serving.paged import PagedKV
from executor.serving.parallel import check_deployment, check_layout
from executor.serving.reshard import Seesaw
from executor.serving.runner import Item, PagedRunner
from executor.serving.sampling import SamplingParams, StopChecker, sample_rows, token_logprobs
from executor.serving.spec_engine import SpecDecoder, check_speculation, speculative_tokens
from executor.serving.workers import RankGroup, ShardJob
from simulator.engine.trace import write_chrome_trace
from simulator.errors import SpecError
from simulator.serving.kv_cache import BlockManager
from simulator.serving.recorder import Recorder
from simulator.serving.schedulers import StaticScheduler, Step
from simulator.serving.sequence import Seq
from simulator.serving.workload import Request
from simulator.specs.serving import DeploymentSpec, Parallel, SpeculationSpec


class RequestRejected(ValueError):
    """A request the engine cannot serve (too long for the context or the KV pool)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class EngineConfig:
    scheduler: str = "vllm"          # vllm | sarathi | seesaw (re-sharding: prefill tp/pp, decode_tp/pp)
    max_num_seqs: int = 64
    max_batched_tokens: int = 4096
    chunk_size: int = 512
    block_size: int = 16
    num_blocks: int = 1024           # KV pool (16 K positions with 16-token blocks)
    num_cpu_blocks: int = 0          # CPU swap pool; > 0 selects swap preemption
    watermark: float = 0.01
    max_model_len: int = 2048
    seed: int = 0
    trace: bool = False              # record Chrome trace events (the simulator's recorder)
    tp: int = 1                      # tensor parallel ranks (the deployment's prefill.tp)
    pp: int = 1                      # pipeline stages (the deployment's prefill.pp)
    decode_tp: int | None = None     # seesaw: the decode layout (default: the prefill layout's)
    decode_pp: int | None = None
    cpu_kv_buffer_GB: float = 0.0    # seesaw: the CPU-tier KV buffer (10^9 bytes, the engine's dtype)
    timeout_s: float = 60.0          # parallel: limit on a rank's start and on each collective
    speculation: SpeculationSpec | None = None   # n-gram speculative decoding (one rank, vllm)
    speculation_cluster: str = "1xcpu"   # speculation: the cluster whose profile prices the steps
    speculation_context: int = 256       # adaptive: the context its k*(b) table is computed at
    dp: int = 1                      # data-parallel replicas (executor/serving/replicas.py; start_engine)
    prefix_caching: bool = False     # share the KV blocks of equal prompt prefixes (static layouts)

    def deployment(self) -> DeploymentSpec:
        """The deployment the shared scheduler reads (one static layout of tp x pp ranks, or a
        seesaw prefill and decode layout)."""
        if self.scheduler == "seesaw":
            decode = Parallel(tp=self.decode_tp or self.tp, pp=self.decode_pp or self.pp)
            return DeploymentSpec(prefill=Parallel(tp=self.tp, pp=self.pp), decode=decode, scheduler="seesaw",
                                  prefix_caching=self.prefix_caching,
                                  max_num_seqs=self.max_num_seqs, max_batched_tokens=self.max_batched_tokens,
                                  block_size=self.block_size, cpu_kv_buffer_GB=self.cpu_kv_buffer_GB)
        swap = self.num_cpu_blocks > 0
        return DeploymentSpec(prefill=Parallel(tp=self.tp, pp=self.pp), scheduler=self.scheduler,
                              prefix_caching=self.prefix_caching,
                              max_num_seqs=self.max_num_seqs,
                              max_batched_tokens=self.max_batched_tokens, chunk_size=self.chunk_size,
                              block_size=self.block_size, preemption="swap" if swap else "recompute",
                              cpu_kv_buffer_GB=1.0 if swap else 0.0)

    @classmethod
    def from_deployment(cls, dep: DeploymentSpec, **overrides) -> EngineConfig:
        """The engine settings of a deployment spec (see simtune serve); SpecError, naming the
        field, for what the engine does not run (speculation with a draft model, on several
        ranks or on several replicas). A re-sharding deployment (seesaw) keeps its decode layout
        and buffer; dp > 1 runs dp replicas of the layout (executor/serving/replicas.py)."""
        check_deployment(dep.model_copy(update={"speculation": None}))
        seesaw = {"decode_tp": dep.decode.tp, "decode_pp": dep.decode.pp,
                  "cpu_kv_buffer_GB": dep.cpu_kv_buffer_GB} if dep.scheduler == "seesaw" else {}
        config = cls(**{"scheduler": dep.scheduler, "max_num_seqs": dep.max_num_seqs,
                        "max_batched_tokens": dep.max_batched_tokens, "chunk_size": dep.chunk_size,
                        "block_size": dep.block_size, "tp": dep.prefill.tp, "pp": dep.prefill.pp,
                        "speculation": dep.speculation, "dp": dep.dp, "prefix_caching": dep.prefix_caching,
                        **seesaw, **overrides})
        if config.speculation is not None:
            check_speculation(config)
        if config.dp > 1 and config.speculation is not None:
            raise SpecError("deployment.dp", config.dp, "speculative decoding runs on one replica (dp = 1)")
        return config


class EngineSeq(Seq):
    """The simulator's `Seq` plus what a real request carries (see the module docstring)."""

    def __init__(self, req: Request, prompt_ids: list[int], params: SamplingParams,
                 generator: torch.Generator | None, stop: StopChecker | None):
        super().__init__(req)
        self.prompt_ids, self.params, self.generator, self.stop = prompt_ids, params, generator, stop
        self.output_ids: list[int] = []
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []   # per output token, when asked
        self.finish_reason: str | None = None   # "stop", "length" or "abort"
        self.on_output: Callable[[EngineSeq], None] | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.generated >= self.req.output_tokens

    def block_keys(self, block_size: int) -> list[bytes]:
        """Keys of the prompt's full blocks: each a BLAKE2b digest of the previous key and the
        block's token ids, so equal keys mean equal tokens up to the block's end (equal KV)."""
        keys, prev = [], b""
        ids = self.prompt_ids
        for start in range(0, len(ids) - block_size + 1, block_size):
            h = hashlib.blake2b(prev, digest_size=16)
            h.update(",".join(map(str, ids[start:start + block_size])).encode())
            prev = h.digest()
            keys.append(prev)
        return keys

    @property
    def text(self) -> str:
        """The output text so far (cut at a stop string); what a stream may send now."""
        if self.stop is None:
            return ""
        return self.stop.text if self.finish_reason else self.stop.stable_text


@dataclass
class EngineStats:
    steps: dict[str, int] = field(default_factory=lambda: {"prefill": 0, "decode": 0, "mixed": 0})
    step_s: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0              # prompt tokens computed (re-computed after a preemption too)
    cached_prompt_tokens: int = 0       # prompt tokens taken from the prefix cache instead
    max_batch_size: int = 0             # most sequences in one step
    max_decode_batch: int = 0           # most decoding sequences in one step
    finished: int = 0
    aborted: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=256))   # (end time, output tokens)

    def tokens_per_s(self, now: float, window_s: float = 10.0) -> float:
        """Output tokens per second over the last `window_s` seconds of steps."""
        recent = [(t, n) for t, n in self.recent if t >= now - window_s]
        return sum(n for _, n in recent) / window_s if recent else 0.0


def check_prompt(prompt_ids: Sequence[int], params: SamplingParams, limit: int, vocab: int,
                 has_tokenizer: bool, speculative: bool = False) -> list[int]:
    """The prompt as a list of ints, or RequestRejected naming what is wrong: empty, a token id
    outside the vocabulary, prompt + max_tokens over `limit`, stop strings without a tokenizer,
    log-probabilities from a speculative engine (its verified tokens do not report them)."""
    prompt_ids = [int(t) for t in prompt_ids]
    if not prompt_ids:
        raise RequestRejected("the prompt is empty; give at least one token", "prompt")
    if any(not 0 <= t < vocab for t in prompt_ids):
        raise RequestRejected(f"token ids must be in 0..{vocab - 1}", "prompt")
    if len(prompt_ids) + params.max_tokens > limit:
        raise RequestRejected(
            f"this model's maximum context length is {limit} tokens; the request has "
            f"{len(prompt_ids)} prompt tokens + max_tokens {params.max_tokens}",
            "max_tokens" if len(prompt_ids) < limit else "prompt", "context_length_exceeded")
    if params.stop and not has_tokenizer:
        raise RequestRejected("stop strings need the engine's tokenizer", "stop")
    if params.logprobs is not None and speculative:
        raise RequestRejected("logprobs: not reported by an engine with speculative decoding", "logprobs")
    return prompt_ids


class Offline:
    """Offline serving over the step API (`add_request`, `step`, `has_unfinished`,
    `next_arrival_s`, `now`), shared by `Engine` and the data-parallel `ReplicatedEngine`."""

    def run_until_done(self, sleep_s: float = 0.001) -> None:
        """Step until every queued request has finished (waiting for future arrivals)."""
        while self.has_unfinished():
            if not self.step():
                nxt = self.next_arrival_s()
                if nxt is not None:
                    time.sleep(max(0.0, min(nxt - self.now(), 0.05)) or sleep_s)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]) -> list:
        """Serve `prompts` all arriving now; the finished sequences in prompt order."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        self.run_until_done()
        return seqs


class Engine(Offline):
    """One replica: a layout of tp x pp ranks (or a seesaw pair). dp > 1 is `start_engine`'s
    (executor/serving/replicas.py): dp of these, each in its own process, behind a router."""

    def __init__(self, decoder: LlamaDecoder, config: EngineConfig = EngineConfig(), tokenizer=None,
                 clock: Callable[[], float] = time.perf_counter):
        if config.scheduler not in ("vllm", "sarathi", "seesaw"):
            raise ValueError(f"scheduler={config.scheduler!r}: the engine runs 'vllm', 'sarathi' or 'seesaw'")
        if config.dp != 1:
            raise ValueError(f"dp={config.dp}: an Engine is one replica; start dp > 1 replicas with "
                             f"executor.serving.replicas.start_engine")
        self.decoder, self.config, self.tokenizer = decoder, config, tokenizer
        cfg = decoder.cfg
        if not 1 <= config.max_model_len <= cfg.max_positions:
            raise ValueError(f"max_model_len={config.max_model_len}: must be in 1..{cfg.max_positions}")
        self.blocks = BlockManager(config.num_blocks, config.block_size, config.num_cpu_blocks, config.watermark,
                                   prefix_caching=config.prefix_caching)
        if config.prefix_caching:
            self.blocks.cache_events = []   # PagedKV.sync maps the cached blocks from these
        self.spec = SpecDecoder(self) if config.speculation is not None else None
        self.group: RankGroup | None = None
        self.reshard: Seesaw | None = None
        self.clock, self.t0 = clock, clock()
        self.recorder = Recorder(trace=True) if config.trace else None
        if config.scheduler == "seesaw":  # re-sharding: executor/serving/reshard.py drives the ranks
            self.scheduler = self.reshard = Seesaw(self, decoder)   # sets self.blocks and self.kv
            self.group, self.runner = self.reshard.group, None
        else:
            self.scheduler = StaticScheduler(config.deployment(), self.blocks, self.spec and self.spec.speculator)
        if self.reshard is None and config.tp * config.pp > 1:  # rank 0 keeps its shard; the other ranks start here
            layout = check_layout(config.tp, config.pp, cfg)
            self.group = RankGroup(ShardJob(layout, str(decoder.dtype).removeprefix("torch."),
                                            decoder.device.type, config.num_blocks,
                                            config.block_size, config.num_cpu_blocks, torch.get_num_threads(),
                                            config.timeout_s))
            self.decoder = self.group.start(decoder)
            self.kv = self.group.kv(self.decoder)
            self.runner = self.group.runner(self.decoder, self.kv)
        elif self.reshard is None:
            self.kv = PagedKV(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, config.num_blocks, config.block_size,
                              config.num_cpu_blocks, decoder.dtype, decoder.device)
            self.runner = PagedRunner(decoder, self.kv)
        self.seqs: dict[int, EngineSeq] = {}        # unfinished, by id
        self.arrivals: list[tuple[float, int, EngineSeq]] = []   # heap of requests not arrived yet
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._seeds = torch.Generator().manual_seed(config.seed)

    def close(self) -> None:
        """Stop the other ranks of a parallel engine (nothing to do on one rank)."""
        if self.reshard is not None:
            self.reshard.close()
        elif self.group is not None:
            self.group.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- requests -----------------------------------------------------------------------------
    @property
    def max_request_tokens(self) -> int:
        """Prompt + output tokens one request may hold: the context, and the pool outside the
        watermark (less the draft slots a speculative step reserves)."""
        pool = (self.blocks.num_gpu_blocks - self.blocks.watermark_blocks) * self.blocks.block_size
        if self.config.speculation is not None:
            pool -= speculative_tokens(self.config.speculation)
        return min(self.config.max_model_len, pool)

    def now(self) -> float:
        return self.clock() - self.t0

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                    arrival_s: float | None = None) -> EngineSeq:
        """Queue a request (arriving now, or at `arrival_s` on the engine's clock)."""
        params = SamplingParams() if params is None else params
        prompt_ids = self.check_request(prompt_ids, params)
        sid = next(self._ids)
        arrival_s = self.now() if arrival_s is None else arrival_s
        req = Request(sid, arrival_s, len(prompt_ids), params.max_tokens)
        seed = params.seed if params.seed is not None else int(torch.randint(2**62, (1,), generator=self._seeds))
        gen = None if params.greedy else torch.Generator(device="cpu").manual_seed(seed)
        stop = StopChecker(self._decode, params.stop) if self.tokenizer is not None else None
        seq = EngineSeq(req, prompt_ids, params, gen, stop)
        self.seqs[sid] = seq
        heapq.heappush(self.arrivals, (arrival_s, sid, seq))
        return seq

    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[int]:
        """The prompt as a list of ints, or RequestRejected naming what is wrong (reads only
        fixed settings, so any thread may call it)."""
        return check_prompt(prompt_ids, params, self.max_request_tokens, self.decoder.cfg.vocab,
                            self.tokenizer is not None, self.config.speculation is not None)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def abort(self, seq_id: int) -> bool:
        """Drop an unfinished request and free its blocks; whether it was still live."""
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return False
        s = self.scheduler
        for queue in (s.waiting, s.running, s.prefilling, s.swapped):
            if seq in queue:
                queue.remove(seq)
        if seq_id in self.blocks:
            self.blocks.free(seq_id)
        if self.reshard is not None:
            self.reshard.forget(seq)
        self.arrivals = [a for a in self.arrivals if a[1] != seq_id]
        heapq.heapify(self.arrivals)
        self.kv.sync(self.blocks, self.seqs)
        seq.finish_reason = "abort"
        self.stats.aborted += 1
        if seq.on_output:
            seq.on_output(seq)
        return True

    @property
    def num_waiting(self) -> int:
        """Requests queued and not yet admitted (arrived or not)."""
        return len(self.scheduler.waiting) + len(self.arrivals)

    @property
    def num_running(self) -> int:
        s = self.scheduler
        return len(s.running) + len(s.prefilling) + len(s.swapped)

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    def next_arrival_s(self) -> float | None:
        return self.arrivals[0][0] if self.arrivals else None

    # --- the step loop ------------------------------------------------------------------------
    def step(self) -> list[EngineSeq]:
        """Admit arrivals, plan, run and commit one step; the sequences that emitted a token
        or finished. An empty list when nothing can run now (idle, or waiting for arrivals)."""
        now = self.now()
        while self.arrivals and self.arrivals[0][0] <= now:
            self.scheduler.add(heapq.heappop(self.arrivals)[2])
        if self.scheduler.idle:
            return []
        if self.reshard is not None:
            return self.reshard.step()
        plan = self.scheduler.plan()
        if plan is None:
            plan = self._unstick()
        self.kv.sync(self.blocks, self.seqs)
        start = self.now()
        speculative = self.spec is not None and plan.k > 0
        items = (self.spec.items(plan) if speculative else
                 [self._item(seq, chunk) for seq, chunk in zip(plan.seqs, plan.chunks)])
        logits = self.runner.forward(items)
        emitting = [seq for seq, it in zip(plan.seqs, items) if it.logits]
        prompt_tokens = sum(len(it.tokens) for seq, it in zip(plan.seqs, items) if not seq.decoding)
        if speculative:  # verify the drafts: one or more tokens per sequence
            emitted = self.spec.accept(emitting, logits)
        else:
            emitted = len(self._sample(emitting, logits))
        end = self.now()
        finished = self.scheduler.commit(plan, end)
        for seq in finished:
            self.seqs.pop(seq.id, None)
            if seq.finish_reason is None:
                seq.finish_reason = "length"
        self.kv.sync(self.blocks, self.seqs)
        self._record(plan, start, end, emitted, prompt_tokens)
        self.stats.finished += len(finished)
        for seq in emitting:
            if seq.on_output:
                seq.on_output(seq)
        return emitting

    def _item(self, seq: EngineSeq, chunk: int) -> Item:
        if seq.decoding:  # feeds the last sampled token
            return Item(seq.id, seq.output_ids[-1:], seq.context - 1, True)
        full = seq.prompt_ids + seq.output_ids  # a recompute re-runs the output too
        start = seq.prefilled
        return Item(seq.id, full[start:start + chunk], start, start + chunk == seq.prompt_len)

    def _sample(self, emitting: list[EngineSeq], logits: torch.Tensor) -> list[EngineSeq]:
        """Sample a token for each sequence (a row of logits each) and accept it; `emitting`."""
        tokens = sample_rows(logits, [s.params for s in emitting], [s.generator for s in emitting])
        for i, (seq, tok) in enumerate(zip(emitting, tokens)):
            if seq.params.logprobs is not None:
                seq.logprobs.append(token_logprobs(logits[i], tok, seq.params.logprobs))
            self._accept(seq, tok)
        return emitting

    def _accept(self, seq: EngineSeq, token: int) -> None:
        """Append a sampled token and set the finish reason if it ends the request (before
        `commit` emits it, so commit frees the sequence)."""
        seq.output_ids.append(token)
        p = seq.params
        if (token == self.decoder.cfg.eos_id and not p.ignore_eos) or token in p.stop_token_ids:
            seq.finish_reason = "stop"
            if seq.stop is not None:
                seq.stop.update(seq.output_ids[:-1])
        elif seq.stop is not None and seq.stop.update(seq.output_ids):
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens:
            seq.finish_reason = "length"

    def _unstick(self) -> Step:
        """Nothing fits: preempt the newest prefilling sequence (recompute) and plan again."""
        s = self.scheduler
        if not s.prefilling:
            raise RuntimeError(f"the scheduler planned nothing with {len(s.waiting)} waiting, "
                               f"{len(s.running)} running; KV {self.blocks!r}")
        victim = s.prefilling.pop()
        self.blocks.free(victim.id)
        victim.prefilled, victim.decoding = 0, False
        s.waiting.appendleft(victim)
        s.preemptions += 1
        victim.preemptions += 1
        plan = s.plan()
        return plan if plan is not None else self._unstick()

    def _record(self, plan: Step, start: float, end: float, emitted: int, prompt_tokens: int) -> None:
        st = self.stats
        st.steps[plan.kind] = st.steps.get(plan.kind, 0) + 1
        st.step_s += end - start
        st.output_tokens += emitted
        st.prompt_tokens += prompt_tokens
        st.cached_prompt_tokens = getattr(self.scheduler, "cached_tokens", 0)
        st.max_batch_size = max(st.max_batch_size, len(plan.seqs))
        st.max_decode_batch = max(st.max_decode_batch, sum(1 for s in plan.seqs if s.decoding))
        st.recent.append((end, emitted))
        if self.recorder is not None:
            self.recorder.step(0, plan.kind, start, end, len(plan.seqs), sum(plan.chunks),
                               self.blocks.utilization)

    def write_trace(self, path) -> None:
        """The recorded steps as a Chrome trace, in the simulator's event names (replica 0,
        stream "compute", one box per step named by its kind), so a measured run and a
        simulated one open side by side in Perfetto. Needs `EngineConfig(trace=True)`."""
        if self.recorder is None:
            raise ValueError("trace: the engine was built without trace=True; nothing was recorded")
        write_chrome_trace(self.recorder.trace_events(), path, "smollm2-135m on this machine (measured)",
                           process_label="replica")
