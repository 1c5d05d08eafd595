"""BlockManager: block accounting never over-allocates, preemption frees exactly, errors."""

from __future__ import annotations

import math
import random

import pytest

from simulator.serving.kv_cache import BlockManager, OutOfBlocks, kv_blocks_capacity


def check_pools(bm: BlockManager) -> None:
    assert bm.num_used_gpu_blocks + bm.num_free_gpu_blocks == bm.num_gpu_blocks
    assert bm.num_used_cpu_blocks + bm.num_free_cpu_blocks == bm.num_cpu_blocks
    assert 0 <= bm.num_used_gpu_blocks <= bm.num_gpu_blocks
    assert 0 <= bm.num_used_cpu_blocks <= bm.num_cpu_blocks


# -- basics -----------------------------------------------------------------------------------


def test_blocks_for_is_ceiling():
    bm = BlockManager(num_gpu_blocks=10, block_size=16)
    assert [bm.blocks_for(n) for n in (0, 1, 15, 16, 17, 32, 33)] == [0, 1, 1, 1, 2, 2, 3]


def test_allocate_and_free_counts():
    bm = BlockManager(num_gpu_blocks=100, block_size=16, watermark=0.0)
    bm.allocate("a", 40)
    assert (bm.tokens("a"), bm.blocks("a"), bm.on_cpu("a")) == (40, 3, False)
    assert (bm.num_used_gpu_blocks, bm.num_free_gpu_blocks) == (3, 97)
    assert bm.utilization == pytest.approx(0.03)
    assert "a" in bm and len(bm) == 1
    assert bm.free("a") == 3
    assert bm.num_free_gpu_blocks == 100 and "a" not in bm


def test_append_allocates_only_at_block_boundaries():
    bm = BlockManager(num_gpu_blocks=100, block_size=4, watermark=0.0)
    bm.allocate(1, 3)  # one block, three slots used
    used = []
    for _ in range(10):
        bm.append(1)
        used.append(bm.num_used_gpu_blocks)
    # tokens 4..13: a new block when token 5 and token 9 and token 13 arrive
    assert used == [1, 2, 2, 2, 2, 3, 3, 3, 3, 4]
    assert bm.tokens(1) == 13 and bm.blocks(1) == 4


def test_append_many_tokens_at_once_and_empty_start():
    bm = BlockManager(num_gpu_blocks=100, block_size=16, watermark=0.0)
    bm.allocate("chunked", 0)  # registered before its first chunk
    assert bm.blocks("chunked") == 0
    bm.append("chunked", 512)
    assert bm.blocks("chunked") == 32
    bm.append("chunked", 1)
    assert bm.blocks("chunked") == 33
    bm.append("chunked", 0)
    assert bm.blocks("chunked") == 33


def test_append_to_full_pool_raises_and_changes_nothing():
    bm = BlockManager(num_gpu_blocks=2, block_size=4, watermark=0.0)
    bm.allocate("a", 8)
    assert not bm.can_append("a")
    with pytest.raises(OutOfBlocks, match=r"append of sequence 'a' needs 1 blocks, 0 free"):
        bm.append("a")
    assert (bm.tokens("a"), bm.blocks("a"), bm.num_used_gpu_blocks) == (8, 2, 2)


# -- watermark --------------------------------------------------------------------------------


def test_watermark_limits_new_sequences_not_growth():
    bm = BlockManager(num_gpu_blocks=100, block_size=1, watermark=0.05)
    assert bm.watermark_blocks == 5
    assert bm.can_allocate("a", 95) and not bm.can_allocate("a", 96)
    with pytest.raises(OutOfBlocks, match="5 more are kept free as watermark"):
        bm.allocate("a", 96)
    assert bm.num_used_gpu_blocks == 0
    bm.allocate("a", 95)
    # running sequences may eat into the watermark
    for _ in range(5):
        bm.append("a")
    assert bm.num_free_gpu_blocks == 0
    assert not bm.can_append("a")


def test_sequence_larger_than_pool_never_fits():
    bm = BlockManager(num_gpu_blocks=10, block_size=16, watermark=0.0)
    assert bm.can_allocate("a", 160) and not bm.can_allocate("a", 161)


# -- preemption -------------------------------------------------------------------------------


def test_free_as_preemption_releases_exactly_the_sequence():
    bm = BlockManager(num_gpu_blocks=50, block_size=16, watermark=0.0)
    bm.allocate("a", 100)  # 7 blocks
    bm.allocate("b", 33)   # 3 blocks
    before = bm.num_free_gpu_blocks
    assert bm.free("a") == 7
    assert bm.num_free_gpu_blocks == before + 7
    assert bm.blocks("b") == 3 and bm.num_used_gpu_blocks == 3


