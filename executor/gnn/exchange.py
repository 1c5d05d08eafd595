"""Variable-sized all-to-all between trainer ranks: how a rank asks its peers for what they own.

DistDGL's trainers reach other machines through RPC (a sampling request or a feature pull is
sent to the owner's server). Here every rank is both the client and the owner, and a request
round is two collectives on one process group:

    sizes:   all_to_all_single of one count per peer    (who sends how much to whom)
    payload: all_to_all_single with those split sizes   (the ids, or the rows, themselves)

Every rank of the group must call `alltoallv` the same number of times in the same order,
also when it has nothing to send (it then sends empty slices and still answers its peers).
gloo implements `all_to_all_single` with uneven splits (and every dtype the project sends:
int64 ids, fp32/bf16/fp16 rows), so no all_gather fallback is needed.

`bytes_sent` counts the payload this rank sent to other ranks (its own slice never leaves
the process), which is what the run reports as bytes moved between ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist


class Exchange:
    """All-to-all rounds on one process group (None: the default group), with a byte count."""

    def __init__(self, rank: int, world_size: int, group: dist.ProcessGroup | None = None):
        self.rank, self.world_size, self.group = rank, world_size, group
        self.bytes_sent = 0

    def alltoallv(self, chunks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Send `chunks[p]` to rank p (same dtype and trailing shape on every rank); return what
        each rank sent here, in rank order. With one rank this is the identity."""
        if len(chunks) != self.world_size:
            raise ValueError(f"alltoallv needs one chunk per rank ({self.world_size}), got {len(chunks)}")
        if self.world_size == 1:
            return [chunks[0]]
        tail = tuple(chunks[0].shape[1:])
        send_rows = [int(c.shape[0]) for c in chunks]
        recv_rows = torch.empty(self.world_size, dtype=torch.int64)
        dist.all_to_all_single(recv_rows, torch.tensor(send_rows, dtype=torch.int64), group=self.group)
        recv_rows_list = recv_rows.tolist()
        send = torch.cat([c.reshape(c.shape[0], *tail) for c in chunks]).contiguous()
        recv = torch.empty((sum(recv_rows_list), *tail), dtype=send.dtype)
        row_bytes = send.element_size() * int(np.prod(tail, dtype=np.int64))
        self.bytes_sent += row_bytes * (sum(send_rows) - send_rows[self.rank])
        dist.all_to_all_single(recv, send, output_split_sizes=recv_rows_list,
                               input_split_sizes=send_rows, group=self.group)
        return list(torch.split(recv, recv_rows_list))


def split_by_owner(ids: np.ndarray, owners: np.ndarray, world_size: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Group `ids` by their owning rank: the ids sent to each rank, and the order that puts a
    concatenation of per-rank answers back into the order of `ids`."""
    order = np.argsort(owners, kind="stable")
    counts = np.bincount(owners, minlength=world_size)
    return list(np.split(ids[order], np.cumsum(counts)[:-1])), order
