"""Pipeline schedules: the order in which one stage runs its forwards and backwards.

Each generator returns, for stage `s` of `p` with `m` micro-batches (and `v` model chunks
for the interleaved schedule), the ordered list of `Op`s that stage runs on its compute
stream. Only the order lives here; when each op may start is the engine's business
(pipeline.py), so a schedule is a plain list that tests can read.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from simulator.errors import SpecError


class Op(NamedTuple):
    """One forward ("F") or backward ("B") of `microbatch` through model chunk `chunk`."""

    kind: Literal["F", "B"]
    chunk: int
    microbatch: int


def gpipe(s: int, p: int, m: int) -> list[Op]:
    """All forwards, then all backwards (Huang et al., NeurIPS'19; torch.distributed.pipelining
    ScheduleGPipe). Every micro-batch's activations are held at once."""
    return [Op("F", 0, j) for j in range(m)] + [Op("B", 0, j) for j in range(m)]


def one_f_one_b(s: int, p: int, m: int) -> list[Op]:
    """1F1B / PipeDream-flush (Narayanan et al., SC'21, Fig. 4 top).

    Stage s runs min(p-s-1, m) warm-up forwards, then alternates one forward with one
    backward, then drains the remaining backwards. At most p-s micro-batches are in flight.
    """
    warmup = min(p - s - 1, m)
    ops = [Op("F", 0, j) for j in range(warmup)]
    for i in range(m - warmup):
        ops += [Op("F", 0, warmup + i), Op("B", 0, i)]
    return ops + [Op("B", 0, j) for j in range(m - warmup, m)]


def interleaved_1f1b(s: int, p: int, m: int, v: int) -> list[Op]:
    """Interleaved 1F1B, in the order of Megatron-LM's
    `forward_backward_pipelining_with_interleaving` (Narayanan et al., SC'21, Fig. 4 bottom).

    Virtual micro-batch k (0 <= k < m*v) visits chunks in groups of p micro-batches:
    forward k is chunk (k // p) % v, backward k is chunk v-1-((k // p) % v), both of
    micro-batch (k // (p*v))*p + k % p. Warm-up is (p-s-1)*2 + (v-1)*p forwards (capped at
    m*v), then steady 1F1B, then cool-down backwards. Megatron-core's grouping needs m % p == 0.
    (Older Megatron-LM also ran all-forward-then-all-backward when m == p; newer
    Megatron-core dropped that special case, and so do we.)
    """
    if m % p:
        raise SpecError("num_microbatches", m, f"must be a multiple of num_stages ({p}) "
                        "for the interleaved schedule")
    total = m * v
    warmup = min((p - s - 1) * 2 + (v - 1) * p, total)

    def mb(k: int) -> int:
        return (k // (p * v)) * p + k % p

    def fwd(k: int) -> Op:
        return Op("F", (k // p) % v, mb(k))

    def bwd(k: int) -> Op:
        return Op("B", v - 1 - (k // p) % v, mb(k))

    ops = [fwd(k) for k in range(warmup)]
    for k in range(total - warmup):
        ops += [fwd(warmup + k), bwd(k)]
    return ops + [bwd(k) for k in range(total - warmup, total)]


def stage_ops(schedule: str, s: int, p: int, m: int, v: int = 1) -> list[Op]:
    """The op order of stage `s` under `schedule` ("gpipe" | "1f1b" | "interleaved")."""
    if schedule == "interleaved":
        return interleaved_1f1b(s, p, m, v)
    if v != 1:
        raise SpecError("virtual_stages", v, f"must be 1 for the {schedule!r} schedule")
    if schedule == "gpipe":
        return gpipe(s, p, m)
    if schedule == "1f1b":
        return one_f_one_b(s, p, m)
    raise SpecError("schedule", schedule, "must be one of 'gpipe', '1f1b', 'interleaved'")