def test_swap_round_trip():
    bm = BlockManager(num_gpu_blocks=20, block_size=16, num_cpu_blocks=10, watermark=0.0)
    bm.allocate("a", 100)  # 7 blocks
    bm.allocate("b", 16)
    assert bm.swap_out("a") == 7
    assert bm.on_cpu("a")
    assert (bm.num_used_gpu_blocks, bm.num_used_cpu_blocks) == (1, 7)
    assert bm.tokens("a") == 100  # state survives the swap
    with pytest.raises(ValueError, match="swapped out"):
        bm.append("a")
    with pytest.raises(ValueError, match="swapped out"):
        bm.swap_out("a")
    assert bm.can_swap_in("a")
    assert bm.swap_in("a") == 7
    assert not bm.on_cpu("a")
    assert (bm.num_used_gpu_blocks, bm.num_used_cpu_blocks) == (8, 0)
    with pytest.raises(ValueError, match="on the GPU"):
        bm.swap_in("a")
    bm.append("a", 12)  # fills the 7th block exactly (112 tokens)
    assert bm.blocks("a") == 7


def test_swap_needs_room():
    bm = BlockManager(num_gpu_blocks=20, block_size=16, num_cpu_blocks=5, watermark=0.0)
    bm.allocate("big", 100)  # 7 blocks > 5 CPU blocks
    assert not bm.can_swap_out("big")
    with pytest.raises(OutOfBlocks, match="CPU pool"):
        bm.swap_out("big")
    bm.allocate("small", 64)  # 4 blocks
    bm.swap_out("small")
    bm.allocate("fill", 16 * 9)  # GPU: 7 + 9 = 16 used, 4 free
    bm.allocate("more", 1)       # 3 free
    assert not bm.can_swap_in("small")
    with pytest.raises(OutOfBlocks, match="swap_in of sequence 'small' needs 4 blocks, 3 free"):
        bm.swap_in("small")
    assert bm.on_cpu("small")
    assert bm.free("small") == 4  # freeing a swapped-out sequence releases CPU blocks
    assert bm.num_used_cpu_blocks == 0


def test_swap_in_respects_watermark():
    bm = BlockManager(num_gpu_blocks=100, block_size=1, num_cpu_blocks=100, watermark=0.1)
    bm.allocate("a", 50)
    bm.swap_out("a")
    bm.allocate("b", 41)  # 59 free; swapping in 50 would leave 9 < 10
    assert not bm.can_swap_in("a")
    bm.free("b")
    assert bm.can_swap_in("a")


# -- errors -----------------------------------------------------------------------------------


def test_errors():
    bm = BlockManager(num_gpu_blocks=10, block_size=16)
    bm.allocate("a", 10)
    with pytest.raises(ValueError, match="'a' is already allocated"):
        bm.allocate("a", 10)
    with pytest.raises(KeyError, match="'zz' holds no KV blocks"):
        bm.free("zz")
    with pytest.raises(KeyError):
        bm.append("zz")
    with pytest.raises(KeyError):
        bm.tokens("zz")
    with pytest.raises(ValueError, match="must be >= 0"):
        bm.allocate("b", -1)
    with pytest.raises(ValueError, match="must be >= 0"):
        bm.append("a", -1)
    bm.free("a")
    with pytest.raises(KeyError):
        bm.free("a")  # double free
    for kwargs in ({"num_gpu_blocks": -1}, {"block_size": 0}, {"watermark": 1.0},
                   {"num_cpu_blocks": -2}):
        with pytest.raises(ValueError):
            BlockManager(**{"num_gpu_blocks": 10, "block_size": 16, **kwargs})


def test_out_of_blocks_carries_counts():
    bm = BlockManager(num_gpu_blocks=4, block_size=16, watermark=0.0)
    with pytest.raises(OutOfBlocks) as info:
        bm.allocate(7, 100)
    err = info.value
    assert (err.seq_id, err.op, err.needed, err.free) == (7, "allocate", 7, 4)


def test_kv_blocks_capacity():
    # 1 GiB free, 128 KiB per token, 16-token blocks -> 512 blocks
    assert kv_blocks_capacity(2**30, 2**17, 16) == 512
    assert kv_blocks_capacity(2**30 - 1, 2**17, 16) == 511
    assert kv_blocks_capacity(-5.0, 2**17, 16) == 0
    with pytest.raises(ValueError):
        kv_blocks_capacity(2**30, 0, 16)
    with pytest.raises(ValueError):
        kv_blocks_capacity(2**30, 10, 0)


# -- property-style: random operations against a reference model --------------------------


