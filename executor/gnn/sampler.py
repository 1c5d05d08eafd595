"""Neighbor sampling on CSR arrays: one hop on the rows a rank owns, and the distributed
mini-batch sampler that asks the owners of remote nodes to sample theirs (DistDGL's design).

One hop (`simulator.gnn.sampling.sample_neighbors`, shared with the simulator's counts so the
two draw alike): for each row, up to `fanout` of its in-neighbors, drawn without replacement
(all of them when the row has no more than `fanout`), by one argsort over random keys of the
candidate edges of the rows that must drop some.

A mini-batch (`DistSampler.sample`), hop by hop from the seeds outward (the model's fan-outs
are seed side first):

    frontier = seeds
    for fanout in fanouts:
        owned rows  -> sample_neighbors here
        other rows  -> all-to-all of their ids to their owners, who sample them and answer
                       (per row: its count, then the neighbors), all-to-all back
        block: dst = frontier, src = frontier + the new nodes seen   (DGL's to_block: the dst
               nodes are a prefix of the src nodes), one (src, dst) pair per sampled edge
        frontier = block's src nodes
    blocks reversed: input side first, the order the layers run in

The block's input nodes (the outermost src nodes) are the nodes whose features the batch
needs. Every rank must call `sample` the same number of times (the all-to-alls are collective).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from executor.gnn.exchange import Exchange, split_by_owner
from simulator.gnn.sampling import sample_neighbors


@dataclass
class Block:
    """One layer's bipartite graph: `num_dst` output nodes (the first `num_dst` of the
    `num_src` input nodes) and one (src, dst) pair per sampled edge, as local positions."""

    num_src: int
    num_dst: int
    src: torch.Tensor       # int64, positions among the src nodes
    dst: torch.Tensor       # int64, positions among the dst nodes
    src_nodes: np.ndarray   # global ids of the src nodes (the dst nodes are the first num_dst)


@dataclass
class MiniBatch:
    """What the sampler hands the trainer: seeds, blocks (input side first) and the input nodes."""

    seeds: np.ndarray          # global ids, owned by this rank
    blocks: list[Block]
    input_nodes: np.ndarray    # global ids of blocks[0]'s src nodes


def to_block(frontier: np.ndarray, dst_of_edge: np.ndarray, neighbors: np.ndarray) -> tuple[Block, np.ndarray]:
    """The block whose dst nodes are `frontier` and whose edges go neighbors[i] -> frontier[dst_of_edge[i]];
    returns it with its src nodes (frontier first, then new nodes in order of first appearance)."""
    every = np.concatenate([frontier, neighbors])
    unique, first, inverse = np.unique(every, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")        # unique ids in order of first appearance
    position = np.empty(order.size, dtype=np.int64)
    position[order] = np.arange(order.size)
    src_nodes = unique[order]
    src = position[inverse[frontier.size:]]
    block = Block(int(src_nodes.size), int(frontier.size), torch.from_numpy(src),
                  torch.from_numpy(dst_of_edge.astype(np.int64)), src_nodes)
    return block, src_nodes


class DistSampler:
    """Samples mini-batches over a graph whose rows are spread over ranks (see the module docstring).

    `indptr`/`indices`: CSR of this rank's owned nodes (indices are global ids); `owned`: their
    sorted global ids; `node_map`: the owning rank of every node."""

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, owned: np.ndarray, node_map: np.ndarray,
                 fanouts: list[int], exchange: Exchange, seed: int):
        self.indptr, self.indices, self.owned = indptr, indices, owned
        self.node_map, self.fanouts, self.exchange = node_map, list(fanouts), exchange
        self.rng = np.random.default_rng(seed)
        self.local_position = np.full(node_map.size, -1, dtype=np.int64)
        self.local_position[owned] = np.arange(owned.size)

    def sample(self, seeds: np.ndarray) -> MiniBatch:
        frontier = np.asarray(seeds, dtype=np.int64)
        blocks = []
        for fanout in self.fanouts:
            dst_of_edge, neighbors = self._one_hop(frontier, fanout)
            block, frontier = to_block(frontier, dst_of_edge, neighbors)
            blocks.append(block)
        return MiniBatch(np.asarray(seeds, dtype=np.int64), blocks[::-1], frontier)

    def _one_hop(self, frontier: np.ndarray, fanout: int) -> tuple[np.ndarray, np.ndarray]:
        """(frontier position of each sampled edge's dst, the sampled neighbor) for every frontier node."""
        world = self.exchange.world_size
        owners = self.node_map[frontier].astype(np.int64)
        requests, order = split_by_owner(np.arange(frontier.size), owners, world)
        asked = self.exchange.alltoallv([torch.from_numpy(frontier[r]) for r in requests])
        answers = []
        for p in range(world):
            counts, nbrs = sample_neighbors(self.indptr, self.indices,
                                            self.local_position[asked[p].numpy()], fanout, self.rng)
            answers.append(torch.from_numpy(np.concatenate([counts.astype(np.int64), nbrs.astype(np.int64)])))
        replies = self.exchange.alltoallv(answers)
        counts, nbrs = [], []
        for p, reply in enumerate(replies):
            n = requests[p].size
            counts.append(reply[:n].numpy())
            nbrs.append(reply[n:].numpy())
        # back to frontier order: the replies come grouped by owner (positions `order`)
        counts_grouped, nbrs_grouped = np.concatenate(counts), np.concatenate(nbrs)
        dst_grouped = np.repeat(order, counts_grouped)
        back = np.argsort(dst_grouped, kind="stable")
        return dst_grouped[back], nbrs_grouped[back]