class Reference:
    """The same accounting, written the slow obvious way, to predict every outcome."""

    def __init__(self, gpu: int, cpu: int, block_size: int, watermark_blocks: int):
        self.gpu, self.cpu, self.bs, self.wm = gpu, cpu, block_size, watermark_blocks
        self.seqs: dict[int, list] = {}  # id -> [tokens, on_cpu]

    def nblocks(self, tokens: int) -> int:
        return math.ceil(tokens / self.bs)

    def used(self, on_cpu: bool) -> int:
        return sum(self.nblocks(t) for t, c in self.seqs.values() if c == on_cpu)

    def fits_allocate(self, tokens: int) -> bool:
        return self.gpu - self.used(False) - self.nblocks(tokens) >= self.wm

    def fits_append(self, sid: int, new: int) -> bool:
        t = self.seqs[sid][0]
        return self.nblocks(t + new) - self.nblocks(t) <= self.gpu - self.used(False)

    def fits_swap_out(self, sid: int) -> bool:
        return self.nblocks(self.seqs[sid][0]) <= self.cpu - self.used(True)

    def fits_swap_in(self, sid: int) -> bool:
        return self.gpu - self.used(False) - self.nblocks(self.seqs[sid][0]) >= self.wm


def random_step(rng: random.Random, bm: BlockManager, ref: Reference, next_id: int) -> int:
    """One random operation; asserts the manager agrees with the reference. Returns next id."""
    on_gpu = [s for s, (_, c) in ref.seqs.items() if not c]
    on_cpu = [s for s, (_, c) in ref.seqs.items() if c]
    op = rng.choice(["allocate", "allocate", "append", "append", "append", "free",
                     "swap_out", "swap_in"])
    if op == "allocate":
        tokens = rng.randint(0, 6 * ref.bs)
        ok = ref.fits_allocate(tokens)
        assert bm.can_allocate(next_id, tokens) == ok
        if ok:
            bm.allocate(next_id, tokens)
            ref.seqs[next_id] = [tokens, False]
        else:
            with pytest.raises(OutOfBlocks):
                bm.allocate(next_id, tokens)
        return next_id + 1
    if op == "append" and on_gpu:
        sid, new = rng.choice(on_gpu), rng.choice([1, 1, 1, rng.randint(0, 3 * ref.bs)])
        ok = ref.fits_append(sid, new)
        assert bm.can_append(sid, new) == ok
        if ok:
            bm.append(sid, new)
            ref.seqs[sid][0] += new
        else:
            with pytest.raises(OutOfBlocks):
                bm.append(sid, new)
    elif op == "free" and ref.seqs:
        sid = rng.choice(sorted(ref.seqs))
        tokens, was_cpu = ref.seqs.pop(sid)
        free_before = bm.num_free_cpu_blocks if was_cpu else bm.num_free_gpu_blocks
        assert bm.free(sid) == ref.nblocks(tokens)
        free_after = bm.num_free_cpu_blocks if was_cpu else bm.num_free_gpu_blocks
        assert free_after - free_before == ref.nblocks(tokens)
    elif op == "swap_out" and on_gpu:
        sid = rng.choice(on_gpu)
        ok = ref.fits_swap_out(sid)
        assert bm.can_swap_out(sid) == ok
        if ok:
            gpu_before = bm.num_free_gpu_blocks
            assert bm.swap_out(sid) == ref.nblocks(ref.seqs[sid][0])
            assert bm.num_free_gpu_blocks - gpu_before == bm.blocks(sid)
            ref.seqs[sid][1] = True
        else:
            with pytest.raises(OutOfBlocks):
                bm.swap_out(sid)
    elif op == "swap_in" and on_cpu:
        sid = rng.choice(on_cpu)
        ok = ref.fits_swap_in(sid)
        assert bm.can_swap_in(sid) == ok
        if ok:
            assert bm.swap_in(sid) == ref.nblocks(ref.seqs[sid][0])
            ref.seqs[sid][1] = False
        else:
            with pytest.raises(OutOfBlocks):
                bm.swap_in(sid)
    return next_id


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("gpu,cpu,block_size,watermark", [
    (64, 32, 16, 0.05), (200, 0, 8, 0.01), (30, 60, 1, 0.0), (0, 10, 16, 0.0),
])
def test_random_operations_never_over_allocate(seed, gpu, cpu, block_size, watermark):
    rng = random.Random(seed)
    bm = BlockManager(gpu, block_size, num_cpu_blocks=cpu, watermark=watermark)
    ref = Reference(gpu, cpu, block_size, bm.watermark_blocks)
    next_id = 0
    for _ in range(3000):
        next_id = random_step(rng, bm, ref, next_id)
        check_pools(bm)
        assert bm.num_used_gpu_blocks == ref.used(False)
        assert bm.num_used_cpu_blocks == ref.used(True)
        assert len(bm) == len(ref.seqs)
    for sid, (tokens, c) in ref.seqs.items():
        assert (bm.tokens(sid), bm.blocks(sid), bm.on_cpu(sid)) == (tokens, ref.nblocks(tokens), c)
    for sid in list(ref.seqs):
        bm.free(sid)
    assert bm.num_used_gpu_blocks == 0 and bm.num_used_cpu_blocks == 0
